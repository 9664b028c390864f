"""``python -m benchmarks.kernels``: the Pallas kernels against the XLA forms and FLA.

The ops benchmark (``benchmarks.ops``: same flags, records and JSON) at the shapes of the kernel
work, B×T×H×D 8×4096×16×128 and 4×16384×8×64 in bfloat16, for the implementations ``pallas``,
``chunked``, ``recurrent`` and, on a CUDA GPU where flash-linear-attention is installed, ``fla``
(its ``chunk_gated_delta_rule`` and ``chunk_simple_gla``). Every record carries the model work
(``flops``, ``bytes``) and the rates it implies (``tflops_per_s``, ``gb_per_s``); the tables add
the speedups over ``recurrent``, ``chunked`` and ``fla``.

``python -m benchmarks.kernels --agreement`` prints the interpret-mode agreement table instead:
every kernel (GPU and TPU, float32 and bfloat16) against the float64 recurrence of ``nlx.ops``,
the normwise relative error of every output and gradient and its bound (``AGREEMENT_RTOL``).

``python -m benchmarks.kernels --packed-aot [--topology v5e:2x2] [--shape B,T,H,D,C] [--json
PATH]`` compiles ``nlx.ops.titans_memory``'s train step (value and gradients, linear memory,
momentum, decay, a learned reset state; ``impl="pallas"``) for a TPU topology with libtpu, without
and with document boundaries, and prints XLA's per-chip cost and memory analysis of both: what
the packed buffer (``document_slots``, about twice the tokens) costs, as far as XLA's static
analysis says without a TPU.

``python -m benchmarks.kernels --h200 nlx|fla --json PATH`` times one side of
``benchmarks/h200.sh`` on a GPU (nlx's kernels, or flash-linear-attention's, each in its own
process) and ``--h200 table A.json B.json`` prints their side-by-side table.

On CPU the Pallas kernels run only in interpret mode and flash-linear-attention needs CUDA: both
are listed under ``unavailable``, and the XLA forms are measured. Configurations whose XLA memory
analysis exceeds the available memory are reported as failures, not run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from benchmarks import ops

# (B, T, H, D) of the kernel issue, in bfloat16.
KERNEL_SHAPES = ((8, 4096, 16, 128), (4, 16384, 8, 64))
KERNEL_IMPLS = ("pallas", "chunked", "recurrent", "fla")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.kernels",
      description="The ops benchmark at the kernels' shapes (default B×T×H×D 8×4096×16×128 and "
      "4×16384×8×64, bfloat16): tokens/s, achieved TFLOP/s and GB/s of pallas, chunked and "
      "recurrent, and on a CUDA GPU flash-linear-attention's chunk_gated_delta_rule and "
      "chunk_simple_gla when installed. Configurations whose XLA memory analysis exceeds the "
      "available memory are reported as failures, not run.",
      epilog="Other modes: '--agreement [--rows kind:backend:dtype,...] [--json PATH]' prints the "
      "interpret-mode agreement table (every kernel against the float64 recurrence of nlx.ops); "
      "'--h200 nlx|fla --json PATH' and '--h200 table A.json B.json' are the two sides and the "
      "table of benchmarks/h200.sh.")
  ops.add_arguments(parser, name="kernels", impls=KERNEL_IMPLS, shapes=KERNEL_SHAPES,
                    dtype="bfloat16")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--agreement" in argv:
    return agreement_main([a for a in argv if a != "--agreement"])
  if "--h200" in argv:
    return h200_main([a for a in argv if a != "--h200"])
  if "--packed-aot" in argv:
    return packed_aot_main([a for a in argv if a != "--packed-aot"])
  return ops.main(argv, build_parser())


PACKED_AOT_SHAPE = (2, 2048, 8, 128, 64)  # B per chip, T, H, D (= K = V), chunk


def packed_aot(topology: str = "v5e:2x2", shape=PACKED_AOT_SHAPE) -> list:
  """XLA's per-chip analysis of Titans' kernel train step without and with ``reset`` (documents
  of 256 tokens; the layout does not change what is compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import contextlib  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top

  from nlx import ops as nlx_ops  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import ops as kernel_ops  # pylint: disable=g-import-not-at-top
  # The op picks its kernel by the process's backend (CPU here: the GPU kernel, interpreted);
  # compiling for a TPU topology needs the Mosaic kernels, as on a TPU host.
  native = mock.patch.object(kernel_ops, "default_backend", lambda: ("tpu", False))
  topo = topologies.get_topology_desc(topology, "tpu")
  mesh = Mesh(topo.devices, ("data",))
  b, t, h, d, c = shape
  batch = b * len(topo.devices)
  from nlx.memory import core  # pylint: disable=g-import-not-at-top
  from nlx.ops import titans  # pylint: disable=g-import-not-at-top
  # The op runs a buffer of T + T/4 slots when the layout fits, else the worst case's (a
  # ``lax.cond``, whose cost XLA reports as its larger branch). Each branch alone: "small"
  # takes the small buffer's branch unconditionally; "full" turns the small buffer off.
  small_only = lambda reset, sizes, run, slack=4: run(True)
  patches = {"auto": (), "small": (mock.patch.object(core, "with_small_buffer", small_only),),
             "full": (mock.patch.object(titans, "PACKED_SLACK", 0),)}
  rows = []
  for packed, buffer in ((False, "auto"), (True, "auto"), (True, "small"), (True, "full")):
    def loss(q, k, v, lr, g, eta, s0, init, reset, packed=packed):
      o, state = nlx_ops.titans_memory(
          q, k, v, lr=lr, g=g, momentum=eta, initial_state=s0, chunk_size=c, impl="pallas",
          reset=reset if packed else None, reset_state=init if packed else None)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state.memory)

    grad = jax.value_and_grad(loss, argnums=tuple(range(8)))
    fn = jax.shard_map(grad, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False)
    spec = lambda shape_, dtype: jax.ShapeDtypeStruct(shape_, dtype,
                                                      sharding=NamedSharding(mesh, P("data")))
    seq, gate = spec((batch, t, h, d), jnp.bfloat16), spec((batch, t, h), jnp.float32)
    state = spec((batch, h, d, d), jnp.float32)
    with contextlib.ExitStack() as stack:
      for patch in (native,) + patches[buffer]:
        stack.enter_context(patch)
      compiled = jax.jit(fn).lower(seq, seq, seq, gate, gate, gate, state, state,
                                   spec((batch, t), jnp.bool_)).compile()
    cost = compiled.cost_analysis() or {}
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    rows.append({"topology": topology, "chips": len(topo.devices),
                 "shape_BTHDC_per_chip": list(shape), "packed": packed,
                 "buffer": buffer if packed else None,
                 "mosaic_custom_calls": hlo.count('custom_call_target="tpu_custom_call"'),
                 "flops": float(cost.get("flops", 0.0)),
                 "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                 "temp_bytes": getattr(memory, "temp_size_in_bytes", None)})
  return rows


def packed_aot_table(rows: list) -> str:
  base = rows[0]
  lines = ["| boundaries | buffer | Mosaic calls | GFLOP | vs none | GB accessed | vs none | "
           "temp MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {'reset' if r['packed'] else 'none'} | {r['buffer'] or '-'} | "
        f"{r['mosaic_custom_calls']} | "
        f"{r['flops'] / 1e9:.1f} | {r['flops'] / max(base['flops'], 1.0):.2f}x | "
        f"{r['bytes_accessed'] / 1e9:.2f} | "
        f"{r['bytes_accessed'] / max(base['bytes_accessed'], 1.0):.2f}x | "
        f"{(r['temp_bytes'] or 0) / 2**20:.0f} |")
  return "\n".join(lines)


def packed_aot_main(argv: Sequence[str] = ()) -> int:
  import json  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels --packed-aot")
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--shape", default=",".join(map(str, PACKED_AOT_SHAPE)),
                      help="B per chip, T, H, D, chunk")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  shape = tuple(int(x) for x in args.shape.split(","))
  if len(shape) != 5:
    parser.error(f"--shape must be B,T,H,D,C; got {args.shape!r}")
  rows = packed_aot(args.topology, shape)
  print(packed_aot_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"wrote {args.json}")
  return 0


def agreement_main(argv: Sequence[str] = ()) -> int:
  """``python -m benchmarks.kernels --agreement [--rows kind:backend:dtype,...] [--json PATH]``:
  the interpret-mode agreement table (every kernel against the float64 recurrence of nlx.ops);
  exit status 1 when a row exceeds its bound."""
  import json  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels --agreement")
  parser.add_argument("--rows", default=None,
                      help="comma-separated kind:backend:dtype (default: every row, ~5 min on CPU)")
  parser.add_argument("--json", default=None, help="also write the table as JSON here")
  args = parser.parse_args(list(argv))
  rows = AGREEMENT_ROWS
  if args.rows:
    rows = tuple(tuple(r.split(":")) for r in args.rows.split(","))
    for r in rows:
      if len(r) != 3 or r not in AGREEMENT_ROWS:
        parser.error(f"unknown row {':'.join(r)!r}; rows: "
                     + ", ".join(":".join(x) for x in AGREEMENT_ROWS))
  b, t, h, dk, dv, c = AGREEMENT_SHAPE
  print(f"kernels (interpret mode) vs the float64 recurrence of nlx.ops, B={b} T={t} H={h} K={dk} "
        f"V={dv} chunk={c}; normwise relative error of outputs and gradients")
  print(f"{'kind':18} {'backend':7} {'dtype':8} {'max error':>10} {'(of)':16} {'bound':>7}  ok")
  table = agreement_table(rows)
  for r in table:
    print(f"{r['kind']:18} {r['backend']:7} {r['dtype']:8} {r['max_error']:10.2e} "
          f"{'(' + r['worst'] + ')':16} {r['rtol']:7.0e}  {'yes' if r['ok'] else 'NO'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(table, f, indent=1)
  return 0 if all(r["ok"] for r in table) else 1



# --- Interpret-mode agreement: the kernels against the float64 recurrence of nlx.ops.

# Which gates each kind takes (titans: beta is the inner learning rate).
_GATES = {"linear_attention": ("g",), "delta_rule": ("beta", "g"),
          "titans": ("beta", "g", "momentum")}
# Normwise relative error bounds (``‖got − want‖ / ‖want‖`` per output and gradient) by input
# dtype: the precision contract of the kernels (docs/KERNELS.md).
AGREEMENT_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}
# (kind, backend, dtype): the rows of the table. Head sizes K=24, V=40 are not powers of two (the
# wrapper pads them), T=45 is not a multiple of the chunk (16).
AGREEMENT_ROWS = tuple((kind, backend, dtype) for kind in ("delta_rule", "linear_attention",
                                                           "titans")
                       for backend in ("gpu", "tpu") for dtype in ("float32", "bfloat16"))
AGREEMENT_SHAPE = (2, 45, 2, 24, 40, 16)  # B, T, H, K, V, chunk


def agreement_inputs(kind: str, b: int, t: int, h: int, dk: int, dv: int, seed: int = 0) -> dict:
  """Normalised keys, sigmoid gates, small log-decays and nonzero initial states (float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(seed), 8)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = normal(1, (b, t, h, dk))
  x = {"q": normal(0, (b, t, h, dk)), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
       "v": normal(2, (b, t, h, dv)), "initial_state": 0.3 * normal(6, (b, h, dk, dv)),
       "g": -0.2 * jax.nn.softplus(normal(4, (b, t, h)))}
  if "beta" in _GATES[kind]:
    x["beta"] = jax.nn.sigmoid(normal(3, (b, t, h))) * (0.5 if kind == "titans" else 1.0)
  if kind == "titans":
    x["momentum"] = jax.nn.sigmoid(normal(5, (b, t, h)))
    x["initial_momentum"] = 0.3 * normal(7, (b, h, dk, dv))
  return x


def _recurrence(kind: str, chunk: int):
  """nlx.ops's token-by-token recurrence with the kernels' signature."""
  from nlx import ops as nlx_ops  # pylint: disable=g-import-not-at-top

  def run(q, k, v, *, beta=None, g=None, momentum=None, initial_state=None,
          initial_momentum=None):
    if kind == "linear_attention":
      o, s = nlx_ops.linear_attention(q, k, v, g=g, initial_state=initial_state,
                                      impl="recurrent")
      return o, s, None
    if kind == "delta_rule":
      o, s = nlx_ops.delta_rule(q, k, v, beta=beta, g=g, initial_state=initial_state,
                                impl="recurrent")
      return o, s, None
    o, st = nlx_ops.titans_memory(q, k, v, lr=beta, momentum=momentum, g=g,
                                  initial_state=nlx_ops.TitansState(initial_state,
                                                                    initial_momentum),
                                  chunk_size=chunk, impl="recurrent")
    return o, st.memory, st.momentum

  return run


def _outputs_and_grads(fn, x: dict, weights):
  import jax  # pylint: disable=g-import-not-at-top

  def run(x, weights):
    out, pull = jax.vjp(lambda x: fn(**x), x)
    ws = tuple(None if o is None else w.astype(o.dtype) for o, w in zip(out, weights))
    (grads,) = pull(ws)
    return out, grads

  return jax.jit(run)(x, weights)


def agreement(kind: str, backend: str, dtype: str, shape=AGREEMENT_SHAPE, seed: int = 0) -> dict:
  """Normwise relative errors ``‖got − want‖ / ‖want‖`` of the kernel (``backend``, interpret
  mode, q/k/v in ``dtype``) against the float64 recurrence of ``nlx.ops`` on the same (rounded)
  inputs: every output and the gradient of every input under one fixed random cotangent."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import ops as kops  # pylint: disable=g-import-not-at-top
  b, t, h, dk, dv, chunk = shape
  x = agreement_inputs(kind, b, t, h, dk, dv, seed)
  x = {n: (a.astype(dtype) if n in ("q", "k", "v") else a) for n, a in x.items()}
  names = ("o", "state", "momentum")
  wkeys = jax.random.split(jax.random.key(seed + 100), 3)
  state = (b, h, dk, dv)
  weights = [jax.random.normal(wkeys[0], (b, t, h, dv)).astype(dtype).astype(jnp.float32),
             jax.random.normal(wkeys[1], state),
             jax.random.normal(wkeys[2], state) if kind == "titans" else None]
  kernel = lambda **kw: kops.chunked_memory(kind, chunk_size=chunk, backend=backend,
                                            interpret=True, **kw)
  out, grads = _outputs_and_grads(kernel, x, weights)
  with jax.enable_x64(True):
    x64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in x.items()}
    w64 = [None if w is None else jnp.asarray(np.asarray(w, np.float64)) for w in weights]
    out64, grads64 = _outputs_and_grads(_recurrence(kind, chunk), x64, w64)
    out64 = [None if o is None else np.asarray(o) for o in out64]
    grads64 = {n: np.asarray(a) for n, a in grads64.items()}
  rel = lambda a, w: float(np.linalg.norm(np.asarray(a, np.float64) - w) / np.linalg.norm(w))
  errors = {name: rel(o, w) for name, o, w in zip(names, out, out64) if w is not None}
  errors.update({f"d{n}": rel(grads[n], grads64[n]) for n in sorted(grads64)})
  return errors


def agreement_table(rows=AGREEMENT_ROWS, shape=AGREEMENT_SHAPE) -> list:
  """``[{"kind", "backend", "dtype", "rtol", "max_error", "worst", "errors", "ok"}]`` for
  ``rows``."""
  table = []
  for kind, backend, dtype in rows:
    errors = agreement(kind, backend, dtype, shape)
    worst = max(errors, key=errors.get)
    rtol = AGREEMENT_RTOL[dtype]
    table.append({"kind": kind, "backend": backend, "dtype": dtype, "rtol": rtol,
                  "max_error": errors[worst], "worst": worst, "errors": errors,
                  "ok": errors[worst] <= rtol})
  return table



# --- benchmarks/h200.sh: nlx's kernels and flash-linear-attention side by side on one GPU.

H200_SHAPE = (8, 4096, 16, 128)  # B, T, H, D (K = V = D), bfloat16
# H200 SXM: dense bfloat16 tensor-core peak and HBM3e bandwidth (NVIDIA's data sheet).
H200_PEAK_FLOPS = 989.4e12
H200_HBM_BYTES_PER_S = 4.8e12
# (nlx kind, fla function) compared.
H200_OPS = (("delta_rule", "chunk_gated_delta_rule"), ("linear_attention", "chunk_simple_gla"))


def _h200_model(kind: str, shape=H200_SHAPE, chunk: int = 64) -> dict:
  """The work both implementations are charged with: nlx's matmul FLOP count (``layout``) and
  the minimal HBM traffic (inputs and outputs once: q, k, v, o, dO, dq, dk, dv in bfloat16; gates
  and their gradients in float32), forward and forward + backward."""
  from pallas_kernels.chunked_memory import layout as lay  # pylint: disable=g-import-not-at-top
  b, t, h, d = shape
  units = b * h * (t // chunk)
  if kind == "delta_rule":
    fwd = sum(lay.phase_flops(p, chunk, d, d) for p in ("ut", "state", "out"))
    bwd = sum(lay.phase_flops(p, chunk, d, d) for p in ("dvl", "bwd_state", "grad"))
  else:
    fwd = lay.chunk_flops("linear_attention", chunk, d, d, False)
    bwd = 2 * fwd
  n_gates = 2 if kind == "delta_rule" else 1
  seq, gate = b * t * h * d * 2, b * t * h * 4
  fwd_bytes = 4 * seq + n_gates * gate + b * h * d * d * 4  # q, k, v, o, gates, final state
  bwd_bytes = fwd_bytes + 4 * seq + 2 * n_gates * gate  # + dO, dq, dk, dv, gate gradients
  return {"fwd_flops": units * fwd, "fwdbwd_flops": units * (fwd + bwd), "fwd_bytes": fwd_bytes,
          "fwdbwd_bytes": bwd_bytes}


def _median_ms(run, sync, repeats: int) -> float:
  import time  # pylint: disable=g-import-not-at-top
  run()
  sync()
  run()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    sync()
    times.append((time.perf_counter() - start) * 1e3)
  return sorted(times)[len(times) // 2]


def h200_nlx(repeats: int = 20, shape=H200_SHAPE, interpret: bool = False) -> list:
  """Times nlx's kernels (``pallas_kernels.chunked_memory``, native GPU) at ``shape``
  (``interpret``: the GPU kernels in interpret mode, for a smoke test on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import ops as kops  # pylint: disable=g-import-not-at-top
  b, t, h, d = shape
  ks = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, h, d), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 4.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  d_o = jax.random.normal(ks[5], (b, t, h, d), jnp.bfloat16)
  rows = []
  for kind, _ in H200_OPS:
    extra = {"beta": beta} if kind == "delta_rule" else {}
    run = lambda q, k, v, g, extra: kops.chunked_memory(kind, q, k, v, g=g, chunk_size=64,
                                                        backend="gpu", interpret=interpret,
                                                        **extra)
    fwd = jax.jit(lambda q, k, v, g, extra: run(q, k, v, g, extra)[:2])
    loss = lambda q, k, v, g, extra: jnp.sum(run(q, k, v, g, extra)[0].astype(jnp.float32)
                                             * d_o.astype(jnp.float32))
    fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    out = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
      holder = {}

      def call(fn=fn, holder=holder):
        holder["r"] = fn(q, k, v, g, extra)

      out[name] = _median_ms(call, lambda h=holder: jax.block_until_ready(h.get("r")), repeats)
    rows.append({"impl": "nlx", "kind": kind, "fwd_ms": out["fwd"], "fwdbwd_ms": out["fwdbwd"]})
  return rows


def h200_fla(repeats: int = 20) -> list:
  """Times flash-linear-attention's ``chunk_gated_delta_rule`` and ``chunk_simple_gla`` (PyTorch,
  CUDA) at ``H200_SHAPE`` on the same kind of inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top
  from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=g-import-not-at-top
  b, t, h, d = H200_SHAPE
  dev = "cuda"
  torch.manual_seed(0)
  q = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16)
  k = torch.nn.functional.normalize(torch.randn(b, t, h, d, device=dev), dim=-1).bfloat16()
  v = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16)
  g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev) + 4.0)
  beta = torch.sigmoid(torch.randn(b, t, h, device=dev))
  d_o = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16)
  fns = {"chunk_gated_delta_rule": lambda q, k, v, g, beta: chunk_gated_delta_rule(
      q, k, v, g=g, beta=beta, output_final_state=True),
         "chunk_simple_gla": lambda q, k, v, g, beta: chunk_simple_gla(
             q, k, v, g=g, output_final_state=True)}
  rows = []
  for kind, name in H200_OPS:
    fn = fns[name]

    def fwd():
      with torch.no_grad():
        fn(q, k, v, g, beta)

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta)]

    def fwdbwd():
      o, _ = fn(*leaves)
      o.backward(d_o)

    rows.append({"impl": "fla", "kind": kind, "fla_op": name,
                 "fwd_ms": _median_ms(fwd, torch.cuda.synchronize, repeats),
                 "fwdbwd_ms": _median_ms(fwdbwd, torch.cuda.synchronize, repeats)})
  return rows


def h200_table(rows: list) -> str:
  """The side-by-side table: ms, nlx/fla time ratio, achieved TFLOP/s and the fraction of the
  H200 roofline (``max(FLOPs / peak, bytes / bandwidth)`` over the measured time)."""
  lines = [f"B,T,H,D = {H200_SHAPE} bfloat16, chunk 64; roofline: {H200_PEAK_FLOPS / 1e12:.0f} "
           f"TFLOP/s, {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s; FLOPs: nlx's matmul count for both",
           f"{'kind':17} {'impl':4} {'pass':7} {'ms':>8} {'nlx/fla':>8} {'TFLOP/s':>8} "
           f"{'roofline':>8}"]
  by = {(r["kind"], r["impl"]): r for r in rows}
  for kind, _ in H200_OPS:
    model = _h200_model(kind)
    for impl in ("nlx", "fla"):
      r = by.get((kind, impl))
      if r is None:
        lines.append(f"{kind:17} {impl:4} {'-':7} not run")
        continue
      for p in ("fwd", "fwdbwd"):
        ms = r[f"{p}_ms"]
        other = by.get((kind, "fla"))
        ratio = (f"{ms / other[f'{p}_ms']:8.2f}" if impl == "nlx" and other else f"{'':8}")
        flops, nbytes = model[f"{p}_flops"], model[f"{p}_bytes"]
        ideal = max(flops / H200_PEAK_FLOPS, nbytes / H200_HBM_BYTES_PER_S)
        lines.append(f"{kind:17} {impl:4} {p:7} {ms:8.3f} {ratio} {flops / ms / 1e9:8.1f} "
                     f"{ideal * 1e3 / ms:8.1%}")
  return "\n".join(lines)


def h200_main(argv: Sequence[str] = ()) -> int:
  """``python -m benchmarks.kernels --h200 nlx|fla --json PATH`` times one side (each in its own
  process: JAX and PyTorch would both claim the GPU's memory); ``--h200 table A.json B.json``
  prints the table."""
  import json  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels --h200")
  parser.add_argument("side", choices=("nlx", "fla", "table"))
  parser.add_argument("files", nargs="*")
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(list(argv))
  if args.side == "table":
    rows = []
    for path in args.files:
      with open(path) as f:
        rows += json.load(f)
    print(h200_table(rows))
    return 0
  rows = h200_nlx(args.repeats) if args.side == "nlx" else h200_fla(args.repeats)
  text = json.dumps(rows)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
