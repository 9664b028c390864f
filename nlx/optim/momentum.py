"""Momentum as an associative memory of gradients: dot-product (classical) and L2 (delta).

Momentum is a memory ``m`` (shaped like the parameters) that compresses the gradients it is shown
(docs/EQUATIONS.md §1–2: Eqs. 12–13 and 46–49 of the paper). With the dot-product objective
``−⟨m, P∇L⟩`` one gradient step of size 1 with retention β is the classical trace

    m ← β m + P g,                                  W ← W − η m

(``optax.sgd(η, momentum=β)`` when P = I). With the L2 objective ``‖m gᵀ − P‖²`` the write also
erases what the memory already holds along the gradient (delta momentum, arXiv Eq. 49):

    arxiv:    m ← m (β I − Gᵀ G) + P G              NeurIPS: m ← (β I − G Gᵀ) m + P G

where G is the gradient in the row view of ``shapes.as_rows`` (``[n, d]``; a vector is one row).
The paper writes the memory in parameter units, ``m_η = −η m``; with a constant η the two are the
same, and storing the memory in gradient units makes ``learning_rate`` a schedule as in optax.
The NeurIPS form multiplies on the left, which is shape-valid only with ``G Gᵀ`` (``[n, n]``) in
nlx's row convention.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nlx import validation
from nlx.memory import DOT
from nlx.optim import shapes

OBJECTIVES = ("dot", "l2")
DELTA_FORMS = ("arxiv", "neurips")


class MomentumMemoryState(NamedTuple):
  """State of ``scale_by_momentum_memory``.

  Attributes:
    momentum: the memory m, a pytree shaped like the parameters (in gradient units).
    preconditioner: the state of the preconditioner P (``optax.EmptyState()`` when P = I).
  """

  momentum: optax.Updates
  preconditioner: optax.OptState


def _erase(m: jax.Array, g: jax.Array, form: str, normalize_keys: bool) -> jax.Array:
  """The delta write's decay term without β: ``m Gᵀ G`` (arxiv) or ``G Gᵀ m`` (NeurIPS)."""
  rows_m, rows_g = shapes.as_rows(m), shapes.as_rows(g).astype(m.dtype)
  if normalize_keys:
    rows_g = rows_g / (jnp.linalg.norm(rows_g) + jnp.finfo(rows_g.dtype).eps)
  if form == "arxiv":
    n, d = rows_g.shape
    out = (rows_m @ rows_g.T) @ rows_g if n < d else rows_m @ (rows_g.T @ rows_g)
  else:
    out = rows_g @ (rows_g.T @ rows_m)
  return out.reshape(jnp.shape(m))


def scale_by_momentum_memory(beta=0.9, objective: str = "dot", delta_form: str = "arxiv",
                             normalize_keys: bool = False,
                             preconditioner: Optional[optax.GradientTransformation] = None
                             ) -> optax.GradientTransformation:
  """The momentum memory without the learning rate: updates are ``m`` after this step's write.

  Args:
    beta: retention β of the memory, in [0, 1].
    objective: ``"dot"`` (classical momentum) or ``"l2"`` (delta momentum).
    delta_form: where the L2 write puts its decay: ``"arxiv"`` (Eq. 49, default) or
      ``"neurips"``; ignored for ``"dot"``.
    normalize_keys: divide G by its Frobenius norm in the erase term of the L2 write (the
      published rule has no normalisation, and erases too much when ‖G‖ > 1).
    preconditioner: an optax transformation computing ``P g`` (e.g. ``optax.scale_by_rms()``);
      None for P = I.

  Returns:
    An ``optax.GradientTransformation`` with ``MomentumMemoryState``.
  """
  validation.check_range("beta", beta, 0.0, 1.0)
  validation.check_choice("objective", objective, OBJECTIVES, style="supported")
  validation.check_choice("delta_form", delta_form, DELTA_FORMS, style="supported")
  precond = optax.identity() if preconditioner is None else preconditioner

  def init_fn(params):
    return MomentumMemoryState(jax.tree.map(jnp.zeros_like, params), precond.init(params))

  def update_fn(updates, state, params=None):
    signal, precond_state = precond.update(updates, state.preconditioner, params)

    def write(m, s, g):
      # Both objectives' writes add −error of the dot objective, i.e. +P g.
      new = beta * m - DOT.error(m, s.astype(m.dtype))
      if objective == "l2":
        new = new - _erase(m, g, delta_form, normalize_keys)
      return new

    momentum = jax.tree.map(write, state.momentum, signal, updates)
    return momentum, MomentumMemoryState(momentum, precond_state)

  return optax.GradientTransformation(init_fn, update_fn)


def momentum_memory(learning_rate: optax.ScalarOrSchedule, beta=0.9, objective: str = "dot",
                    delta_form: str = "arxiv", normalize_keys: bool = False
                    ) -> optax.GradientTransformation:
  """Momentum as a memory of gradients: ``W ← W − learning_rate · m`` (see the module docstring).

  ``objective="dot"`` equals ``optax.sgd(learning_rate, momentum=beta)``; ``objective="l2"`` is
  delta momentum (arXiv Eq. 49, or the NeurIPS form with ``delta_form="neurips"``).

  Args:
    learning_rate: η, a float or an optax schedule.
    beta, objective, delta_form, normalize_keys: as in ``scale_by_momentum_memory``.
  """
  validation.check_range("learning_rate", learning_rate, 0.0)
  return optax.chain(
      scale_by_momentum_memory(beta, objective, delta_form, normalize_keys),
      optax.scale_by_learning_rate(learning_rate))


def preconditioned_momentum(learning_rate: optax.ScalarOrSchedule,
                            preconditioner: optax.GradientTransformation, beta=0.9,
                            objective: str = "dot", delta_form: str = "arxiv",
                            normalize_keys: bool = False) -> optax.GradientTransformation:
  """Preconditioned momentum ``m ← β m + P ∇L``, ``W ← W − η m`` (Eqs. 46–47).

  With ``preconditioner=optax.scale_by_rms(...)`` this is RMSprop with momentum
  (``optax.rmsprop(η, ..., momentum=β)``); with ``objective="l2"`` the write is delta momentum
  with value ``P ∇L``.

  Args:
    learning_rate: η, a float or an optax schedule.
    preconditioner: an optax transformation computing ``P g``.
    beta, objective, delta_form, normalize_keys: as in ``scale_by_momentum_memory``.
  """
  if not isinstance(preconditioner, optax.GradientTransformation):
    raise ValueError(f"preconditioner={preconditioner!r} must be an optax.GradientTransformation")
  validation.check_range("learning_rate", learning_rate, 0.0)
  return optax.chain(
      scale_by_momentum_memory(beta, objective, delta_form, normalize_keys, preconditioner),
      optax.scale_by_learning_rate(learning_rate))
