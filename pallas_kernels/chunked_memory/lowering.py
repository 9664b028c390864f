"""Ahead-of-time lowering of the kernels, with no accelerator attached.

* ``compile_tpu(kind, topology)``: compiles forward + backward (``jax.value_and_grad``) for a TPU
  topology (e.g. ``"v5e:2x2"``, ``"v5p:2x2x1"``) with ``libtpu`` (the ``tpu`` extra) and
  ``jax.experimental.topologies``, under ``shard_map`` over all of the topology's chips (batch
  split across chips), and returns what XLA reports: the Mosaic custom calls it holds, the cost
  analysis and the memory analysis.
* ``export_gpu(kind)``: lowers forward + backward for platform ``cuda`` through ``jax.export``
  and returns the Triton custom calls of the module (their Triton IR is embedded in it).

Both take ``reset=True`` to lower the kernels with document boundaries (a ``[B, T]`` bool input;
every kind: ``ops.RESET_KINDS``).

``python -m pallas_kernels.chunked_memory.lowering tpu v5e:2x2 [--shape B,T,H,K,V,C] [--mode
forward] [--reset] [--qkv flat]`` (or ``gpu``) prints the result of every kind (with ``--reset``: every kind
that takes boundaries) as JSON. libtpu takes a machine-wide lock when loaded; set
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` to run beside other processes that load it.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_memory.chunk import KINDS
from pallas_kernels.chunked_memory.ops import RESET_KINDS, chunked_memory

# (B per chip, T, H, K, V, chunk): small, but every grid axis has more than one step.
SHAPE = (2, 256, 2, 64, 128, 64)


def _loss(kind: str, backend: str, chunk: int, block_sizes=None, heads: int = 0):
  """A scalar of every output of the kernels, as a function of every input (``reset``: the
  document boundaries, or None). ``heads``: q, k, v arrive as ``[B, T, H·D]`` (what a projection
  produces) and are reshaped to ``[B, T, H, D]`` here (``--qkv flat``); 0: as ``[B, T, H, D]``."""

  def loss(q, k, v, beta, g, momentum, s0, reset=None):
    if heads:
      q, k, v = (x.reshape(x.shape[:2] + (heads, x.shape[2] // heads)) for x in (q, k, v))
    kw = dict(g=g, initial_state=s0, chunk_size=chunk, backend=backend, interpret=False,
              reset=reset, block_sizes=block_sizes)
    if kind != "linear_attention":
      kw["beta"] = beta
    if kind == "titans":
      kw["momentum"] = momentum
    o, s, p = chunked_memory(kind, q, k, v, **kw)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s) + (0.0 if p is None else jnp.sum(p))

  return loss


def _loss_and_grads(kind: str, backend: str, chunk: int, block_sizes=None, heads: int = 0):
  """``value_and_grad`` of ``_loss`` w.r.t. every input (forward and backward kernels)."""
  return jax.value_and_grad(_loss(kind, backend, chunk, block_sizes, heads),
                            argnums=tuple(range(7)))


def _tilings():
  """``--tiling`` of the TPU phase kernels: the default (head-strided where K, V are multiples of
  128, several chunks per grid step), or the earlier one (XLA transposes, one chunk per step)."""
  from pallas_kernels.chunked_memory.ops import BlockSizes  # pylint: disable=g-import-not-at-top
  return {"default": None,
          "transposed": BlockSizes(head_strided=False, chunks_per_step=1)}


def layout_copies(hlo: str) -> dict:
  """The ``copy``/``transpose`` instructions of a compiled module's text outside the kernels
  (XLA's layout changes: on TPU a transpose of ``[B, T, H, D]`` shows up as a ``copy`` to a new
  layout), counted and sized by their result shapes."""
  return _count(hlo, "(?:copy|transpose)")


def layout_reshapes(hlo: str) -> dict:
  """The ``reshape`` instructions left in a compiled module (``layout_copies``' format): after
  layout assignment XLA turns every reshape that keeps the bytes in place into a ``bitcast``, so
  a ``reshape`` that remains moves data, e.g. re-tiles ``[B, T, H, D]`` (tiles over H, D) into
  ``[B, T, H·D]`` (tiles over T, H·D)."""
  return _count(hlo, "reshape")


def _count(hlo: str, op: str) -> dict:
  import re  # pylint: disable=g-import-not-at-top
  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "pred": 1, "f64": 8, "u32": 4, "s8": 1}
  count, nbytes, shapes = 0, 0, []
  for m in re.finditer(rf"= (\w+)\[([\d,]*)\]\S* {op}\(", hlo):
    n = 1
    for d in filter(None, m.group(2).split(",")):
      n *= int(d)
    count += 1
    nbytes += n * sizes.get(m.group(1), 4)
    shapes.append(f"{m.group(1)}[{m.group(2)}]")
  return {"count": count, "bytes": nbytes, "shapes": sorted(shapes)}


def _arg_shapes(batch: int, shape=SHAPE, sharding=None, reset: bool = False, flat: bool = False):
  _, t, h, dk, dv, _ = shape
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  gate = s((batch, t, h), jnp.float32)
  seq = lambda d: s((batch, t, h * d) if flat else (batch, t, h, d), jnp.bfloat16)
  args = (seq(dk), seq(dk), seq(dv), gate, gate, gate, s((batch, h, dk, dv), jnp.float32))
  return args + ((s((batch, t), jnp.bool_),) if reset else ())


def _check_reset_kind(kind: str, reset: bool):
  if reset and kind not in RESET_KINDS:
    raise ValueError(f"reset=True is only for kinds {RESET_KINDS}; got kind={kind!r}")


def compile_tpu(kind: str, topology: str = "v5e:2x2", shape=SHAPE, mode: str = "both",
                reset: bool = False, tiling: str = "default", qkv: str = "heads") -> dict:
  """Compiles ``kind`` for ``topology``; returns XLA's report.

  Args:
    shape: (B per chip, T, H, K, V, chunk).
    mode: "both" (forward + backward, ``value_and_grad``) or "forward".
    reset: with document boundaries (a ``[B, T]`` bool input).
    tiling: a key of ``_tilings()``.
    qkv: "heads": q, k, v (and their gradients) are ``[B, T, H, D]`` arguments (results) of
      the compiled step; "flat": ``[B, T, H·D]``, reshaped inside (as a projection gives them).
  """
  _check_reset_kind(kind, reset)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(topology, "tpu")
  mesh = Mesh(topo.devices, ("data",))
  make = _loss if mode == "forward" else _loss_and_grads
  heads = shape[2] if qkv == "flat" else 0
  fn = jax.shard_map(make(kind, "tpu", shape[-1], _tilings()[tiling], heads), mesh=mesh,
                     in_specs=P("data"), out_specs=P(), check_vma=False)
  args = _arg_shapes(shape[0] * len(topo.devices), shape, NamedSharding(mesh, P("data")), reset,
                     flat=bool(heads))
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  return {
      "kind": kind, "topology": topology, "chips": len(topo.devices),
      "device_kind": topo.devices[0].device_kind, "shape_BTHKVC": shape, "mode": mode,
      "reset": reset, "tiling": tiling, "qkv": qkv, "layout_copies": layout_copies(hlo),
      "layout_reshapes": layout_reshapes(hlo),
      "kernel_operands": _kernel_operands(lowered.as_text(), kind),
      "mosaic_custom_calls": hlo.count('custom_call_target="tpu_custom_call"'),
      "kernels": kernel_names(lowered.as_text(), kind),
      "cost_analysis": {k: float(v) for k, v in (compiled.cost_analysis() or {}).items()},
      "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "memory_bytes": {name: getattr(memory, f"{name}_size_in_bytes", None)
                       for name in ("argument", "output", "temp", "alias", "generated_code")},
      "kernel_cost_estimates": kernel_cost_estimates(kind, shape, len(topo.devices)),
  }


def kernel_cost_estimates(kind: str, shape=SHAPE, chips: int = 1) -> dict:
  """The ``pl.CostEstimate`` each of ``kind``'s phase kernels passes to XLA, per chip, at
  ``shape`` (B per chip, T, H, K, V, chunk) in bfloat16 (``layout.phase_cost``, the function the
  kernels call)."""
  from pallas_kernels.chunked_memory import layout as lay  # pylint: disable=g-import-not-at-top
  del chips
  b, t, h, dk, dv, c = shape
  n = -(-t // c)
  names = {"fwd_ut": "ut", "fwd_state": "state", "fwd_out": "out", "bwd_dvl": "dvl",
           "bwd_state": "bwd_state", "bwd_grad": "grad", "fwd_coef": "coef"}
  out = {}
  for name in PHASE_KERNELS.get(kind, ()):
    # Titans is lowered with momentum (``_loss``), as its kernels then run.
    est = lay.phase_cost(names[name], b * h, n, c, dk, dv, jnp.bfloat16, kind,
                         momentum=kind == "titans")
    out[f"nlx_{kind}_{name}"] = {"flops": est.flops, "transcendentals": est.transcendentals,
                                 "bytes_accessed": est.bytes_accessed}
  return out


# The kernels of each kind (phase kernels: ``phases.py``, ``titans_phases.py``; Titans as lowered
# here, with momentum: its coefficient kernel runs only then).
PHASE_KERNELS = {"delta_rule": ("fwd_ut", "fwd_state", "fwd_out", "bwd_dvl", "bwd_state",
                                "bwd_grad"),
                 "linear_attention": ("fwd_state", "fwd_out", "bwd_state", "bwd_grad"),
                 "titans": ("fwd_coef", "fwd_state", "fwd_out", "bwd_dvl", "bwd_state",
                            "bwd_grad")}


def expected_kernels(kind: str) -> list:
  """The names of ``kind``'s kernels in a forward + backward module, sorted."""
  return sorted(f"nlx_{kind}_{p}" for p in PHASE_KERNELS.get(kind, ("fwd", "bwd")))


def kernel_names(text: str, kind: str) -> list:
  """The names of ``kind``'s kernels that occur in a lowered module's text, sorted."""
  import re  # pylint: disable=g-import-not-at-top
  return sorted(set(re.findall(rf"nlx_{kind}_(?:fwd|bwd)\w*", text)))


def _kernel_operands(text: str, kind: str) -> dict:
  """``{kernel name: operand count}`` of the custom calls named ``nlx_{kind}_fwd``/``_bwd`` in a
  lowered module's text (both kernels are calls of one line each)."""
  found = {}
  for line in text.splitlines():
    for name in expected_kernels(kind):
      if "custom_call" in line and name in line and "(" in line:
        args = line.split("(", 1)[1].split(")", 1)[0]
        found[name] = len([a for a in args.split(",") if a.strip()])
  return found


def _export_cuda(kind: str, reset: bool, shape, block_sizes=None):
  from jax import export  # pylint: disable=g-import-not-at-top
  target = "__gpu$xla.gpu.triton"
  return export.export(
      jax.jit(_loss_and_grads(kind, "gpu", shape[-1], block_sizes)), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
          *_arg_shapes(shape[0], shape, reset=reset))


def triton_ir(kind: str, shape=SHAPE, reset: bool = False, block_sizes=None) -> dict:
  """``{kernel name: Triton IR (TTIR, MLIR text)}`` of ``kind``'s forward and backward kernels,
  as Pallas lowers them for ``cuda`` (sm_90) at ``shape``: the module that XLA would hand to its
  own Triton, captured while ``jax.export`` lowers (``ptx.py`` compiles it to PTX and cubin
  with the ``triton`` wheel). ``block_sizes``: an ``ops.BlockSizes`` (value blocks; None: the
  launch table's)."""
  from jax._src.pallas.triton import lowering as tl  # pylint: disable=g-import-not-at-top
  _check_reset_kind(kind, reset)
  modules = {}
  original = tl.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    name = jaxpr.debug_info.func_name
    modules[name] = result.module.operation.get_asm(enable_debug_info=False)
    return result

  tl.lower_jaxpr_to_triton_module = capture
  try:
    _export_cuda(kind, reset, shape, block_sizes)
  finally:
    tl.lower_jaxpr_to_triton_module = original
  return modules


def export_gpu(kind: str, reset: bool = False) -> dict:
  """Lowers forward + backward of ``kind`` for ``cuda``; returns the Triton calls found."""
  _check_reset_kind(kind, reset)
  target = "__gpu$xla.gpu.triton"
  exported = _export_cuda(kind, reset, SHAPE)
  text = exported.mlir_module()
  return {"kind": kind, "platforms": list(exported.platforms), "shape_BTHKVC": SHAPE,
          "reset": reset,
          "triton_custom_calls": text.count(f"@{target}"),
          "kernels": kernel_names(text, kind)}


def main(argv: Sequence[str] = ()) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m pallas_kernels.chunked_memory.lowering",
      description="Lower the kernels for TPU (ahead-of-time compile) or GPU (cuda export).")
  parser.add_argument("target", choices=("tpu", "gpu"))
  parser.add_argument("topology", nargs="?", default="v5e:2x2", help="TPU topology")
  parser.add_argument("--shape", default=",".join(map(str, SHAPE)),
                      help="B per chip,T,H,K,V,chunk (default %(default)s; TPU only)")
  parser.add_argument("--mode", choices=("both", "forward"), default="both",
                      help="forward+backward or forward alone (TPU only)")
  parser.add_argument("--reset", action="store_true",
                      help=f"with document boundaries (kinds {', '.join(RESET_KINDS)})")
  parser.add_argument("--tiling", choices=("default", "transposed"), default="default",
                      help="TPU phase kernels: head-strided, several chunks a step (default) or "
                      "XLA transposes, one chunk a step (the earlier tiling, but with the current gates)")
  parser.add_argument("--qkv", choices=("heads", "flat"), default="heads",
                      help="TPU: q, k, v as [B, T, H, D] arguments (default) or [B, T, H*D] "
                      "reshaped inside the step, as a projection produces them")
  parser.add_argument("--kinds", default=None,
                      help="comma-separated kinds (default: every kind; with --reset, those that "
                      "take boundaries)")
  args = parser.parse_args(list(argv) or sys.argv[1:])
  try:
    shape = tuple(int(x) for x in args.shape.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 6:
    parser.error(f"--shape must be six integers B,T,H,K,V,chunk; got {args.shape!r}")
  kinds = RESET_KINDS if args.reset else KINDS
  if args.kinds:
    unknown = [k for k in args.kinds.split(",") if k not in kinds]
    if unknown:
      parser.error(f"--kinds: {unknown} not among {kinds}")
    kinds = tuple(args.kinds.split(","))
  if args.target == "tpu":
    results = [compile_tpu(kind, args.topology, shape, args.mode, args.reset, args.tiling,
                           args.qkv) for kind in kinds]
  else:
    results = [export_gpu(kind, args.reset) for kind in kinds]
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
