"""Adam written as two element-wise associative memories of the gradient.

Eq. 101 (docs/EQUATIONS.md). The first moment is a memory of ``g`` and the second a memory of
``g²``, each written by one step of the L2 objective (``moments.write_moment``: the exponential
moving average). The update reads them out, debiased, as ``m̂ / (√(v̂ + eps_root) + eps)``: the
optimum of Adam's element-wise objective (Eq. 105). ``adam_memory`` equals ``optax.adam``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlx import validation
from nlx.optim import moments


class AdamMemoryState(NamedTuple):
  """State of ``scale_by_adam_memory``.

  Attributes:
    count: int32 scalar, the number of steps taken.
    mu: memory of the gradient (first moment), shaped like the parameters.
    nu: memory of the squared gradient (second moment), shaped like the parameters.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_memory(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
                         nesterov: bool = False) -> optax.GradientTransformation:
  """Adam's scaling without the learning rate, as two moment memories.

  Args:
    b1, b2: retention of the first and second moment memories, in [0, 1).
    eps, eps_root: added outside and inside the square root of the second moment (>= 0).
    nesterov: read the first moment with Nesterov's look-ahead (NAdam).
  """
  validation.check_range("b1", b1, 0.0, 1.0, high_open=True)
  validation.check_range("b2", b2, 0.0, 1.0, high_open=True)
  validation.check_range("eps", eps, 0.0)
  validation.check_range("eps_root", eps_root, 0.0)

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return AdamMemoryState(jnp.zeros([], jnp.int32), zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    mu = moments.write_moment(state.mu, updates, b1)
    nu = moments.write_moment(state.nu, jax.tree.map(jnp.square, updates), b2)
    count = optax.safe_increment(state.count)
    mu_hat = moments.read_first_moment(mu, updates, b1, count, nesterov)
    nu_hat = moments.debias(nu, b2, count)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    return out, AdamMemoryState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_memory(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8,
                eps_root=0.0, nesterov: bool = False) -> optax.GradientTransformation:
  """Adam as a memory; equals ``optax.adam`` with the same arguments.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, nesterov: as in ``scale_by_adam_memory``.
  """
  validation.check_range("learning_rate", learning_rate, 0.0)
  return optax.chain(scale_by_adam_memory(b1, b2, eps, eps_root, nesterov),
                     optax.scale_by_learning_rate(learning_rate))
