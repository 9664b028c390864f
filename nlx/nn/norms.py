"""Normalisations: RMSNorm (optionally over heads, optionally gated) and L2 normalisation."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn.params import constant, param

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  """``x / ‖x‖`` over the last axis, computed in float32 (or wider, for float64 inputs)."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale of ``shape`` (the trailing axes of x).

  ``RMSNorm((d,), ("embed",))`` is the block norm; ``RMSNorm((h, dh), ("heads", "head_dim"))``
  normalises each head separately with a per-head scale (the output norm of the memory mixers).
  ``gate`` multiplies the result by ``silu(gate)`` (Mamba2's gated norm, the Titans output gate).
  """

  def __init__(self, shape: Sequence[int], axes: Sequence[str], *, rngs: nnx.Rngs,
               eps: float = 1e-6):
    self.eps = eps
    self.scale = param(rngs, constant(1.0), tuple(shape), axes)

  def __call__(self, x: Array, gate: Array | None = None) -> Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if gate is not None:
      y = y * jax.nn.silu(gate.astype(x32.dtype))
    return y.astype(x.dtype)
