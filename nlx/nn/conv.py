"""Short causal depthwise convolution with a streaming state (DeltaNet, Mamba2, Titans)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn.params import param

Array = jax.Array


class ShortConv(nnx.Module):
  """Causal depthwise convolution over time: ``y_t = Σ_{i<W} w_i ⊙ x_{t−i}`` (then SiLU).

  The streaming state is the last ``W − 1`` inputs, ``[B, W − 1, C]``; feeding a sequence in
  pieces with the state of the previous piece gives the result of one piece.
  """

  def __init__(self, channels: int, width: int, axis_name: str, *, rngs: nnx.Rngs,
               activation: bool = True):
    if width < 1:
      raise ValueError(f"conv width must be >= 1; got {width}")
    self.width, self.channels, self.activation = width, channels, activation
    # Starts near the identity (i = 0 is the current token).
    init = lambda key, shape, dtype: (0.1 * jax.random.normal(key, shape, dtype)).at[0].add(1.0)
    self.kernel = param(rngs, init, (width, channels), ("conv", axis_name))

  def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
    return jnp.zeros((batch_size, self.width - 1, self.channels), dtype)

  def __call__(self, x: Array, state: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
    """``x [B, T, C]`` -> ``(y [B, T, C], new state or None)``."""
    b, t, _ = x.shape
    past = (jnp.zeros((b, self.width - 1, self.channels), x.dtype) if state is None
            else state.astype(x.dtype))
    padded = jnp.concatenate([past, x], axis=1)
    w = self.kernel[...].astype(x.dtype)
    start = self.width - 1
    y = sum(w[i] * padded[:, start - i:start - i + t] for i in range(self.width))
    if self.activation:
      y = jax.nn.silu(y)
    new_state = None if state is None else padded[:, t:].astype(state.dtype)
    return y, new_state
