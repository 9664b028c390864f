"""``nlx aot``: compile the full train step for a TPU topology on any machine (MaxText's
train_compile; the step ``nlx train`` runs, ``step.jit_guarded_step``), and estimate memory, FLOPs, step time and MFU from the chip's peak.

The mesh of ``config.mesh`` is laid over the topology's devices (``jax.experimental.topologies``
with ``libtpu``, the ``tpu`` extra); the train state and the batch are abstract arrays with their
shardings, so nothing is allocated. ``num_slices`` > 1 compiles for a multislice run: that many
copies of the topology, each device with its ``slice_index``, the mesh laid over them as
``sharding.make_mesh`` does on the pod (``mesh.dcn_*`` across the slices).

Memory (per device, from the compiled executable's ``memory_analysis``): ``bytes_per_device`` is
arguments + temporaries + outputs - aliased (donated) bytes, MaxText's sum; ``peak_bytes`` is
XLA's own peak of live buffers. ``temp_bytes`` counts HBM temporaries only: TPU memory-space
assignment places small temporaries in on-chip VMEM, so a tiny model reports 0 (with
``LIBTPU_INIT_ARGS=--xla_vf_vmem_memory_space_assignment=false`` the same v5e compile reports its
temporaries in ``temp_bytes``).

FLOPs: XLA's ``cost_analysis`` counts the body of a while loop once, so for the scanned layers of
nlx it misses all but one layer (``xla_flops_per_device`` is reported as is). ``flops_per_step``
counts the matmul and convolution FLOPs of the step's jaxpr instead, multiplying every
``lax.scan`` body by its length; it includes the backward pass and the recomputation of
``model.remat``. The estimate is a roofline: ``step_s = max(flops_per_step / chips / peak,
xla bytes accessed / HBM bandwidth)`` (the bytes, like XLA's FLOPs, count a loop body once: a
lower bound), and ``mfu = 6·N·tokens / (step_s · peak · chips)`` (attention FLOPs excluded, as is
usual for MFU). ``chips`` counts every slice; the estimate leaves out the data-center network, so
for several slices it is the step time of a network as fast as ICI.
"""

from __future__ import annotations

import math
import re

import jax
from jax.extend import core as jax_core

from nlx.train import config as run_config
from nlx.train import sharding
from nlx.train import step as step_lib

# Per chip: peak bf16 FLOP/s, HBM bytes, HBM bytes/s (Cloud TPU documentation).
CHIPS = {"v4": (275e12, 32 * 2**30, 1.2e12), "v5e": (197e12, 16 * 2**30, 0.82e12),
         "v5p": (459e12, 95 * 2**30, 2.76e12), "v6e": (918e12, 32 * 2**30, 1.64e12)}


def _eqn_flops(eqn) -> float:
  """FLOPs of one ``dot_general`` (2·|out|·K) or ``conv_general_dilated`` equation; else 0."""
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
  return 0.0


def jaxpr_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of a (closed) jaxpr, every ``scan`` body times its length.

  A ``cond`` counts its costliest branch; a ``while`` body (unknown trip count) counts once.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    inner = [jaxpr_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
    if not inner:
      continue
    if eqn.primitive.name == "cond":
      total += max(inner)
    else:
      total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def _topology_devices(topology: str, num_slices: int = 1) -> tuple[str, list]:
  """The chip name and the compile-only devices of ``num_slices`` slices of ``topology``."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = topology.split(":")[0]
  if chip not in CHIPS:
    raise ValueError(f"--topology {topology!r}: chip {chip!r} is not known; allowed: "
                     f"{sorted(CHIPS)} (as 'v5p:4x4x4')")
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--num_slices {num_slices!r}: allowed: an integer >= 1 (the slices of "
                     f"{topology!r} joined by the data-center network)")
  # Multislice: libtpu gives num_slices copies of the slice, each device with its slice_index.
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  return chip, list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)


def _memory_report(memory, hbm: int) -> dict:
  per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
                memory.output_size_in_bytes - memory.alias_size_in_bytes)
  peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
  return {"bytes_per_device": per_device, "peak_bytes": peak,
          "argument_bytes": memory.argument_size_in_bytes,
          "temp_bytes": memory.temp_size_in_bytes, "hbm_bytes": hbm,
          "fits": max(per_device, peak) <= hbm}


def _out_of_memory_report(error: Exception, argument_bytes: int, hbm: int) -> dict:
  """The memory fields of a step the TPU compiler refused (``RESOURCE_EXHAUSTED``).

  ``temp_bytes`` is the requirement the compiler names (``"... HLO temporaries (40.01G)"``),
  when it names one; ``argument_bytes`` is the per-device shard of the state and the batch.
  """
  message = str(error).strip().splitlines()[0]
  found = re.search(r"\(([\d.]+)([KMGT]?)\)", message)
  temp = (int(float(found.group(1)) * 1024**" KMGT".index(found.group(2) or " "))
          if found else 0)
  return {"bytes_per_device": argument_bytes + temp, "peak_bytes": None,
          "argument_bytes": argument_bytes, "temp_bytes": temp, "hbm_bytes": hbm,
          "fits": False, "error": message}


def _shard_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of the abstract arrays (``ShapeDtypeStruct``s with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def compile_for_topology(cfg, topology: str, num_slices: int = 1) -> dict:
  """Compiles the train step of ``cfg`` for ``topology`` (``"v5p:4x4x4"``); returns the report.

  Args:
    cfg: the run config (a ConfigDict or mapping).
    topology: ``chip:shape`` of one slice, as ``"v5e:2x2"``.
    num_slices: slices of ``topology`` (multislice over the data-center network, DCN): the mesh's
      ``mesh.dcn_*`` sizes must multiply to it (one of them may be -1), and each mesh axis is
      ``ici × dcn`` long.

  Returns:
    The report: the chips (all slices), ``slices``, the mesh (total sizes per axis) and its
    ``dcn`` part, memory per device, FLOPs, the step-time and MFU estimates. A step that does not
    fit the chip's HBM is reported with ``"fits": false`` (and the compiler's ``error`` when it
    refuses to compile), not raised.
  """
  chip, devices = _topology_devices(topology, num_slices)
  run = run_config.validate(cfg, n_devices=len(devices), n_slices=num_slices)
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh, devices))
  t = run.train
  batch = step_lib.abstract_batch(trainer, t.batch_size, t.seq_len)  # with segment ids if packed
  # The step `nlx train` runs: the train step with its finite checks folded into the guard.
  n_params = len(step_lib.param_paths(trainer.abstract_state["params"]))
  guard = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=sharding.replicated(trainer.mesh)),
                       jax.eval_shape(lambda: step_lib.init_guard(n_params)))
  args = (trainer.abstract_state, guard, batch)
  train_step = step_lib.jit_guarded_step(trainer)
  flops = jaxpr_flops(jax.make_jaxpr(train_step)(*args))
  peak, hbm, bandwidth = CHIPS[chip]
  try:
    compiled = train_step.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled = None
    memory = _out_of_memory_report(e, _shard_bytes(args), hbm)
  else:
    memory = _memory_report(compiled.memory_analysis(), hbm)
  cost = (compiled.cost_analysis() if compiled is not None else None) or {}
  cost = cost[0] if isinstance(cost, list) else cost
  chips = len(devices)
  step_s = max(flops / chips / peak, float(cost.get("bytes accessed", 0.0)) / bandwidth)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
  model_flops = 6 * n_params * t.batch_size * t.seq_len
  return {
      "family": run.model.family, "params": n_params, "topology": topology, "chips": chips,
      "slices": num_slices, "mesh": run.mesh.resolve(chips, num_slices),
      "dcn": run.mesh.resolve_ici_dcn(chips, num_slices)[1], "batch_size": t.batch_size,
      "seq_len": t.seq_len,
      "compute_dtype": t.compute_dtype, "remat": run.model.remat, **memory,
      "flops_per_step": flops, "flops_per_device": flops / chips,
      "xla_flops_per_device": float(cost["flops"]) if "flops" in cost else None,
      "step_s_estimate": step_s,
      "mfu_estimate": model_flops / (step_s * peak * chips) if step_s else None,
  }
