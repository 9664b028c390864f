"""Rotary position embedding (RoPE) at absolute positions, shared by attention and RetNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Rotates pairs ``(x[..., i], x[..., i + D/2])`` by ``position · theta^(-2i/D)``.

  Args:
    x: ``[B, T, H, D]`` with D even.
    positions: ``[T]`` absolute positions (int).
    theta: the base of the frequencies.

  Returns:
    ``[B, T, H, D]`` in x's dtype.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head dimension; got {d}")
  freqs = theta**(-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[:, None] * freqs  # [T, D/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
