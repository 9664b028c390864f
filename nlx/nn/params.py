"""Parameters with logical axis names, and the dense layers and embedding built on them.

Every parameter of nlx.nn is an ``nnx.Param`` whose ``out_sharding`` metadata names its logical
axes (``("embed", "mlp")``, ``("embed", "heads", "head_dim")``, ``("vocab", "embed")``; stacked
layers add ``"layers"`` in front). A rules table (the training config) maps these names to mesh
axes; nothing here needs a mesh (``eager_sharding=False``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Initializer = Callable[[Array, tuple, jnp.dtype], Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str],
          dtype=jnp.float32) -> nnx.Param:
  """An ``nnx.Param`` of ``shape`` drawn by ``init``, with logical axis names ``axes``."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} must name every axis of shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


def constant(value: float) -> Initializer:
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def normal(std: float) -> Initializer:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
  """``y = x ⋅ W (+ b)`` contracting the trailing ``in_shape`` axes of x into ``out_shape``.

  ``Dense((d,), (h, dh), ("embed", "heads", "head_dim"))`` maps ``[..., d] -> [..., h, dh]``;
  ``Dense((h, dh), (d,), ("heads", "head_dim", "embed"))`` maps back. Weights are fan-in scaled
  normals (std ``fan_in ** -0.5``, or ``init_std``).
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str], *,
               rngs: nnx.Rngs, use_bias: bool = False, init_std: float | None = None,
               bias_init: Initializer = constant(0.0)):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    std = math.prod(self.in_shape)**-0.5 if init_std is None else init_std
    self.kernel = param(rngs, normal(std), self.in_shape + self.out_shape, axes)
    n_in = len(self.in_shape)
    self.bias = (param(rngs, bias_init, self.out_shape, tuple(axes)[n_in:]) if use_bias else None)

  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Dense expects trailing axes {self.in_shape}; got input shape {x.shape}")
    w = self.kernel[...]
    y = jnp.tensordot(x, w.astype(x.dtype), axes=n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class Embedding(nnx.Module):
  """Token embedding ``[vocab, d]`` (axes ``("vocab", "embed")``); ``attend`` is the tied head."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, init_std: float = 0.02):
    self.table = param(rngs, normal(init_std), (vocab_size, d_model), ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.table[...], tokens, axis=0)

  def attend(self, x: Array) -> Array:
    """Logits ``x ⋅ tableᵀ``: ``[..., d] -> [..., vocab]``."""
    return x @ self.table[...].T.astype(x.dtype)
