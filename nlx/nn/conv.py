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

  Document boundaries (``reset [B, T]``, ``nlx.nn.segments``): a reset at t hides every input
  before t from the outputs at t and after, the carried state included, exactly as if the
  document started from the zero state; the returned state keeps only the inputs of the last
  document (zeros in place of older ones), so the next call continues that document alone.
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

  def __call__(self, x: Array, state: Optional[Array] = None,
               reset: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
    """``x [B, T, C]`` (and ``reset [B, T]`` bool or None) -> ``(y [B, T, C], new state)``;
    the new state is None when no state was given."""
    b, t, _ = x.shape
    past = (jnp.zeros((b, self.width - 1, self.channels), x.dtype) if state is None
            else state.astype(x.dtype))
    padded = jnp.concatenate([past, x], axis=1)
    w = self.kernel[...].astype(x.dtype)
    start = self.width - 1
    if reset is None:
      y = sum(w[i] * padded[:, start - i:start - i + t] for i in range(self.width))
    else:
      if reset.shape != (b, t):
        raise ValueError(f"reset has shape {reset.shape}; ShortConv takes [B, T] = {(b, t)}")
      # Input j reaches output t >= j only if no reset lies in (j, t]: equal reset counts. The
      # carried inputs count as before every reset of the call (count 0).
      count = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [B, T]
      counts = jnp.concatenate([jnp.zeros((b, start), jnp.int32), count], axis=1)
      same = lambda lo: (counts[:, lo:lo + t] == count)[..., None]
      y = sum(w[i] * jnp.where(same(start - i), padded[:, start - i:start - i + t], 0)
              for i in range(self.width))
      padded = jnp.where((counts == count[:, -1:])[..., None], padded, 0)
    if self.activation:
      y = jax.nn.silu(y)
    new_state = None if state is None else padded[:, t:].astype(state.dtype)
    return y, new_state
