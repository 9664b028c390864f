"""``nlx aot``: compile the full train step for a TPU topology on any machine (MaxText's
train_compile), and estimate memory, FLOPs, step time and MFU from the chip's peak.

The mesh of ``config.mesh`` is laid over the topology's devices (``jax.experimental.topologies``
with ``libtpu``, the ``tpu`` extra); the train state and the batch are abstract arrays with their
shardings, so nothing is allocated. The estimate is a roofline: ``step_s = max(flops / peak,
bytes accessed / HBM bandwidth)`` per chip, and ``mfu = 6·N·tokens / (step_s · peak · chips)``
(attention FLOPs excluded, as is usual for MFU).
"""

from __future__ import annotations

import math

import jax

from nlx.train import config as run_config
from nlx.train import sharding
from nlx.train import step as step_lib

# Per chip: peak bf16 FLOP/s, HBM bytes, HBM bytes/s (Cloud TPU documentation).
CHIPS = {"v4": (275e12, 32 * 2**30, 1.2e12), "v5e": (197e12, 16 * 2**30, 0.82e12),
         "v5p": (459e12, 95 * 2**30, 2.76e12), "v6e": (918e12, 32 * 2**30, 1.64e12)}


def compile_for_topology(cfg, topology: str) -> dict:
  """Compiles the train step of ``cfg`` for ``topology`` (``"v5p:4x4x4"``); returns the report."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = topology.split(":")[0]
  if chip not in CHIPS:
    raise ValueError(f"--topology {topology!r}: chip {chip!r} is not known; allowed: "
                     f"{sorted(CHIPS)} (as 'v5p:4x4x4')")
  devices = topologies.get_topology_desc(topology, "tpu").devices
  run = run_config.validate(cfg, n_devices=len(devices))
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh, devices))
  t = run.train
  batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jax.numpy.int32,
                               sharding=trainer.batch_sharding)
  compiled = step_lib.jit_train_step(trainer).lower(trainer.abstract_state, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  peak, hbm, bandwidth = CHIPS[chip]
  per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
                memory.output_size_in_bytes - memory.alias_size_in_bytes)
  flops = float(cost.get("flops", 0.0))
  step_s = max(flops / peak, float(cost.get("bytes accessed", 0.0)) / bandwidth)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
  model_flops = 6 * n_params * t.batch_size * t.seq_len
  return {
      "family": run.model.family, "params": n_params, "topology": topology,
      "chips": len(devices), "mesh": run.mesh.resolve(len(devices)), "batch_size": t.batch_size,
      "seq_len": t.seq_len, "compute_dtype": t.compute_dtype,
      "bytes_per_device": per_device, "argument_bytes": memory.argument_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes, "hbm_bytes": hbm, "fits": per_device <= hbm,
      "flops_per_step": flops * len(devices), "flops_per_device": flops,
      "step_s_estimate": step_s,
      "mfu_estimate": model_flops / (step_s * peak * len(devices)) if step_s else None,
  }
