"""How the optimizers view a parameter of any rank: as rows, or as a matrix for Newton–Schulz.

* ``as_rows``: ``[..., d] -> [n, d]`` (a scalar is ``[1, 1]``, a vector ``[1, d]``): the view in
  which the gradient's rows are the keys of a momentum memory (delta momentum, DMGD).
* ``is_matrix`` / ``matrix_labels``: parameters of rank >= 2 are matrices (stacked over the leading
  axes when the rank is > 2, e.g. layers stacked by ``nnx.scan``); the rest are vectors, which
  the orthogonalising optimizers hand to Adam.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MATRIX = "matrix"
VECTOR = "vector"


def as_rows(x: jax.Array) -> jax.Array:
  """``[..., d] -> [prod(...), d]``; scalars become ``[1, 1]``."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x.reshape(1, 1)
  return x.reshape(-1, x.shape[-1])


def is_matrix(x) -> bool:
  """Whether the optimizers orthogonalise ``x`` (rank >= 2)."""
  return jnp.ndim(x) >= 2


def matrix_labels(params):
  """``"matrix"`` for every leaf of rank >= 2, ``"vector"`` for the rest (a pytree like params)."""
  return jax.tree.map(lambda x: MATRIX if is_matrix(x) else VECTOR, params)
