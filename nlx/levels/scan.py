"""The nested-scan driver ``scan_levels``: a whole sequence, each level updated at its period.

The outermost ``lax.scan`` steps over blocks of ``C_L`` steps, the next over the sub-blocks of a
block, ..., the innermost calls ``chunk_fn`` on one chunk of ``C_1`` steps; a remainder shorter
than ``C_L`` runs as a flat scan whose counters decide the updates (``tick``'s). The contract is
in ``nlx.levels``' docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlx.levels.state import (Level, LevelState, PyTree, _accumulate, _active, _check_names,
                              _tick, _update, validate_levels)

Losses = Mapping[str, jax.Array]
ChunkFn = Callable[[dict[str, PyTree], PyTree, PyTree], tuple[Losses, tuple[PyTree, PyTree]]]


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
