"""M3, multi-scale momentum Muon (docs/EQUATIONS.md §2, Algorithm 1).

Two momentum memories at two levels, orthogonalised by Newton–Schulz, and a second moment.
Algorithm 1 of the paper is two nested loops; k counts chunks of f steps:

    for k = 0, 1, 2, …:                                  slow level, once per chunk
      M2 ← d3 M2 + β3 Σ_{i=(k−1)f+1}^{kf} g_i            (the previous chunk's f gradients)
      O2 ← NS(M2)
      for t = kf+1, …, (k+1)f:                           fast level, every step
        M1 ← d1 M1 + β1 g_t
        V  ← d2 V  + β2 g_t²
        O1 ← NS(M1)
        W  ← W − η (O1 + α O2) / (√V + ε)

Reading choices:

* O2 is computed in the outer loop, so it is recomputed only when M2 changes and the f steps of a
  chunk share it. A step therefore reads O2 as it was at the start of its chunk: during the first
  chunk O2 = NS(0) = 0, and the gradients of chunk k reach O2 from step (k+1)f + 1 on, not at the
  chunk's last step. Here the write of M2 happens after the update of the chunk's last step, and
  O2 = NS(M2) is cached in the state (``M3State.slow_output``) and recomputed only at that write:
  one Newton–Schulz per f steps for the slow level instead of one per step, for one more buffer
  the size of the matrices.
* The paper writes the slow sum as Σ_{i=(k−1)f}^{kf} g_i, a closed range of f + 1 indices that
  would count every chunk-boundary gradient in two chunks (and names a g_0 that does not exist);
  it is read as the f gradients of the previous chunk.
* The published algorithm uses sums (``d1 = d2 = d3 = 1``, the defaults); decays < 1 give moving
  averages.

The slow level is an ``nlx.levels.Level`` with period f whose state is a ``LevelState`` (params =
M2, grad_sum = gradients since its last write, step = its own counter), advanced by
``nlx.levels.tick``. Parameters of rank < 2 go to Adam.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nlx import levels, validation
from nlx.optim import adam, newton_schulz

SLOW = "slow"


class M3State(NamedTuple):
  """State of ``scale_by_m3``.

  Attributes:
    fast: M1, the fast momentum (like the params).
    second_moment: V (like the params).
    slow: the slow level's ``LevelState``: ``params`` is M2, ``grad_sum`` the gradients since
      M2's last write, ``step`` the slow level's own counter.
    slow_output: O2 = NS(M2), recomputed only when M2 is written (like the params).
  """

  fast: optax.Updates
  second_moment: optax.Updates
  slow: levels.LevelState
  slow_output: optax.Updates


def _slow_write(beta3, decay3) -> optax.GradientTransformation:
  """The slow level's optimizer: ``M2 ← d3 M2 + β3 Σ g`` as an update ``(d3 − 1) M2 + β3 Σ g``."""

  def update_fn(grad_sum, state, params):
    return jax.tree.map(lambda s, m: beta3 * s + (decay3 - 1) * m, grad_sum, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_m3(beta1=1.0, beta2=1.0, beta3=1.0, alpha=1.0, slow_period: int = 100,
                decay1=1.0, decay2=1.0, decay3=1.0, eps=1e-8, ns_steps=5,
                ns_coeffs=newton_schulz.MUON_COEFFS) -> optax.GradientTransformation:
  """M3's scaling for matrices, without the learning rate (module docstring).

  Args:
    beta1, beta2, beta3: write strengths of M1, V and M2 (>= 0).
    alpha: weight of the slow momentum's output (>= 0).
    slow_period: f, the slow level's period (an int >= 1; static under
      ``optax.inject_hyperparams``: pass ``static_args=("slow_period",)``).
    decay1, decay2, decay3: retentions of M1, V, M2 in [0, 1] (1: the published sums).
    eps: added to √V.
    ns_steps, ns_coeffs: Newton–Schulz iterations and coefficients.
  """
  for name, value in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3), ("alpha", alpha),
                      ("eps", eps)):
    validation.check_range(name, value, 0.0)
  for name, value in (("decay1", decay1), ("decay2", decay2), ("decay3", decay3)):
    validation.check_range(name, value, 0.0, 1.0)
  validation.check_int("slow_period", slow_period, 1)
  validation.check_int("ns_steps", ns_steps, 0)

  def slow_levels(b3=beta3, d3=decay3):
    return (levels.Level(SLOW, int(slow_period), _slow_write(b3, d3)),)

  def orthogonalise(m):
    return newton_schulz.newton_schulz(m, ns_steps, ns_coeffs, eps)

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    slow = levels.init_levels(slow_levels(), {SLOW: zeros})[SLOW]
    # O2 of the first chunk: NS(M2 = 0) = 0.
    return M3State(zeros, zeros, slow, zeros)

  def update_fn(updates, state, params=None):
    del params
    fast = jax.tree.map(lambda m, g: decay1 * m + beta1 * g, state.fast, updates)
    second = jax.tree.map(lambda v, g: decay2 * v + beta2 * g * g, state.second_moment, updates)

    def combine(m1, o2, v):
      return (orthogonalise(m1) + alpha * o2) / (jnp.sqrt(v) + eps)

    # O2 of this step's chunk (module docstring): M2's write below reaches the next step only.
    out = jax.tree.map(combine, fast, state.slow_output, second)
    slow = levels.tick(slow_levels(), {SLOW: state.slow}, {SLOW: updates})[SLOW]
    # The counter is back at 0 exactly when M2 was written (period >= 1); only then does O2
    # change, so Newton–Schulz on M2 runs once per slow period.
    slow_output = jax.lax.cond(slow.step == 0, lambda m2: jax.tree.map(orthogonalise, m2),
                               lambda _: state.slow_output, slow.params)
    return out, M3State(fast, second, slow, slow_output)

  return optax.GradientTransformation(init_fn, update_fn)


def m3(learning_rate: optax.ScalarOrSchedule, beta1=1.0, beta2=1.0, beta3=1.0, alpha=1.0,
       slow_period: int = 100, decay1=1.0, decay2=1.0, decay3=1.0, eps=1e-8, ns_steps=5,
       ns_coeffs=newton_schulz.MUON_COEFFS, adam_b1=0.9, adam_b2=0.999,
       adam_learning_rate: Optional[optax.ScalarOrSchedule] = None, param_labels=None
       ) -> optax.GradientTransformation:
  """M3 for matrices (rank >= 2, stacked over leading axes), Adam for the other parameters.

  Args:
    learning_rate: η, a float or an optax schedule.
    beta1 ... ns_coeffs: as in ``scale_by_m3``.
    adam_b1, adam_b2: Adam's retentions for vectors.
    adam_learning_rate: Adam's rate; None for ``learning_rate``.
    param_labels: which leaves are matrices (``newton_schulz.with_adam_for_vectors``).
  """
  validation.check_range("learning_rate", learning_rate, 0.0)
  matrix_tx = optax.chain(
      scale_by_m3(beta1, beta2, beta3, alpha, slow_period, decay1, decay2, decay3, eps,
                  ns_steps, ns_coeffs),
      optax.scale_by_learning_rate(learning_rate))
  vector_tx = adam.adam_memory(learning_rate if adam_learning_rate is None else
                               adam_learning_rate, adam_b1, adam_b2, eps)
  return newton_schulz.with_adam_for_vectors(matrix_tx, vector_tx, param_labels)
