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

Two implementations of this contract, one module each:

* :func:`tick` (``nlx/levels/state.py``, with the specs and the state) is the one-step update
  for streaming use (a step, or ``num_steps`` steps at once): accumulate, and update where the
  (possibly traced) counter reaches the period (``lax.cond``).
* :func:`scan_levels` (``nlx/levels/scan.py``) runs a whole sequence as nested ``lax.scan`` s:
  the outermost scan steps over blocks of ``C_L`` steps, the next over the ``C_L / C_{L-1}``
  sub-blocks of a block, ..., the innermost calls ``chunk_fn`` on one chunk of ``C_1`` steps.
  Each level's update is applied, unconditionally, at the end of its own scan body, which is
  where its counter reaches its period.
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

from nlx.levels.scan import scan_levels
from nlx.levels.state import Level, LevelState, init_levels, tick, validate_levels

__all__ = [
    "Level",
    "LevelState",
    "validate_levels",
    "init_levels",
    "tick",
    "scan_levels",
]
