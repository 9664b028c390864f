"""``python -m benchmarks.ops``: tokens/s and peak memory of the associative-memory ops.

Measures the ops of ``nlx.ops`` (``linear_attention``, ``delta_rule``, ``titans_memory`` with the
linear memory, momentum and decay) for each implementation (``recurrent``, ``chunked``,
``pallas``; ``fla``: flash-linear-attention's counterpart on a CUDA GPU) in two modes:

* ``forward``: ``(o, final_state) = op(...)``;
* ``forward+backward``: ``jax.value_and_grad`` of ``sum(o) + sum(final_state)`` with respect to
  every input: q, k, v, the gates (g, beta, lr, momentum) and the initial state.

Defaults: B=4, H=8, D=K=V=64, T in {1024, 4096}, float32, chunk_size 64, 3 timed repeats
(``benchmarks.kernels`` runs the same at the kernels' shapes in bfloat16).

Inputs are realistic: q and k are L2-normalised per head (the delta rule needs ``‖k‖ ≤ 1`` to be
stable), v ~ N(0, 1), ``beta = sigmoid(randn)``, ``g = -0.1·softplus(randn)`` (log-decays),
``lr = 0.1·sigmoid(randn)``, ``momentum = sigmoid(randn)``, initial states ``0.1·randn``.

Measurements (one record per op × impl × mode × shape; timing and memory as in
``benchmarks.harness``):

* ``compile_s``, ``seconds`` (median of the timed runs after a warm-up run; a configuration whose
  warm-up run took longer than ``--slow_run_s`` seconds, default 10, is timed once, which keeps
  the slowest default case, the token-by-token recurrence at T=4096 with gradients, bearable),
  ``repeats`` (runs timed) and ``times_s``.
* ``tokens_per_s = B·T / seconds``.
* ``peak_bytes``: argument + output + temp bytes of XLA's compiled memory analysis: the inputs,
  the outputs and XLA's scratch buffers for one call. It is deterministic and independent of
  other processes, which is what matters for planning memory; it does not count the generated
  code or the runtime's own allocations. On a GPU/TPU whose device reports ``memory_stats()``,
  ``device_peak_bytes_in_use`` is also the allocator's ``peak_bytes_in_use`` after the
  configuration ran: with the default isolation (below) that of this configuration alone; with
  ``--in_process`` it cannot be reset and only grows from record to record.
* ``flops``, ``bytes``, ``tflops_per_s``, ``gb_per_s``: the model work of the configuration
  (``work``) and the rates it implies.

Implementations that are not available (``pallas`` on CPU, where the kernels only run in Pallas
interpret mode; an op that raises ``NotImplementedError``; ``fla`` without the package or a CUDA
GPU) are listed under ``unavailable`` with the reason instead of being measured.

Isolation: by default every configuration runs in its own ``python -m benchmarks.ops`` child
process, killed after ``--timeout_s`` seconds (default 300), or on CPU once it has used no CPU
time for ``--stall_s`` seconds (default 60), and retried ``--retries`` times (default 1). XLA's
CPU runtime can hang (every thread parked on a futex, no progress, forever): on the 2-vCPU
development VM the LAPACK triangular solve that the chunked delta rule once used did so in its
gradient (see docs/RESULTS.md; nlx no longer calls it). A configuration that never finishes is
listed under ``failures`` instead of stopping the benchmark. The children also give every
configuration a fresh allocator. ``--in_process`` measures everything in the calling process
instead (faster to start; used by the tests).

The exit status is 0, or 1 when a configuration failed.

Output: a table per configuration and tables of speedups (``tokens_per_s`` of each impl over
that of ``recurrent``, and over ``chunked`` and ``fla`` where measured, for the same op, mode and
shape in the same run) on stdout, a tqdm progress bar on stderr, and with ``--out FILE.json``::

    {"records": [{op, impl, mode, B, T, H, D, K, V, dtype, chunk_size, tokens_per_s, peak_bytes,
                  backend, compile_s, seconds, ...}, ...],
     "speedups": [{op, mode, T, impl, baseline, speedup}, ...],
     "unavailable": [{impl, reason}, ...],
     "failures": [{op, impl, mode, T, reason}, ...],
     "meta": {jax_version, backend, device_kind, cpu_count, date, command, ...}}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

from benchmarks import harness

OPS = ("linear_attention", "delta_rule", "titans_memory")
IMPLS = ("recurrent", "chunked", "pallas", "fla")
DEFAULT_IMPLS = ("recurrent", "chunked", "pallas")
# flash-linear-attention's counterpart of each op (titans_memory has none).
FLA_OPS = {"delta_rule": "chunk_gated_delta_rule", "linear_attention": "chunk_simple_gla"}
MODES = ("forward", "forward+backward")
DTYPES = ("float32", "bfloat16", "float16", "float64")
BASELINE_IMPL = "recurrent"
REQUIRED_RECORD_KEYS = ("op", "impl", "mode", "B", "T", "H", "D", "dtype", "tokens_per_s",
                        "peak_bytes", "backend")
MODULE = "benchmarks.ops"  # the children run ``python -m benchmarks.ops _child SPEC``

# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def shape_list(text: str) -> list:
  """argparse type: ``BxTxHxD`` shapes, comma-separated."""
  shapes = []
  for item in (x.strip() for x in text.split(",") if x.strip()):
    parts = item.lower().split("x")
    try:
      shape = tuple(harness.positive_int(x) for x in parts)
    except argparse.ArgumentTypeError:
      shape = ()
    if len(shape) != 4:
      raise argparse.ArgumentTypeError(f"expected shapes BxTxHxD separated by commas, e.g. "
                                       f"8x4096x16x128; got {item!r}")
    shapes.append(shape)
  if not shapes:
    raise argparse.ArgumentTypeError("expected at least one shape BxTxHxD")
  return list(dict.fromkeys(shapes))


def add_arguments(parser: argparse.ArgumentParser, *, name: str = "ops",
                  impls: Sequence[str] = DEFAULT_IMPLS, shapes: Optional[Sequence] = None,
                  dtype: str = "float32") -> None:
  """The flags of the benchmark ``name`` with its defaults of ``--impls``, ``--shapes`` and
  ``--dtype`` (``benchmarks.kernels`` passes its own)."""
  positive = harness.positive_int
  parser.add_argument("--batch", type=positive, default=4, help="B (default 4)")
  parser.add_argument("--heads", type=positive, default=8, help="H (default 8)")
  parser.add_argument("--dim", type=positive, default=64,
                      help="head dimension D = K = V (default 64)")
  parser.add_argument("--seq_lens", type=harness.positive_int_list, default=[1024, 4096],
                      help="sequence lengths T, comma-separated (default 1024,4096)")
  parser.add_argument("--ops", type=harness.choice_list(OPS, "op"), default=list(OPS),
                      help=f"ops, comma-separated (default {','.join(OPS)})")
  parser.add_argument("--impls", type=harness.choice_list(IMPLS, "impl"), default=list(impls),
                      help=f"implementations, comma-separated (default {','.join(impls)}); "
                      "unavailable ones are reported and skipped ('fla': flash-linear-attention "
                      "on a CUDA GPU, when installed)")
  parser.add_argument("--shapes", type=shape_list,
                      default=None if shapes is None else [list(x) for x in shapes],
                      help="shapes BxTxHxD, comma-separated; replace --batch/--seq_lens/--heads/"
                      "--dim (default: " + (",".join("x".join(map(str, x)) for x in shapes)
                                            if shapes else "from those flags") + ")")
  parser.add_argument("--modes", type=harness.choice_list(MODES, "mode"), default=list(MODES),
                      help=f"modes, comma-separated (default {','.join(MODES)})")
  parser.add_argument("--dtype", choices=DTYPES, default=dtype,
                      help=f"input dtype (default {dtype})")
  parser.add_argument("--chunk_size", type=positive, default=64,
                      help="chunk_size of the ops (default 64)")
  harness.add_common_flags(parser, unit="run", slow_run_s=10.0,
                           out_help="write records, speedups and metadata to this JSON file")
  parser.add_argument("--no_progress", dest="progress", action="store_false",
                      help="no progress bar on stderr")
  parser.add_argument("--timeout_s", type=harness.non_negative_float, default=300.0,
                      help="kill a configuration's child process after this many seconds and "
                      "report it under failures (default 300; 0: no limit)")
  parser.add_argument("--stall_s", type=harness.non_negative_float, default=60.0,
                      help="on CPU, kill a child that used no CPU time for this many seconds "
                      "(a hung XLA runtime) and report it under failures (default 60; 0: never)")
  parser.add_argument("--retries", type=int, default=1,
                      help="runs of a configuration that failed or timed out (default 1)")
  parser.add_argument("--in_process", action="store_true",
                      help="measure in this process instead of one child process per "
                      "configuration (no timeout)")
  parser.set_defaults(benchmark_name=name)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f"python -m {MODULE}",
      description="Tokens/s, peak memory and compile time of linear_attention, delta_rule and "
      "titans_memory per implementation (recurrent, chunked, pallas), forward and "
      "forward+backward, with the chunked/recurrent speedups.")
  add_arguments(parser)
  return parser


# ----------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------


def make_inputs(op: str, b: int, t: int, h: int, d: int, dtype, seed: int = 0) -> dict:
  """Realistic inputs of ``op`` (see the module docstring) as a dict of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nlx.ops import TitansState  # pylint: disable=g-import-not-at-top

  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  cast = lambda x: x.astype(dtype)
  seq, gate, state = (b, t, h, d), (b, t, h), (b, h, d, d)
  inputs = {"q": cast(unit(normal(seq))), "k": cast(unit(normal(seq))), "v": cast(normal(seq)),
            "g": cast(-0.1 * jax.nn.softplus(normal(gate)))}
  if op == "linear_attention":
    inputs["initial_state"] = cast(0.1 * normal(state))
  elif op == "delta_rule":
    inputs["beta"] = cast(jax.nn.sigmoid(normal(gate)))
    inputs["initial_state"] = cast(0.1 * normal(state))
  elif op == "titans_memory":
    inputs["lr"] = cast(0.1 * jax.nn.sigmoid(normal(gate)))
    inputs["momentum"] = cast(jax.nn.sigmoid(normal(gate)))
    inputs["initial_state"] = TitansState(cast(0.1 * normal(state)), cast(0.1 * normal(state)))
  else:
    raise ValueError(f"unknown op {op!r}; allowed: {', '.join(OPS)}")
  return inputs


def make_fn(op: str, impl: str, mode: str, chunk_size: int) -> Callable:
  """The function of one configuration, of the inputs dict (not jitted)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nlx import ops  # pylint: disable=g-import-not-at-top

  def forward(x):
    if op == "linear_attention":
      return ops.linear_attention(x["q"], x["k"], x["v"], g=x["g"],
                                  initial_state=x["initial_state"], chunk_size=chunk_size,
                                  impl=impl)
    if op == "delta_rule":
      return ops.delta_rule(x["q"], x["k"], x["v"], beta=x["beta"], g=x["g"],
                            initial_state=x["initial_state"], chunk_size=chunk_size, impl=impl)
    if op == "titans_memory":
      return ops.titans_memory(x["q"], x["k"], x["v"], lr=x["lr"], momentum=x["momentum"], g=x["g"],
                               memory="linear", initial_state=x["initial_state"],
                               chunk_size=chunk_size, impl=impl)
    raise ValueError(f"unknown op {op!r}; allowed: {', '.join(OPS)}")

  if mode == "forward":
    return forward

  def loss(x):
    o, state = forward(x)
    total = jnp.sum(o.astype(jnp.float32))
    for leaf in jax.tree.leaves(state):  # memory, momentum, chunk start (not Titans' int offset)
      if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
        total = total + jnp.sum(leaf.astype(jnp.float32))
    return total

  if mode == "forward+backward":
    return jax.value_and_grad(loss)
  raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def probe_impl(impl: str, dtype) -> Optional[str]:
  """None if ``impl`` runs, else the reason it is unavailable (tiny forward of every op)."""
  import jax  # pylint: disable=g-import-not-at-top
  if impl == "pallas" and jax.default_backend() == "cpu":
    return ("on cpu the Pallas kernels run only in interpret mode, a correctness check rather "
            "than a speed path; `python -m benchmarks.kernels` measures them on a GPU or TPU")
  if impl == "fla":
    return fla_unavailable()
  for op in OPS:
    try:
      jax.block_until_ready(make_fn(op, impl, "forward", 4)(make_inputs(op, 1, 4, 1, 4, dtype)))
    except NotImplementedError as e:
      return f"{type(e).__name__}: {e}"
  return None


def measure(op: str, impl: str, mode: str, b: int, t: int, h: int, d: int, dtype_name: str,
            chunk_size: int, repeats: int, slow_run_s: float = 10.0, seed: int = 0) -> dict:
  """Compiles, warms up and times one configuration; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  inputs = jax.block_until_ready(make_inputs(op, b, t, h, d, jnp.dtype(dtype_name), seed))
  compiled, compile_s = harness.compile_timed(make_fn(op, impl, mode, chunk_size), inputs)
  memory = harness.memory_analysis(compiled)
  harness.check_memory(memory.get("peak_bytes"))
  _, timing = harness.time_runs(lambda: compiled(inputs), repeats, slow_run_s)
  record = {"op": op, "impl": impl, "mode": mode, "B": b, "T": t, "H": h, "D": d, "K": d, "V": d,
            "dtype": dtype_name, "chunk_size": chunk_size,
            "tokens_per_s": b * t / timing["seconds"], "peak_bytes": None,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "compile_s": compile_s, **timing}
  record.update(memory)
  record.update(work(op, mode, inputs, compiled.out_info, chunk_size, timing["seconds"]))
  record.update(harness.device_peak_bytes())
  return record


def nbytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of ``tree``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def work(op: str, mode: str, inputs, outputs, chunk_size: int, seconds: float) -> dict:
  """Model FLOPs, minimal memory traffic and the rates they imply, for one configuration.

  ``flops``: the matmul FLOPs of the chunked algorithm (``layout.chunk_flops``: the same count for
  every impl, so TFLOP/s compare useful work); forward+backward counts 3× the forward (the
  backward recomputes each chunk and takes two matmuls per forward one). ``bytes``: every input
  read and every output written once (forward), plus the inputs read again, their gradients
  written and the outputs' cotangents read (forward+backward): a lower bound on HBM traffic.
  """
  from pallas_kernels.chunked_memory import layout  # pylint: disable=g-import-not-at-top
  b, t, h, d = inputs["q"].shape
  kind = {"titans_memory": "titans"}.get(op, op)
  chunks = -(-t // chunk_size)
  flops = b * h * chunks * layout.chunk_flops(kind, chunk_size, d, d, op == "titans_memory")
  in_bytes, out_bytes = nbytes(inputs), nbytes(outputs)
  total = in_bytes + out_bytes
  if mode == "forward+backward":
    flops, total = 3 * flops, 3 * in_bytes + 2 * out_bytes
  return {"flops": int(flops), "bytes": int(total), "tflops_per_s": flops / seconds / 1e12,
          "gb_per_s": total / seconds / 1e9}


def fla_unavailable() -> Optional[str]:
  """None if flash-linear-attention can run here (package and a CUDA GPU), else why not."""
  try:
    import fla  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"flash-linear-attention is not installed ({e})"
  if not torch.cuda.is_available():
    return "flash-linear-attention needs a CUDA GPU visible to torch"
  return None


def measure_fla(op: str, mode: str, b: int, t: int, h: int, d: int, dtype_name: str,
                chunk_size: int, repeats: int, seed: int = 0) -> dict:
  """flash-linear-attention's kernel for ``op`` (``FLA_OPS``), timed like ``measure``.

  Same shapes, dtype, gates and initial state as ``make_inputs``; the inputs are moved to torch
  through numpy. ``peak_bytes`` is torch's peak allocation of the timed runs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top
  from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=g-import-not-at-top
  if op not in FLA_OPS:
    raise ValueError(f"flash-linear-attention has no counterpart of {op!r}")
  x = make_inputs(op, b, t, h, d, jnp.float32, seed)
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
  grad = mode == "forward+backward"
  to = lambda a, dt: torch.tensor(np.asarray(a), device="cuda", dtype=dt).requires_grad_(grad)
  q, k, v = (to(x[n], dtype) for n in ("q", "k", "v"))
  g, s0 = to(x["g"], torch.float32), to(x["initial_state"], torch.float32)
  beta = to(x["beta"], dtype) if op == "delta_rule" else None

  def run():
    if op == "delta_rule":
      o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=d**-0.5, initial_state=s0,
                                    output_final_state=True)
    else:
      o, s = chunk_simple_gla(q, k, v, g, scale=d**-0.5, initial_state=s0,
                              output_final_state=True)
    if grad:
      (o.float().sum() + s.sum()).backward()
    torch.cuda.synchronize()
    return o, s

  start = time.perf_counter()
  out = run()
  warmup_s = time.perf_counter() - start
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  record = {"op": op, "impl": "fla", "fla_op": FLA_OPS[op], "mode": mode, "B": b, "T": t, "H": h,
            "D": d, "K": d, "V": d, "dtype": dtype_name, "chunk_size": 64,
            "tokens_per_s": b * t / seconds, "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "backend": "gpu", "device_kind": torch.cuda.get_device_name(), "compile_s": warmup_s,
            "warmup_s": warmup_s, "seconds": seconds, "repeats": repeats, "times_s": times}
  # The traffic model counts what the JAX ops read and write: same shapes, same dtypes.
  as_struct = lambda a, dt: jax.ShapeDtypeStruct(tuple(a.shape), dt)
  seq_dt = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(dtype_name, jnp.float32)
  inputs = {n: as_struct(x[n], seq_dt if n in ("q", "k", "v", "beta") else jnp.float32)
            for n in ("q", "k", "v", "g", "beta", "initial_state") if n in x}
  outputs = [as_struct(out[0], seq_dt), as_struct(out[1], jnp.float32)]
  record.update(work(op, mode, inputs, outputs, chunk_size, seconds))
  return record


def run_spec(spec: dict) -> dict:
  """Runs one job (``probe`` the impls, or ``measure`` a configuration) in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  if spec["dtype"] == "float64":
    jax.config.update("jax_enable_x64", True)
  if spec["kind"] == "probe":
    dtype = jax.numpy.dtype(spec["dtype"])
    return {"reasons": {impl: probe_impl(impl, dtype) for impl in spec["impls"]},
            **harness.device_info()}
  if spec["impl"] == "fla":
    return measure_fla(spec["op"], spec["mode"], spec["B"], spec["T"], spec["H"], spec["D"],
                       spec["dtype"], spec["chunk_size"], spec["repeats"], spec["seed"])
  return measure(spec["op"], spec["impl"], spec["mode"], spec["B"], spec["T"], spec["H"],
                 spec["D"], spec["dtype"], spec["chunk_size"], spec["repeats"],
                 spec["slow_run_s"], spec["seed"])


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def speedups(records: list, baseline: str = BASELINE_IMPL) -> list:
  """``tokens_per_s`` of every impl over ``baseline``'s, per (op, mode, T, B, H, D, dtype)."""
  key = lambda r: (r["op"], r["mode"], r["T"], r["B"], r["H"], r["D"], r["dtype"])
  base = {key(r): r for r in records if r["impl"] == baseline}
  out = []
  for r in records:
    ref = base.get(key(r))
    if r["impl"] == baseline or ref is None:
      continue
    out.append({"op": r["op"], "mode": r["mode"], "T": r["T"], "B": r["B"], "H": r["H"],
                "D": r["D"], "impl": r["impl"], "baseline": baseline,
                "speedup": r["tokens_per_s"] / ref["tokens_per_s"],
                "tokens_per_s": r["tokens_per_s"], "baseline_tokens_per_s": ref["tokens_per_s"]})
  return out


def _shape(r: dict) -> str:
  return "x".join(str(r[k]) for k in ("B", "T", "H", "D"))


def format_tables(result: dict) -> str:
  """The records, the speedups per baseline, the unavailable impls and the failures."""
  rate = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "n/a"
  rows = [[r["op"], r["impl"], r["mode"], r["T"], _shape(r), f"{r['tokens_per_s']:,.0f}",
           rate(r, "tflops_per_s", "{:.4f}"), rate(r, "gb_per_s", "{:.2f}"),
           "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}",
           f"{r['compile_s']:.2f}"] for r in result["records"]]
  text = [harness.format_table(["op", "impl", "mode", "T", "BxTxHxD", "tokens/s", "TFLOP/s",
                                "GB/s", "peak MiB", "compile s"], rows)]
  for baseline in dict.fromkeys(s.get("baseline", BASELINE_IMPL) for s in result["speedups"]):
    rows = [[s["op"], s["impl"], s["mode"], s["T"], _shape(s) if "B" in s else "",
             f"{s['speedup']:.2f}x"] for s in result["speedups"]
            if s.get("baseline", BASELINE_IMPL) == baseline]
    text += ["", f"speedup: tokens/s over {baseline}, same run",
             harness.format_table(["op", "impl", "mode", "T", "BxTxHxD", "speedup"], rows)]
  for u in result["unavailable"]:
    text += ["", f"impl {u['impl']!r} unavailable, skipped: {u['reason']}"]
  for f in result.get("failures", []):
    text += ["", f"FAILED {f['op']} {f['impl']} {f['mode']} T={f['T']}: {f['reason']}"]
  return "\n".join(text)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, command: Optional[str] = None) -> dict:
  """Runs the benchmark for parsed ``args``.

  Returns ``{records, speedups, unavailable, failures, meta}`` (see the module docstring). With
  ``args.out`` the file is rewritten after every configuration (``meta.complete`` false until the
  end), so a long run that is interrupted keeps what it measured.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  isolated = not args.in_process
  shapes = [tuple(x) for x in (args.shapes or [(args.batch, t, args.heads, args.dim)
                                               for t in args.seq_lens])]
  run_info = harness.RunInfo(command)
  device = {}

  def run_one(spec: dict) -> tuple[Optional[dict], str]:
    spec = {"dtype": args.dtype, **spec}
    if not isolated:
      return run_spec(spec), ""
    # Stall detection only where a working child is always busy on the CPU.
    stall_s = args.stall_s if device.get("backend") == "cpu" else 0.0
    return harness.run_in_child(MODULE, spec, args.timeout_s, 1 + max(0, args.retries), stall_s)

  def result(complete: bool) -> dict:
    config = {"benchmark": args.benchmark_name, "shapes": shapes,
              "batch": args.batch, "heads": args.heads, "dim": args.dim,
              "seq_lens": args.seq_lens, "ops": args.ops, "impls": args.impls,
              "modes": args.modes, "dtype": args.dtype, "chunk_size": args.chunk_size,
              "repeats": args.repeats, "slow_run_s": args.slow_run_s, "seed": args.seed,
              "isolated": isolated, "timeout_s": args.timeout_s, "stall_s": args.stall_s,
              "retries": args.retries}
    meta = run_info.meta(device, config, "argument + output + temp bytes of XLA's compiled "
                         "memory analysis", complete)
    ratios = speedups(records) + speedups(records, "chunked") + speedups(records, "fla")
    ratios = [r for r in ratios if r["impl"] != BASELINE_IMPL]
    return {"records": records, "speedups": ratios, "unavailable": unavailable,
            "failures": failures, "meta": meta}

  records, failures = [], []
  probe, why = run_one({"kind": "probe", "impls": args.impls})
  if probe is None:
    raise RuntimeError(f"could not probe the implementations {args.impls}: {why}")
  device.update({k: v for k, v in probe.items() if k != "reasons"})
  impls = [impl for impl in args.impls if probe["reasons"][impl] is None]
  unavailable = [{"impl": impl, "reason": probe["reasons"][impl]} for impl in args.impls
                 if probe["reasons"][impl] is not None]

  configs = [(op, shape, mode, impl) for op in args.ops for shape in shapes for mode in args.modes
             for impl in impls if impl != "fla" or op in FLA_OPS]
  bar = tqdm(configs, desc=f"bench {args.benchmark_name}", unit="run", file=sys.stderr,
             disable=not args.progress, dynamic_ncols=True)
  for op, (b, t, h, d), mode, impl in bar:
    bar.set_postfix_str(f"{op} {impl} {mode} {b}x{t}x{h}x{d}")
    spec = {"kind": "measure", "op": op, "impl": impl, "mode": mode, "B": b, "T": t,
            "H": h, "D": d, "chunk_size": args.chunk_size,
            "repeats": args.repeats, "slow_run_s": args.slow_run_s, "seed": args.seed}
    record, why = run_one(spec)
    if record is None:
      failures.append({"op": op, "impl": impl, "mode": mode, "B": b, "T": t,
                       "H": h, "D": d, "dtype": args.dtype, "reason": why})
      bar.write(f"FAILED {op} {impl} {mode} T={t}: {why}", file=sys.stderr)
    else:
      record["isolated"] = isolated
      records.append(record)
    if args.out:
      harness.write_json(args.out, result(complete=False))
  bar.close()
  return result(complete=True)


def run_command(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """Runs, prints the tables, writes ``--out``; 1 if a configuration failed."""
  result = run(args, command)
  print(format_tables(result))
  print("\n" + harness.summary_line(result["meta"]))
  if args.out:
    harness.write_json(args.out, result)
    print(f"wrote {args.out}")
  return 1 if result["failures"] else 0


def main(argv: Optional[Sequence[str]] = None,
         parser: Optional[argparse.ArgumentParser] = None) -> int:
  """``python -m benchmarks.ops [flags]`` (``parser``: another benchmark's flags, e.g. kernels)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [harness.CHILD_COMMAND]:
    return harness.child_main(run_spec, argv[1])
  parser = parser or build_parser()
  args = harness.parse_args(parser, argv)
  return run_command(args, f"{parser.prog} " + " ".join(argv))


if __name__ == "__main__":
  sys.exit(main())
