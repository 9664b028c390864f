"""The SwiGLU feed-forward block of every model in the zoo."""

from __future__ import annotations

import jax
from flax import nnx

from nlx.nn.params import Dense

Array = jax.Array


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) ⊙ up(x))``: ``[..., d] -> [..., d]`` with hidden width ``hidden``."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate = Dense((d_model,), (hidden,), ("embed", "mlp"), rngs=rngs)
    self.up = Dense((d_model,), (hidden,), ("embed", "mlp"), rngs=rngs)
    self.down = Dense((hidden,), (d_model,), ("mlp", "embed"), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
