"""Rotary position embedding (RoPE), shared by attention and RetNet.

Positions are absolute positions ``[T]`` (one sequence per row, every row alike) or per-row
positions ``[B, T]``: the positions of each token inside its document in a packed batch
(``nlx.nn.segments.Segments.positions``), so that every document starts at position 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Rotates pairs ``(x[..., i], x[..., i + D/2])`` by ``position · theta^(-2i/D)``.

  Args:
    x: ``[B, T, H, D]`` with D even.
    positions: ``[T]`` (shared by the rows) or ``[B, T]`` (per row) positions (int).
    theta: the base of the frequencies.

  Returns:
    ``[B, T, H, D]`` in x's dtype (computed in float32, or float64 for float64 inputs).
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head dimension; got {d}")
  positions = jnp.asarray(positions)
  if positions.shape not in (x.shape[1:2], x.shape[:2]):
    raise ValueError(f"positions has shape {positions.shape}; RoPE takes [T] = {x.shape[1:2]} "
                     f"or [B, T] = {x.shape[:2]} positions for x of shape {x.shape}")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  freqs = theta**(-jnp.arange(0, d // 2, dtype=dtype) * 2.0 / d)
  angles = positions.astype(dtype)[..., None] * freqs  # [T, D/2] or [B, T, D/2]
  if angles.ndim == 2:
    angles = angles[None]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(dtype), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
