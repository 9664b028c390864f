"""Nonlinear outputs: the momentum memory read through Newton–Schulz, i.e. Muon.

docs/EQUATIONS.md §2. ``W ← W + σ(m(u))`` with σ the Newton–Schulz orthogonalisation (a few gradient
steps on ``‖PᵀP − I‖²``, Eqs. 43–44) and ``m`` the momentum memory. With the linear (EMA) memory
this is Muon and ``nonlinear_output`` equals ``optax.contrib.muon``; any other memory transformation
(for example ``scale_by_deep_momentum``) can be read through σ instead. Parameters of rank < 2 go to
Adam (``adam_memory``), as in Muon.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nlx import validation
from nlx.optim import adam, moments, shapes

# Quintic coefficients of Muon (Jordan et al. 2024): maximal slope at zero.
MUON_COEFFS = (3.4445, -4.775, 2.0315)


def newton_schulz(x: jax.Array, steps=5, coeffs=MUON_COEFFS, eps=1e-8) -> jax.Array:
  """Approximate orthogonalisation ``U Vᵀ`` of each matrix in ``x: [..., m, n]``.

  ``X ← X / (‖X‖_F + eps)``, then ``steps`` quintic iterations ``X ← a X + (b A + c A²) X`` with
  ``A = X Xᵀ``, run on the wide orientation (``m <= n``; tall matrices are transposed).

  Args:
    x: ``[..., m, n]``; leading axes are a batch of matrices.
    steps: number of iterations (an int; may be traced).
    coeffs: ``(a, b, c)``.
    eps: added to the Frobenius norm.

  Returns:
    ``[..., m, n]``, in x's dtype.
  """
  if jnp.ndim(x) < 2:
    raise ValueError(f"newton_schulz needs a matrix [..., m, n], got shape {jnp.shape(x)}")
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
  a, b, c = (jnp.asarray(k, x.dtype) for k in coeffs)

  def iteration(_, y):
    gram = y @ jnp.swapaxes(y, -1, -2)
    return a * y + (b * gram + c * gram @ gram) @ y

  x = jax.lax.fori_loop(0, steps, iteration, x)
  return jnp.swapaxes(x, -1, -2) if tall else x


def shape_scale(x: jax.Array) -> float:
  """Muon's width factor ``sqrt(max(1, fan_out / fan_in))`` for ``x: [..., fan_in, fan_out]``."""
  return max(1.0, x.shape[-1] / x.shape[-2]) ** 0.5


def scale_by_newton_schulz(steps=5, coeffs=MUON_COEFFS, eps=1e-8,
                           scale_by_shape: bool = True) -> optax.GradientTransformation:
  """Stateless σ: orthogonalise every update of rank >= 2 (optionally times ``shape_scale``).

  Args:
    steps, coeffs, eps: as in ``newton_schulz``.
    scale_by_shape: multiply by ``shape_scale`` (Muon's default).
  """
  validation.check_int("steps", steps, 0)
  validation.check_range("eps", eps, 0.0)

  def update_fn(updates, state, params=None):
    del params

    def one(u):
      if not shapes.is_matrix(u):
        raise ValueError(f"scale_by_newton_schulz needs matrices; got a leaf of shape "
                         f"{jnp.shape(u)} (route rank < 2 parameters to Adam)")
      out = newton_schulz(u, steps, coeffs, eps)
      return out * shape_scale(u) if scale_by_shape else out

    return jax.tree.map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class EmaMomentumState(NamedTuple):
  """State of ``scale_by_ema_momentum``: step count and the memory ``mu`` (like the params)."""

  count: jax.Array
  mu: optax.Updates


def scale_by_ema_momentum(beta=0.95, nesterov: bool = True) -> optax.GradientTransformation:
  """Muon's linear momentum memory: an L2-objective write, read debiased (Nesterov by default)."""
  validation.check_range("beta", beta, 0.0, 1.0, high_open=True)

  def init_fn(params):
    return EmaMomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = moments.write_moment(state.mu, updates, beta)
    count = optax.safe_increment(state.count)
    return moments.read_first_moment(mu, updates, beta, count, nesterov), EmaMomentumState(count,
                                                                                           mu)

  return optax.GradientTransformation(init_fn, update_fn)


def with_adam_for_vectors(matrix_tx: optax.GradientTransformation,
                          vector_tx: optax.GradientTransformation, param_labels=None
                          ) -> optax.GradientTransformation:
  """``matrix_tx`` for matrices, ``vector_tx`` for the rest.

  Args:
    matrix_tx, vector_tx: the two branches.
    param_labels: ``"matrix"``/``"vector"`` per leaf (a pytree like the params, or a function of
      them); None: ``shapes.matrix_labels`` (rank >= 2 is a matrix). Give it for stacked
      vectors (e.g. ``[layers, d]`` norm scales) or embeddings that should go to Adam.
  """
  labels = shapes.matrix_labels if param_labels is None else param_labels
  return optax.partition({shapes.MATRIX: matrix_tx, shapes.VECTOR: vector_tx}, labels)


def nonlinear_output(learning_rate: optax.ScalarOrSchedule, beta=0.95, nesterov: bool = True,
                     ns_steps=5, ns_coeffs=MUON_COEFFS, eps=1e-8,
                     memory: Optional[optax.GradientTransformation] = None, adam_b1=0.9,
                     adam_b2=0.999, adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
                     param_labels=None) -> optax.GradientTransformation:
  """``W ← W − η · shape_scale · NS(m(g))`` for matrices, Adam for vectors (Muon by default).

  With ``memory=None`` (the linear EMA momentum of ``scale_by_ema_momentum``) this equals
  ``optax.contrib.muon(learning_rate, ns_coeffs, ns_steps, beta, eps, nesterov=nesterov,
  adam_b1=adam_b1, adam_b2=adam_b2)`` on parameters of rank 2 and 1. Unlike optax, parameters of
  rank > 2 are orthogonalised as stacks of matrices over their last two axes.

  Args:
    learning_rate: η, a float or an optax schedule.
    beta, nesterov: the linear memory's retention and read (ignored when ``memory`` is given).
    ns_steps, ns_coeffs, eps: Newton–Schulz, as in ``newton_schulz`` (eps also goes to Adam).
    memory: the momentum memory whose output is orthogonalised; None for Muon's EMA momentum.
    adam_b1, adam_b2: Adam's retentions for vectors (Adam uses ``nesterov`` too, as optax does).
    adam_learning_rate: Adam's rate; None for ``learning_rate``.
    param_labels: which leaves are matrices, as in ``with_adam_for_vectors``.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.partition`` of the two branches).
  """
  validation.check_range("learning_rate", learning_rate, 0.0)
  memory = scale_by_ema_momentum(beta, nesterov) if memory is None else memory
  matrix_tx = optax.chain(memory, scale_by_newton_schulz(ns_steps, ns_coeffs, eps),
                          optax.scale_by_learning_rate(learning_rate))
  vector_tx = adam.adam_memory(learning_rate if adam_learning_rate is None else
                               adam_learning_rate, adam_b1, adam_b2, eps, nesterov=nesterov)
  return with_adam_for_vectors(matrix_tx, vector_tx, param_labels)
