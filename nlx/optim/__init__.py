"""Optimizers as optax transforms whose state is an associative memory (docs/OPTIMIZERS.md).

* ``momentum_memory``: momentum with the dot-product objective (= ``optax.sgd`` with momentum)
  or the L2 objective (delta momentum); ``preconditioned_momentum``: ``m ← β m + P ∇L``.
* ``deep_momentum``: DMGD, the momentum is an MLP memory trained by its own inner objective.
* ``nonlinear_output``: the momentum read through Newton–Schulz (= Muon for the linear memory).
* ``adam_memory``: Adam as two element-wise L2 memories (= ``optax.adam``).
* ``m3``: multi-scale momentum Muon, its slow level with its own step counter.
* ``level_schedule``: parameter groups with periods (CMS at training time; period 0 freezes).
* ``meta``: meta-learning DMGD's initial memory and rates through unrolled inner training.

Every transform has a NamedTuple state whose parameter-shaped leaves shard like the parameters,
and works under ``jax.jit`` and ``optax.inject_hyperparams`` (integer arguments that fix shapes
or periods, ``hidden``, ``seed`` and ``slow_period``, go in ``static_args``).
"""

from nlx.optim import meta
from nlx.optim.adam import AdamMemoryState, adam_memory, scale_by_adam_memory
from nlx.optim.deep_momentum import (DeepMomentumState, deep_momentum, init_memory,
                                     scale_by_deep_momentum)
from nlx.optim.level_schedule import PeriodicState, every, level_schedule
from nlx.optim.m3 import M3State, m3, scale_by_m3
from nlx.optim.momentum import (MomentumMemoryState, momentum_memory, preconditioned_momentum,
                                scale_by_momentum_memory)
from nlx.optim.newton_schulz import (EmaMomentumState, newton_schulz, nonlinear_output,
                                     scale_by_ema_momentum, scale_by_newton_schulz)

__all__ = [
    "momentum_memory", "preconditioned_momentum", "scale_by_momentum_memory",
    "MomentumMemoryState", "deep_momentum", "scale_by_deep_momentum", "init_memory",
    "DeepMomentumState", "nonlinear_output", "newton_schulz", "scale_by_newton_schulz",
    "scale_by_ema_momentum", "EmaMomentumState", "adam_memory", "scale_by_adam_memory",
    "AdamMemoryState", "m3", "scale_by_m3", "M3State", "level_schedule", "every",
    "PeriodicState", "meta",
]
