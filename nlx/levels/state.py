"""Levels and their state: the ``Level`` spec, ``LevelState``, ``init_levels`` and ``tick``.

``tick`` is the one-step form of the contract in ``nlx.levels``' docstring (accumulate, and
update where the counter reaches the period); ``nlx.levels.scan`` builds the nested-scan driver
from the same accumulate and update steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Specs and state
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Level:
  """A group of parameters updated in context every ``period`` steps.

  Attributes:
    name: non-empty identifier; keys the level's parameters, state, gradients and loss.
    period: update every ``period`` steps (an int >= 0). 0 means frozen: never updated in
      context, only by an outer loop.
    optimizer: the inner optimizer applied to the gradient accumulated over one period. ``None``
      means plain gradient descent with rate 1 (``optax.sgd(1.0)``), i.e. ``params -= grad_sum``.
  """

  name: str
  period: int
  optimizer: optax.GradientTransformation | None = None

  def __post_init__(self) -> None:
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Level.name must be a non-empty str, got {self.name!r}")
    if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 0:
      raise ValueError(
          f"Level {self.name!r}: period must be an int >= 0 (0 = frozen in context), "
          f"got {self.period!r}"
      )
    if self.optimizer is not None and not isinstance(self.optimizer, optax.GradientTransformation):
      raise ValueError(
          f"Level {self.name!r}: optimizer must be an optax.GradientTransformation or None "
          f"(plain gradient descent with rate 1), got {type(self.optimizer).__name__}"
      )

  @property
  def tx(self) -> optax.GradientTransformation:
    """The optimizer in effect: ``optimizer``, or ``optax.sgd(1.0)`` when it is ``None``."""
    return optax.sgd(1.0) if self.optimizer is None else self.optimizer


class LevelState(NamedTuple):
  """Per-level state carried through the driver.

  Attributes:
    params: the level's parameter pytree.
    opt_state: the level's optimizer state (``level.tx.init(params)``).
    grad_sum: gradient accumulated since the last update, same structure as ``params`` (float
      leaves kept in at least float32); ``None`` for frozen (period-0) levels.
    step: int32 scalar, number of steps since the last update (0 at every boundary).
  """

  params: PyTree
  opt_state: optax.OptState
  grad_sum: PyTree
  step: jax.Array


def validate_levels(levels: Sequence[Level]) -> tuple[Level, ...]:
  """Check a set of levels and return them sorted by period (frozen levels first).

  Args:
    levels: the levels, in any order.

  Returns:
    The levels as a tuple sorted by period (stable for equal periods).

  Raises:
    ValueError: an entry is not a ``Level``, two levels share a name, or two nonzero periods do
      not divide one another (each nonzero period must divide the next larger one).
  """
  levels = tuple(levels)
  for level in levels:
    if not isinstance(level, Level):
      raise ValueError(f"levels must contain Level objects, got {type(level).__name__}")
  names = [level.name for level in levels]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Level names must be unique; duplicated: {duplicates}")
  ordered = tuple(sorted(levels, key=lambda level: level.period))
  active = [level for level in ordered if level.period > 0]
  for faster, slower in zip(active, active[1:]):
    if slower.period % faster.period:
      raise ValueError(
          f"Level {slower.name!r} has period {slower.period}, which is not a multiple of "
          f"level {faster.name!r}'s period {faster.period}; periods of nested levels must "
          f"divide one another"
      )
  return ordered


def init_levels(levels: Sequence[Level], params: Mapping[str, PyTree]) -> dict[str, LevelState]:
  """Fresh states (zero counters, zero accumulators, initialised optimizers) for each level.

  Args:
    levels: the levels.
    params: ``{level name: parameter pytree}``, exactly one entry per level. Leaves of levels with
      a nonzero period must be floating-point (they are differentiated).

  Returns:
    ``{level name: LevelState}``.

  Raises:
    ValueError: invalid levels, a level missing from ``params``, an entry in ``params`` that is no
      level, or a non-float leaf in a nonzero-period level.
  """
  levels = validate_levels(levels)
  _check_names(levels, params, "params")
  states = {}
  for level in levels:
    p = params[level.name]
    if level.period > 0:
      _check_float_leaves(level, p)
      grad_sum = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _acc_dtype(x)), p)
    else:
      grad_sum = None
    states[level.name] = LevelState(
        params=p,
        opt_state=level.tx.init(p),
        grad_sum=grad_sum,
        step=jnp.zeros((), jnp.int32),
    )
  return states


# ---------------------------------------------------------------------------------------------
# One-step update
# ---------------------------------------------------------------------------------------------


def tick(
    levels: Sequence[Level],
    states: Mapping[str, LevelState],
    grads: Mapping[str, PyTree],
    num_steps: int | jax.Array = 1,
) -> dict[str, LevelState]:
  """Advance every level by ``num_steps`` steps; update the levels whose period is reached.

  For each level with a nonzero period: ``grad_sum += grads[name]`` and ``step += num_steps``;
  where ``step >= period`` the optimizer is applied to ``grad_sum`` and both are reset to zero.
  Frozen levels are returned unchanged. Jittable with traced counters and ``num_steps``.

  Args:
    levels: the levels.
    states: ``{name: LevelState}`` for every level.
    grads: ``{name: gradient pytree}`` for every nonzero-period level (the gradient of its loss
      summed over the ``num_steps`` steps, same structure as its params); entries for frozen
      levels are ignored.
    num_steps: how many steps these gradients cover (a positive int that divides every nonzero
      period, so that counters land exactly on the periods; checked when concrete).

  Returns:
    The new ``{name: LevelState}``.
  """
  levels = validate_levels(levels)
  _check_names(levels, states, "states")
  active = _active(levels)
  _check_grads(active, states, grads)
  _check_num_steps(active, num_steps)
  new_states = dict(states)
  new_states.update(_tick(active, states, grads, num_steps))
  return new_states


def _tick(
    active: Sequence[Level],
    states: Mapping[str, LevelState],
    grads: Mapping[str, PyTree],
    num_steps: int | jax.Array,
) -> dict[str, LevelState]:
  """``tick`` for nonzero-period levels, without validation."""
  out = {}
  for level in active:
    state = _accumulate(states[level.name], grads[level.name], num_steps)
    out[level.name] = lax.cond(
        state.step >= level.period, lambda s, lv=level: _update(lv, s), lambda s: s, state
    )
  return out


def _accumulate(state: LevelState, grad: PyTree, num_steps: int | jax.Array) -> LevelState:
  """Add a gradient to the accumulator and advance the counter."""
  grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), state.grad_sum, grad)
  step = (state.step + num_steps).astype(state.step.dtype)
  return state._replace(grad_sum=grad_sum, step=step)


def _update(level: Level, state: LevelState) -> LevelState:
  """Apply the level's optimizer to its accumulated gradient; reset accumulator and counter."""
  updates, opt_state = level.tx.update(state.grad_sum, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Keep the state's dtypes fixed so that it can be a scan carry / cond branch output.
  opt_state = jax.tree.map(
      lambda new, old: jnp.asarray(new, jnp.result_type(old)), opt_state, state.opt_state
  )
  return LevelState(
      params=params,
      opt_state=opt_state,
      grad_sum=jax.tree.map(jnp.zeros_like, state.grad_sum),
      step=jnp.zeros_like(state.step),
  )


# ---------------------------------------------------------------------------------------------
# Helpers and checks
# ---------------------------------------------------------------------------------------------


def _active(levels: tuple[Level, ...]) -> tuple[Level, ...]:
  return tuple(lv for lv in levels if lv.period > 0)


def _acc_dtype(x: Any) -> jnp.dtype:
  """Accumulator dtype: the leaf's dtype, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _check_names(levels: tuple[Level, ...], tree: Mapping[str, Any], what: str) -> None:
  if not isinstance(tree, Mapping):
    raise ValueError(f"{what} must be a dict keyed by level name, got {type(tree).__name__}")
  names = [lv.name for lv in levels]
  missing = [n for n in names if n not in tree]
  extra = sorted(str(k) for k in tree if k not in names)
  if missing or extra:
    raise ValueError(
        f"{what} must have exactly one entry per level {names}; "
        f"missing: {missing}, not a level: {extra}"
    )


def _check_float_leaves(level: Level, params: PyTree) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"Level {level.name!r} (period {level.period}) is differentiated, so its params "
          f"must be floating point; leaf {jax.tree_util.keystr(path) or '<root>'} has dtype "
          f"{jnp.result_type(leaf)}"
      )


def _check_grads(
    active: tuple[Level, ...], states: Mapping[str, LevelState], grads: Mapping[str, PyTree]
) -> None:
  if not isinstance(grads, Mapping):
    raise ValueError(f"grads must be a dict keyed by level name, got {type(grads).__name__}")
  for level in active:
    if level.name not in grads:
      raise ValueError(
          f"grads has no entry for level {level.name!r} (period {level.period}); every "
          f"nonzero-period level needs one"
      )
    want = jax.tree.structure(states[level.name].grad_sum)
    got = jax.tree.structure(grads[level.name])
    if want != got:
      raise ValueError(
          f"grads[{level.name!r}] must have the structure of the level's params {want}, "
          f"got {got}"
      )


def _check_num_steps(active: tuple[Level, ...], num_steps: int | jax.Array) -> None:
  try:
    k = int(num_steps)
  except jax.errors.JAXTypeError:  # traced: cannot check
    return
  if isinstance(num_steps, bool) or k <= 0:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  for level in active:
    if level.period % k:
      raise ValueError(
          f"num_steps={k} does not divide level {level.name!r}'s period {level.period}; "
          f"the counter would step over the period"
      )
