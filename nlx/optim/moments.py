"""Element-wise moment memories: Adam's moments and Muon's momentum as one write rule.

A moment is an element-wise memory of a signal ``s`` (the gradient, or its square) with the L2
objective ``½‖m − s‖²`` (Adam as associative memory, Eq. 101 (docs/EQUATIONS.md)). One gradient step
of size ``1 − β`` on it is the exponential moving average,

    m ← m − (1 − β) · ∂/∂m ½‖m − s‖² = β m + (1 − β) s,

so Adam's two moments and Muon's momentum are this write with ``nlx.memory.L2``'s error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlx.memory import L2


def write_moment(moment, signal, beta):
  """One step of size ``1 − beta`` on ``½‖moment − signal‖²``, leaf by leaf (a pytree)."""
  return jax.tree.map(lambda m, s: m - (1 - beta) * L2.error(m, s.astype(m.dtype)),
                      moment, signal)


def debias(moment, beta, count):
  """``moment / (1 − beta**count)`` (Adam's bias correction); count is the step number >= 1."""
  correction = 1 - beta**count
  return jax.tree.map(lambda m: m / jnp.asarray(correction).astype(m.dtype), moment)


def read_first_moment(moment, grads, beta, count, nesterov: bool):
  """The debiased first moment, or its Nesterov look-ahead (Dozat 2016, as optax computes it).

  Args:
    moment: the first moment after this step's write.
    grads: this step's gradients.
    beta: the moment's decay.
    count: this step's number (>= 1).
    nesterov: use ``β m̂_{t+1} + (1 − β) ĝ_t`` instead of ``m̂_t``.
  """
  if not nesterov:
    return debias(moment, beta, count)
  ahead = debias(moment, beta, count + 1)
  now = debias(grads, beta, count)
  return jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, ahead, now)
