"""Inner objectives of associative memories.

An associative memory ``M`` is written by one gradient step on an inner objective
``loss(M(k), v)`` (docs/EQUATIONS.md §1). Two objectives cover the sequence ops of nlx:

* ``dot``: ``-<M(k), v>``, the Hebbian / dot-product objective. Its gradient does not depend on
  the memory, which is why linear attention's chunked form is exact.
* ``l2``: ``½‖M(k) - v‖²``, the regression objective of the delta rule, Titans and TTT.

Each objective carries its ``error``: the gradient of the loss with respect to the memory's
prediction, ``∂loss/∂M(k)``. Chunked forms use it to build per-token gradients without
materialising them (a dense layer's weight gradient is ``input ⊗ error``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
  """An inner objective ``loss(pred, target)`` with its error ``∂loss/∂pred``.

  Attributes:
    name: registry name ("dot" or "l2").
    loss: ``(pred[..., V], target[..., V]) -> [...]``, summed over the last axis.
    error: ``(pred[..., V], target[..., V]) -> [..., V]``, the gradient of ``loss`` w.r.t. pred.
  """

  name: str
  loss: Callable[[Array, Array], Array]
  error: Callable[[Array, Array], Array]


def _dot_loss(pred: Array, target: Array) -> Array:
  return -(pred * target).sum(-1)


def _dot_error(pred: Array, target: Array) -> Array:
  del pred
  return -target


def _l2_loss(pred: Array, target: Array) -> Array:
  return 0.5 * ((pred - target) ** 2).sum(-1)


def _l2_error(pred: Array, target: Array) -> Array:
  return pred - target


DOT = Objective("dot", _dot_loss, _dot_error)
L2 = Objective("l2", _l2_loss, _l2_error)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DOT, L2)}


def get_objective(objective: str | Objective) -> Objective:
  """Returns the objective named ``objective`` (or ``objective`` itself if already one)."""
  if isinstance(objective, Objective):
    return objective
  if objective not in OBJECTIVES:
    raise ValueError(
        f"objective={objective!r} is not a known inner objective; allowed: {sorted(OBJECTIVES)}")
  return OBJECTIVES[objective]
