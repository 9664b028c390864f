"""Parameter groups with their own update periods: CMS at training time and continual learning.

Each group of parameters is an ``nlx.levels.Level`` (name, period C, inner optimizer). A group
with period C sums its gradients and applies its optimizer to the sum once every C steps, and
outputs zero updates in between: for plain SGD this is Eq. 71 of the paper,
``θ ← θ − η Σ_{last C steps} ∇L``, the training-time form of the Continuum Memory System. A
group with period 0 is frozen (zero updates, no state), which is how continual learning keeps
what earlier tasks wrote into slow or frozen levels. The counters follow ``nlx.levels``: group
l updates after step t when ``(t + 1) % C_l == 0``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from nlx import levels, validation

PyTree = Any


class PeriodicState(NamedTuple):
  """State of ``every``.

  Attributes:
    grad_sum: gradients summed since the last update (like the params).
    step: int32 scalar, steps since the last update (0 at every boundary).
    inner: the inner optimizer's state (advanced only at updates).
  """

  grad_sum: optax.Updates
  step: jax.Array
  inner: optax.OptState


def every(period: int, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Apply ``tx`` to the sum of the gradients of the last ``period`` steps, every ``period`` steps.

  Between updates the output is zero. ``tx`` sees one step per ``period`` steps (its own
  counter, e.g. Adam's bias correction, advances once per update).

  Args:
    period: C, an int >= 1.
    tx: the inner optimizer.
  """
  validation.check_int("period", period, 1)

  def init_fn(params):
    return PeriodicState(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32),
                         tx.init(params))

  def update_fn(updates, state, params=None):
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), state.grad_sum, updates)
    step = state.step + 1

    def apply(operand):
      summed, inner = operand
      out, inner = tx.update(summed, inner, params)
      inner = jax.tree.map(lambda new, old: jnp.asarray(new, jnp.result_type(old)), inner,
                           state.inner)
      out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
      return out, PeriodicState(jax.tree.map(jnp.zeros_like, summed), jnp.zeros_like(step),
                                inner)

    def wait(operand):
      summed, inner = operand
      return jax.tree.map(jnp.zeros_like, updates), PeriodicState(summed, step, inner)

    return jax.lax.cond(step >= period, apply, wait, (grad_sum, state.inner))

  return optax.GradientTransformation(init_fn, update_fn)


def level_schedule(groups: Sequence[levels.Level],
                   param_labels: Union[PyTree, Callable[[PyTree], PyTree]]
                   ) -> optax.GradientTransformation:
  """One ``Level`` per parameter group: each steps at its own period, period 0 freezes it.

  Args:
    groups: the levels; ``name`` is the group's label, ``period`` its period (0 = frozen) and
      ``tx`` its optimizer (``optax.sgd(1.0)`` when ``optimizer`` is None). Periods need not
      divide one another here (each group has its own counter).
    param_labels: a pytree like the params with a group name at every leaf, or a function of
      the params returning one.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.partition`` over the groups).

  Example::

      groups = (Level("fast", 1, optax.adam(1e-3)), Level("slow", 16, optax.adam(1e-3)),
                Level("old_task", 0))
      tx = level_schedule(groups, {"mlp1": "fast", "mlp2": "slow", "head": "old_task"})
  """
  groups = tuple(groups)
  for group in groups:
    if not isinstance(group, levels.Level):
      raise ValueError(f"groups must contain nlx.levels.Level objects, got {group!r}")
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"groups={names} has duplicate names; each group needs its own")
  transforms = {g.name: every(g.period, g.tx) if g.period else optax.set_to_zero()
                for g in groups}
  return optax.partition(transforms, param_labels)
