"""Levels: parameter groups that update at their own period, and a nested-scan driver.

A :class:`Level` names a group of parameters, its period ``C`` (the group is updated once every
``C`` steps; ``C = 0`` means frozen in context, only an outer loop changes it) and its inner
optimizer, an optax ``GradientTransformation`` (so the same optimizer code serves inner and outer
loops). A "step" is whatever the stream is made of: tokens for CMS blocks updating in context,
training steps for multi-timescale optimizers, episodes for meta-learning. Everything here is
generic over pytrees.

Semantics (the contract every path in this module implements)
--------------------------------------------------------------
Let ``C_1 | C_2 | ... | C_L`` be the sorted nonzero periods (each divides the next). The stream is
cut into chunks of ``C_1`` steps that are processed in parallel by a user ``chunk_fn``, which
reports one scalar inner objective per nonzero-period level. For every chunk and every such level
``l``, the driver takes the gradient of level ``l``'s own loss with respect to level ``l``'s own
parameters (other levels' losses never move it), at the parameters current at the start of the
chunk, and adds it to the level's ``grad_sum``; the level's step counter advances by ``C_1``. When a
level's counter reaches its period, its optimizer is applied to the accumulated (summed) gradient::

    updates, opt_state = optimizer.update(grad_sum, opt_state, params)
    params = optax.apply_updates(params, updates)

and ``grad_sum`` and the counter are reset to zero. This is exactly a step-by-step stream in which
level ``l`` is updated after step ``t`` whenever ``(t + 1) % C_l == 0``, provided the per-chunk loss
is the sum of per-step losses.

Two implementations of this contract:

* :func:`tick` is the one-step update for streaming use (a step, or ``num_steps`` steps at once):
  accumulate, and update where the (possibly traced) counter reaches the period (``lax.cond``).
* :func:`scan_levels` runs a whole sequence as nested ``lax.scan`` s: the outermost scan steps over
  blocks of ``C_L`` steps, the next over the ``C_L / C_{L-1}`` sub-blocks of a block, ..., the
  innermost calls ``chunk_fn`` on one chunk of ``C_1`` steps. Each level's update is applied,
  unconditionally, at the end of its own scan body, which is where its counter reaches its period.
  This layout assumes the stream starts at a boundary of every level (all counters zero): true for
  fresh states from :func:`init_levels` and for states left by calls whose length is a multiple of
  ``C_L``. When the counters are concrete this is checked; under ``jax.jit`` they are traced and the
  caller is responsible for it (a misaligned start would update levels at the wrong steps). A
  remainder shorter than ``C_L`` at the end of the sequence is processed by a flat scan over
  ``C_1``-chunks that uses :func:`tick`, so the counters decide and the result is the same as the
  stream; a call shorter than ``C_L`` uses only that flat path and may start anywhere.

State
-----
Each level has a :class:`LevelState` ``(params, opt_state, grad_sum, step)``. ``grad_sum`` is kept
in at least float32 (bfloat16 parameters accumulate in float32). Frozen (period-0) levels carry
their parameters and an initialised optimizer state (for an outer loop that wants it) but no
gradient accumulator (``grad_sum`` is ``None``) and their counter stays 0.

Example::

    levels = (Level("fast", 4), Level("slow", 16, optax.adam(1e-3)), Level("base", 0))
    states = init_levels(levels, {"fast": p_fast, "slow": p_slow, "base": p_base})

    def chunk_fn(params, carry, xs_chunk):          # xs_chunk leaves: [4, ...]
        ...
        return {"fast": loss_fast, "slow": loss_slow}, (carry, ys_chunk)  # ys leaves: [4, ...]

    states, carry, ys = jax.jit(functools.partial(scan_levels, levels, chunk_fn))(
        states, carry, xs)                          # xs leaves: [T, ...], ys leaves: [T, ...]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = [
    "Level",
    "LevelState",
    "validate_levels",
    "init_levels",
    "tick",
    "scan_levels",
]

PyTree = Any
Losses = Mapping[str, jax.Array]
ChunkFn = Callable[[dict[str, PyTree], PyTree, PyTree], tuple[Losses, tuple[PyTree, PyTree]]]


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
# Nested-scan driver
# ---------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
  """Static description of one ``scan_levels`` call."""

  chunk_fn: ChunkFn
  active: tuple[Level, ...]  # nonzero-period levels, sorted by period
  periods: tuple[int, ...]  # the distinct nonzero periods, ascending: P_1 < ... < P_M
  groups: tuple[tuple[Level, ...], ...]  # groups[d]: the levels with period periods[d]


def scan_levels(
    levels: Sequence[Level],
    chunk_fn: ChunkFn,
    states: Mapping[str, LevelState],
    carry: PyTree,
    xs: PyTree,
) -> tuple[dict[str, LevelState], PyTree, PyTree]:
  """Run a sequence of T steps through ``chunk_fn``, updating each level at its period.

  See the module docstring for the semantics and for the alignment assumption of the nested
  path (the stream must start at a boundary of every level when ``T >= C_L``).

  Args:
    levels: the levels (any order).
    chunk_fn: ``chunk_fn(params, carry, xs_chunk) -> (losses, (carry, ys_chunk))``. ``params`` is
      ``{name: params}`` for every level (frozen ones included); ``xs_chunk`` has the leaves of
      ``xs`` restricted to ``C_1`` consecutive steps (leading axis ``C_1``, the smallest nonzero
      period); ``losses`` maps the name of every nonzero-period level to its scalar inner
      objective on the chunk (extra entries are allowed and ignored); ``ys_chunk`` leaves have
      leading axis ``C_1``; the returned ``carry`` must keep the structure, shapes and dtypes of
      the input one. When no level has a nonzero period, ``chunk_fn`` is called once on the
      whole sequence (leading axis T) and ``losses`` is ignored.
    states: ``{name: LevelState}`` for every level, e.g. from :func:`init_levels`.
    carry: any pytree threaded through the chunks in order.
    xs: pytree whose leaves all have leading axis T.

  Returns:
    ``(states, carry, ys)``: the states after the T steps, the final carry, and the ``ys_chunk``
    of all chunks concatenated in order (leaves with leading axis T).

  Raises:
    ValueError: invalid levels or states, leaves of ``xs`` without a common leading axis, T not a
      multiple of ``C_1``, concrete counters that are not all zero when ``T >= C_L``, or a
      ``chunk_fn`` whose losses or ys do not have the required form.
  """
  levels = validate_levels(levels)
  _check_names(levels, states, "states")
  n = _sequence_length(xs)
  active = _active(levels)
  frozen = {lv.name: states[lv.name].params for lv in levels if lv.period == 0}
  if not active:
    _, (carry, ys) = chunk_fn(dict(frozen), carry, xs)
    _check_ys(ys, n, "the whole sequence")
    return dict(states), carry, ys
  plan = _make_plan(chunk_fn, active)
  c1, c_last = plan.periods[0], plan.periods[-1]
  if n % c1:
    raise ValueError(
        f"Sequence length T={n} is not a multiple of the smallest nonzero period C_1={c1} "
        f"(level {active[0].name!r}); pad or trim xs to a multiple of {c1}"
    )
  n_main = n - n % c_last
  run = {lv.name: states[lv.name] for lv in active}
  ys_parts = []
  if n_main or n == 0:
    _check_aligned(active, run, c_last)
    run, carry, ys = _scan_nested(plan, frozen, run, carry, _slice(xs, 0, n_main))
    ys_parts.append(ys)
  if n_main < n:
    run, carry, ys = _scan_flat(plan, frozen, run, carry, _slice(xs, n_main, n))
    ys_parts.append(ys)
  ys = ys_parts[0] if len(ys_parts) == 1 else _concat(ys_parts)
  new_states = dict(states)
  new_states.update(run)
  return new_states, carry, ys


def _make_plan(chunk_fn: ChunkFn, active: tuple[Level, ...]) -> _Plan:
  periods = tuple(sorted({lv.period for lv in active}))
  groups = tuple(tuple(lv for lv in active if lv.period == p) for p in periods)
  return _Plan(chunk_fn, active, periods, groups)


def _chunk(
    plan: _Plan,
    frozen: Mapping[str, PyTree],
    states: Mapping[str, LevelState],
    carry: PyTree,
    xs_chunk: PyTree,
) -> tuple[dict[str, PyTree], PyTree, PyTree]:
  """Run ``chunk_fn`` on one chunk; each level's gradient of its own loss w.r.t. its own params.

  Returns:
    ``(grads, carry, ys_chunk)`` with ``grads = {name: gradient pytree}`` for the active levels.
  """
  active_params = {name: s.params for name, s in states.items()}

  def forward(p):
    losses, aux = plan.chunk_fn({**frozen, **p}, carry, xs_chunk)
    _check_losses(plan.active, losses)
    return {level.name: losses[level.name] for level in plan.active}, aux

  losses, vjp_fn, (carry, ys) = jax.vjp(forward, active_params, has_aux=True)
  _check_ys(ys, plan.periods[0], "one chunk")
  grads = {}
  for level in plan.active:
    cotangent = {
        k: (jnp.ones_like(v) if k == level.name else jnp.zeros_like(v)) for k, v in losses.items()
    }
    (all_grads,) = vjp_fn(cotangent)
    grads[level.name] = all_grads[level.name]
  return grads, carry, ys


def _scan_nested(
    plan: _Plan,
    frozen: Mapping[str, PyTree],
    states: dict[str, LevelState],
    carry: PyTree,
    xs: PyTree,
) -> tuple[dict[str, LevelState], PyTree, PyTree]:
  """Nested scans over whole blocks of ``C_L`` steps (``xs`` leading axis: a multiple of C_L)."""
  depth = len(plan.periods) - 1
  ratios = tuple(b // a for a, b in zip(plan.periods, plan.periods[1:]))[::-1]
  lead = ratios + (plan.periods[0],)  # [P_M/P_{M-1}, ..., P_2/P_1, P_1]
  n_blocks = _sequence_length(xs) // plan.periods[-1]
  xs = jax.tree.map(lambda x: x.reshape((n_blocks,) + lead + x.shape[1:]), xs)

  def body(c, x_block):
    s, cr = c
    s, cr, y = _block(plan, depth, frozen, s, cr, x_block)
    return (s, cr), y

  (states, carry), ys = lax.scan(body, (states, carry), xs)
  n_lead = len(lead) + 1
  ys = jax.tree.map(lambda y: y.reshape((n_blocks * plan.periods[-1],) + y.shape[n_lead:]), ys)
  return states, carry, ys


def _block(
    plan: _Plan,
    depth: int,
    frozen: Mapping[str, PyTree],
    states: dict[str, LevelState],
    carry: PyTree,
    xs: PyTree,
) -> tuple[dict[str, LevelState], PyTree, PyTree]:
  """One block of ``plan.periods[depth]`` steps; ends with the update of that period's levels."""
  if depth == 0:
    grads, carry, ys = _chunk(plan, frozen, states, carry, xs)
    states = {name: _accumulate(s, grads[name], plan.periods[0]) for name, s in states.items()}
  else:

    def body(c, x_sub):
      s, cr = c
      s, cr, y = _block(plan, depth - 1, frozen, s, cr, x_sub)
      return (s, cr), y

    (states, carry), ys = lax.scan(body, (states, carry), xs)
  states = dict(states)
  for level in plan.groups[depth]:
    states[level.name] = _update(level, states[level.name])
  return states, carry, ys


def _scan_flat(
    plan: _Plan,
    frozen: Mapping[str, PyTree],
    states: dict[str, LevelState],
    carry: PyTree,
    xs: PyTree,
) -> tuple[dict[str, LevelState], PyTree, PyTree]:
  """A flat scan over ``C_1``-chunks in which the counters decide the updates (via tick)."""
  c1 = plan.periods[0]
  n = _sequence_length(xs)
  xs = jax.tree.map(lambda x: x.reshape((n // c1, c1) + x.shape[1:]), xs)

  def body(c, x_chunk):
    s, cr = c
    grads, cr, y = _chunk(plan, frozen, s, cr, x_chunk)
    return (_tick(plan.active, s, grads, c1), cr), y

  (states, carry), ys = lax.scan(body, (states, carry), xs)
  ys = jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), ys)
  return states, carry, ys


# ---------------------------------------------------------------------------------------------
# Helpers and checks
# ---------------------------------------------------------------------------------------------


def _active(levels: tuple[Level, ...]) -> tuple[Level, ...]:
  return tuple(lv for lv in levels if lv.period > 0)


def _acc_dtype(x: Any) -> jnp.dtype:
  """Accumulator dtype: the leaf's dtype, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _slice(xs: PyTree, start: int, stop: int) -> PyTree:
  return jax.tree.map(lambda x: x[start:stop], xs)


def _concat(parts: list[PyTree]) -> PyTree:
  return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *parts)


def _sequence_length(xs: PyTree) -> int:
  leaves = jax.tree.leaves(xs)
  if not leaves:
    raise ValueError("xs must have at least one array leaf with a leading time axis T")
  shapes = [jnp.shape(x) for x in leaves]
  if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise ValueError(f"All leaves of xs must share a leading time axis T; got leaf shapes {shapes}")
  return shapes[0][0]


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


def _check_aligned(
    active: tuple[Level, ...], states: Mapping[str, LevelState], c_last: int
) -> None:
  """Refuse concrete nonzero counters on the nested path (traced ones cannot be checked)."""
  for level in active:
    try:
      step = int(states[level.name].step)
    except jax.errors.JAXTypeError:
      continue
    if step:
      raise ValueError(
          f"scan_levels runs whole blocks of C_L={c_last} steps as nested scans, which must "
          f"start at a boundary of every level, but level {level.name!r} (period "
          f"{level.period}) has step counter {step} (steps since its last update). Start "
          f"from fresh states (init_levels) or from states left by calls whose length is a "
          f"multiple of {c_last}, or advance the stream with tick (or calls shorter than "
          f"{c_last}) until every counter is 0"
      )


def _check_losses(active: tuple[Level, ...], losses: Any) -> None:
  if not isinstance(losses, Mapping):
    raise ValueError(
        f"chunk_fn must return losses as a dict keyed by level name, got "
        f"{type(losses).__name__}"
    )
  for level in active:
    if level.name not in losses:
      raise ValueError(
          f"chunk_fn returned no loss for level {level.name!r} (period {level.period}); "
          f"losses has keys {sorted(map(str, losses))}"
      )
    loss = losses[level.name]
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
      raise ValueError(
          f"chunk_fn's loss for level {level.name!r} must be a float scalar, got shape "
          f"{jnp.shape(loss)} dtype {jnp.result_type(loss)}"
      )


def _check_ys(ys: PyTree, n: int, what: str) -> None:
  for path, y in jax.tree_util.tree_leaves_with_path(ys):
    shape = jnp.shape(y)
    if not shape or shape[0] != n:
      raise ValueError(
          f"chunk_fn's ys leaf {jax.tree_util.keystr(path) or '<root>'} must have leading "
          f"axis {n} ({what}), got shape {shape}"
      )
