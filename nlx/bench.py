"""Benchmarks of nlx: ``nlx bench ops`` (also ``python -m nlx.bench ops``).

``ops`` measures the associative-memory ops of ``nlx.ops`` (``linear_attention``, ``delta_rule``,
``titans_memory`` with the linear memory, momentum and decay) for each implementation
(``recurrent``, ``chunked``, ``pallas``) in two modes:

* ``forward``: ``(o, final_state) = op(...)``;
* ``forward+backward``: ``jax.value_and_grad`` of ``sum(o) + sum(final_state)`` with respect to
  every input: q, k, v, the gates (g, beta, lr, momentum) and the initial state.

Defaults: B=4, H=8, D=K=V=64, T in {1024, 4096}, float32, chunk_size 64, 3 timed repeats.

Inputs are realistic: q and k are L2-normalised per head (the delta rule needs ``‖k‖ ≤ 1`` to be
stable), v ~ N(0, 1), ``beta = sigmoid(randn)``, ``g = -0.1·softplus(randn)`` (log-decays),
``lr = 0.1·sigmoid(randn)``, ``momentum = sigmoid(randn)``, initial states ``0.1·randn``.

Measurements (one record per op × impl × mode × T):

* ``compile_s``: wall time of ``jax.jit(f).lower(inputs).compile()``.
* ``seconds``: the median wall time of the timed runs, each ended by ``jax.block_until_ready``,
  after one untimed warm-up run. ``--repeats`` runs are timed (default 3), except that a
  configuration whose warm-up run took longer than ``--slow_run_s`` seconds (default 10) is timed
  once: at that length one run is already a stable measurement, and it keeps the default
  benchmark (whose slowest case is the token-by-token recurrence at T=4096 with gradients) to a
  bearable length. ``repeats`` in the record says how many runs were timed; ``times_s`` lists them.
* ``tokens_per_s = B·T / seconds``.
* ``peak_bytes``: XLA's compiled memory analysis of the executable,
  ``argument_size_in_bytes + output_size_in_bytes + temp_size_in_bytes``: the inputs, the outputs
  and XLA's scratch buffers for one call (nothing is donated, so nothing is aliased). It is
  deterministic and independent of other processes, which is what matters for planning memory;
  it does not count the generated code or the runtime's own allocations. The record also keeps the
  three parts and XLA's own ``peak_memory_in_bytes`` estimate (``xla_peak_memory_bytes``). On a
  GPU/TPU whose device reports ``memory_stats()``, ``device_peak_bytes_in_use`` is additionally the
  allocator's ``peak_bytes_in_use`` read after the configuration ran: the high-water mark of the
  process, which with the default isolation (below) is that of this configuration alone (inputs,
  compilation and runs); with ``--in_process`` it cannot be reset and only grows from record to
  record.

Implementations that are not available (``pallas`` on CPU, where the kernels only run in Pallas
interpret mode; an op that raises ``NotImplementedError``) are listed under ``unavailable`` with
the reason instead of being measured.

Isolation: by default every configuration runs in its own ``python -m nlx.bench`` child process,
killed after ``--timeout_s`` seconds (default 300), or on CPU once it has used no CPU time for
``--stall_s`` seconds (default 60), and retried ``--retries`` times (default 1).
XLA's CPU runtime can hang (every thread parked on a futex, no progress, forever): on the 2-vCPU
development VM the LAPACK triangular solve that the chunked delta rule once used did so in its
gradient (see docs/RESULTS.md; nlx no longer calls it).
A configuration that never finishes is
listed under ``failures`` instead of stopping the benchmark. The children also give every
configuration a fresh allocator, so that ``device_peak_bytes_in_use`` is per configuration.
``--in_process`` measures everything in the calling process instead (faster to start; used by the
tests).

The exit status is 0, or 1 when a configuration failed.

Output: a table per configuration and a table of speedups (``tokens_per_s`` of each impl over
that of ``recurrent`` for the same op, mode and T, measured in the same run) on stdout, a tqdm
progress bar on stderr, and with ``--out FILE.json``::

    {"records": [{op, impl, mode, B, T, H, D, K, V, dtype, chunk_size, tokens_per_s, peak_bytes,
                  backend, compile_s, seconds, ...}, ...],
     "speedups": [{op, mode, T, impl, baseline, speedup}, ...],
     "unavailable": [{impl, reason}, ...],
     "failures": [{op, impl, mode, T, reason}, ...],
     "meta": {jax_version, backend, device_kind, cpu_count, date, command, ...}}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

OPS = ("linear_attention", "delta_rule", "titans_memory")
IMPLS = ("recurrent", "chunked", "pallas", "fla")
OPS_IMPLS = ("recurrent", "chunked", "pallas")
# bench kernels: the shapes of the kernel issue, (B, T, H, D), in bfloat16.
KERNEL_SHAPES = ((8, 4096, 16, 128), (4, 16384, 8, 64))
KERNEL_IMPLS = ("pallas", "chunked", "recurrent", "fla")
# flash-linear-attention's counterpart of each op (titans_memory has none).
FLA_OPS = {"delta_rule": "chunk_gated_delta_rule", "linear_attention": "chunk_simple_gla"}
MODES = ("forward", "forward+backward")
DTYPES = ("float32", "bfloat16", "float16", "float64")
BASELINE_IMPL = "recurrent"
REQUIRED_RECORD_KEYS = ("op", "impl", "mode", "B", "T", "H", "D", "dtype", "tokens_per_s",
                        "peak_bytes", "backend")


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------


def _choice_list(allowed: Sequence[str], what: str) -> Callable[[str], list]:
  """argparse type: a comma-separated list of values from ``allowed`` (order kept, no repeats)."""

  def parse(text: str) -> list:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
      raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s; allowed: "
                                       f"{', '.join(allowed)}")
    for x in values:
      if x not in allowed:
        raise argparse.ArgumentTypeError(f"unknown {what} {x!r}; allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(values))

  return parse


def _positive_int_list(text: str) -> list:
  try:
    values = [_positive_int(x.strip()) for x in text.split(",") if x.strip()]
  except argparse.ArgumentTypeError as e:
    raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; {e}")
  if not values:
    raise argparse.ArgumentTypeError("expected at least one positive integer, e.g. 1024,4096")
  return list(dict.fromkeys(values))


def _positive_int(text: str) -> int:
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
  return n


def _non_negative_float(text: str) -> float:
  try:
    x = float(text)
  except ValueError:
    x = -1.0
  if not x >= 0:
    raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds; got {text!r}")
  return x


def _shape_list(text: str) -> list:
  """argparse type: ``BxTxHxD`` shapes, comma-separated."""
  shapes = []
  for item in (x.strip() for x in text.split(",") if x.strip()):
    parts = item.lower().split("x")
    try:
      shape = tuple(_positive_int(x) for x in parts)
    except argparse.ArgumentTypeError:
      shape = ()
    if len(shape) != 4:
      raise argparse.ArgumentTypeError(f"expected shapes BxTxHxD separated by commas, e.g. "
                                       f"8x4096x16x128; got {item!r}")
    shapes.append(shape)
  if not shapes:
    raise argparse.ArgumentTypeError("expected at least one shape BxTxHxD")
  return list(dict.fromkeys(shapes))


def add_ops_arguments(parser: argparse.ArgumentParser, kernels: bool = False) -> None:
  """The flags of ``bench ops`` (``kernels``: the defaults of ``bench kernels``)."""
  parser.add_argument("--batch", type=_positive_int, default=4, help="B (default 4)")
  parser.add_argument("--heads", type=_positive_int, default=8, help="H (default 8)")
  parser.add_argument("--dim", type=_positive_int, default=64,
                      help="head dimension D = K = V (default 64)")
  parser.add_argument("--seq_lens", type=_positive_int_list, default=[1024, 4096],
                      help="sequence lengths T, comma-separated (default 1024,4096)")
  parser.add_argument("--ops", type=_choice_list(OPS, "op"), default=list(OPS),
                      help=f"ops, comma-separated (default {','.join(OPS)})")
  impls = KERNEL_IMPLS if kernels else OPS_IMPLS
  parser.add_argument("--impls", type=_choice_list(IMPLS, "impl"), default=list(impls),
                      help=f"implementations, comma-separated (default {','.join(impls)}); "
                      "unavailable ones are reported and skipped ('fla': flash-linear-attention "
                      "on a CUDA GPU, when installed)")
  default_shapes = [list(x) for x in KERNEL_SHAPES] if kernels else None
  parser.add_argument("--shapes", type=_shape_list, default=default_shapes,
                      help="shapes BxTxHxD, comma-separated; replace --batch/--seq_lens/--heads/"
                      "--dim (default: " + (",".join("x".join(map(str, x)) for x in KERNEL_SHAPES)
                                            if kernels else "from those flags") + ")")
  parser.add_argument("--modes", type=_choice_list(MODES, "mode"), default=list(MODES),
                      help=f"modes, comma-separated (default {','.join(MODES)})")
  dtype = "bfloat16" if kernels else "float32"
  parser.add_argument("--dtype", choices=DTYPES, default=dtype,
                      help=f"input dtype (default {dtype})")
  parser.add_argument("--chunk_size", type=_positive_int, default=64,
                      help="chunk_size of the ops (default 64)")
  parser.add_argument("--repeats", type=_positive_int, default=3,
                      help="timed runs per configuration, median reported (default 3)")
  parser.add_argument("--slow_run_s", type=_non_negative_float, default=10.0,
                      help="time a configuration only once when its warm-up run takes longer "
                      "than this many seconds (default 10; 0 disables the rule)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the inputs (default 0)")
  parser.add_argument("--out", metavar="FILE.json", default=None,
                      help="write records, speedups and metadata to this JSON file")
  parser.add_argument("--no_progress", dest="progress", action="store_false",
                      help="no progress bar on stderr")
  parser.add_argument("--timeout_s", type=_non_negative_float, default=300.0,
                      help="kill a configuration's child process after this many seconds and "
                      "report it under failures (default 300; 0: no limit)")
  parser.add_argument("--stall_s", type=_non_negative_float, default=60.0,
                      help="on CPU, kill a child that used no CPU time for this many seconds "
                      "(a hung XLA runtime) and report it under failures (default 60; 0: never)")
  parser.add_argument("--retries", type=int, default=1,
                      help="runs of a configuration that failed or timed out (default 1)")
  parser.add_argument("--in_process", action="store_true",
                      help="measure in this process instead of one child process per "
                      "configuration (no timeout)")
  parser.set_defaults(bench_fn=run_ops_command, benchmark_name="kernels" if kernels else "ops")


def configure_parser(parser: argparse.ArgumentParser) -> None:
  """Adds the benchmark subcommands (``ops``, ``kernels``, ``models``) to ``parser``."""
  sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
  ops_parser = sub.add_parser(
      "ops", help="tokens/s and peak memory of the associative-memory ops",
      description="Tokens/s, peak memory and compile time of linear_attention, delta_rule and "
      "titans_memory per implementation (recurrent, chunked, pallas), forward and "
      "forward+backward, with the chunked/recurrent speedups.")
  add_ops_arguments(ops_parser)
  kernels_parser = sub.add_parser(
      "kernels", help="the Pallas kernels against the XLA forms (and flash-linear-attention)",
      description="bench ops at the kernels' shapes (default B×T×H×D 8×4096×16×128 and "
      "4×16384×8×64, bfloat16): tokens/s, achieved TFLOP/s and GB/s of pallas, chunked and "
      "recurrent, and on a CUDA GPU flash-linear-attention's chunk_gated_delta_rule and "
      "chunk_simple_gla when installed. Configurations whose XLA memory analysis exceeds the "
      "available memory are reported as failures, not run.")
  add_ops_arguments(kernels_parser, kernels=True)
  models_parser = sub.add_parser(
      "models", help="train-step tokens/s and peak memory of every model family (~20M params)",
      description="Train-step (value_and_grad + adamw) tokens/s and peak memory of every family "
      "of the model zoo at about 20M parameters, with ratios to Transformer++.")
  from nlx import bench_models  # pylint: disable=g-import-not-at-top  (no JAX at import)
  bench_models.add_arguments(models_parser)
  models_parser.set_defaults(bench_fn=bench_models.run)


def build_parser(prog: str = "python -m nlx.bench") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description="Benchmarks of nlx.")
  configure_parser(parser)
  return parser


# ----------------------------------------------------------------------------------------------
# The benchmark
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
      return ops.linear_attention(x["q"], x["k"], x["v"], g=x["g"], initial_state=x["initial_state"],
                                  chunk_size=chunk_size, impl=impl)
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
            "than a speed path; `nlx bench kernels` measures them on a GPU or TPU")
  if impl == "fla":
    return _fla_unavailable()
  for op in OPS:
    try:
      jax.block_until_ready(make_fn(op, impl, "forward", 4)(make_inputs(op, 1, 4, 1, 4, dtype)))
    except NotImplementedError as e:
      return f"{type(e).__name__}: {e}"
  return None


def _memory(compiled) -> dict:
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return out
  parts = {name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "temp", "alias")}
  out.update({f"{k}_bytes": v for k, v in parts.items()})
  out["peak_bytes"] = parts["argument"] + parts["output"] + parts["temp"]
  xla_peak = getattr(m, "peak_memory_in_bytes", None)
  if xla_peak:
    out["xla_peak_memory_bytes"] = int(xla_peak)
  return out


def measure(op: str, impl: str, mode: str, b: int, t: int, h: int, d: int, dtype_name: str,
            chunk_size: int, repeats: int, slow_run_s: float = 10.0, seed: int = 0) -> dict:
  """Compiles, warms up and times one configuration; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(dtype_name)
  inputs = jax.block_until_ready(make_inputs(op, b, t, h, d, dtype, seed))
  start = time.perf_counter()
  compiled = jax.jit(make_fn(op, impl, mode, chunk_size)).lower(inputs).compile()
  compile_s = time.perf_counter() - start
  _check_memory(_memory(compiled).get("peak_bytes"))

  start = time.perf_counter()
  jax.block_until_ready(compiled(inputs))
  warmup_s = time.perf_counter() - start
  n = 1 if (slow_run_s > 0 and warmup_s > slow_run_s) else repeats
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(compiled(inputs))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)

  device = jax.devices()[0]
  record = {"op": op, "impl": impl, "mode": mode, "B": b, "T": t, "H": h, "D": d, "K": d, "V": d,
            "dtype": dtype_name, "chunk_size": chunk_size, "tokens_per_s": b * t / seconds,
            "peak_bytes": None, "backend": jax.default_backend(), "device_kind": device.device_kind,
            "compile_s": compile_s, "warmup_s": warmup_s, "seconds": seconds, "repeats": n,
            "times_s": times}
  record.update(_memory(compiled))
  record.update(work(op, mode, inputs, compiled.out_info, chunk_size, seconds))
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    record["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  return record


def _available_bytes() -> Optional[int]:
  """Memory available to a new allocation: the device's limit, or MemAvailable on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _check_memory(peak_bytes: Optional[int]) -> None:
  """Refuses to run a configuration that XLA says needs more than 90% of the free memory."""
  available = _available_bytes()
  if peak_bytes and available and peak_bytes > 0.9 * available:
    raise MemoryError(f"not run: needs {peak_bytes / 2**30:.1f} GiB (XLA memory analysis), "
                      f"{available / 2**30:.1f} GiB available")


def _nbytes(tree) -> int:
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
  in_bytes, out_bytes = _nbytes(inputs), _nbytes(outputs)
  nbytes = in_bytes + out_bytes
  if mode == "forward+backward":
    flops, nbytes = 3 * flops, 3 * in_bytes + 2 * out_bytes
  return {"flops": int(flops), "bytes": int(nbytes), "tflops_per_s": flops / seconds / 1e12,
          "gb_per_s": nbytes / seconds / 1e9}


def _fla_unavailable() -> Optional[str]:
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


def _table(header: Sequence[str], rows: list) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda row: "  ".join(str(x).rjust(w) if i >= 4 or x == "" else str(x).ljust(w)
                               for i, (x, w) in enumerate(zip(row, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _shape(r: dict) -> str:
  return "x".join(str(r[k]) for k in ("B", "T", "H", "D"))


def format_tables(result: dict) -> str:
  rate = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "n/a"
  rows = [[r["op"], r["impl"], r["mode"], r["T"], _shape(r), f"{r['tokens_per_s']:,.0f}",
           rate(r, "tflops_per_s", "{:.4f}"), rate(r, "gb_per_s", "{:.2f}"),
           "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.1f}",
           f"{r['compile_s']:.2f}"] for r in result["records"]]
  text = [_table(["op", "impl", "mode", "T", "BxTxHxD", "tokens/s", "TFLOP/s", "GB/s",
                  "peak MiB", "compile s"], rows)]
  for baseline in dict.fromkeys(s.get("baseline", BASELINE_IMPL) for s in result["speedups"]):
    rows = [[s["op"], s["impl"], s["mode"], s["T"], _shape(s) if "B" in s else "",
             f"{s['speedup']:.2f}x"] for s in result["speedups"]
            if s.get("baseline", BASELINE_IMPL) == baseline]
    text += ["", f"speedup: tokens/s over {baseline}, same run",
             _table(["op", "impl", "mode", "T", "BxTxHxD", "speedup"], rows)]
  for u in result["unavailable"]:
    text += ["", f"impl {u['impl']!r} unavailable, skipped: {u['reason']}"]
  for f in result.get("failures", []):
    text += ["", f"FAILED {f['op']} {f['impl']} {f['mode']} T={f['T']}: {f['reason']}"]
  return "\n".join(text)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_state() -> Optional[dict]:
  """Commit and dirtiness of the nlx sources when they are a git checkout (else None)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", here],
                           capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty_files": [line[3:] for line in dirty.splitlines()]}


def device_info() -> dict:
  """Backend and device of this process (initialises the JAX backend)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count()}


# ----------------------------------------------------------------------------------------------
# Child processes: one per configuration
# ----------------------------------------------------------------------------------------------

_CHILD_COMMAND = "_child"
_RESULT_MARKER = "NLX_BENCH_RESULT "


def _run_spec(spec: dict) -> dict:
  """Runs one job (``probe`` an impl, or ``measure`` a configuration) in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  if spec["dtype"] == "float64":
    jax.config.update("jax_enable_x64", True)
  if spec["kind"] == "probe":
    dtype = jax.numpy.dtype(spec["dtype"])
    return {"reasons": {impl: probe_impl(impl, dtype) for impl in spec["impls"]}, **device_info()}
  if spec["impl"] == "fla":
    return measure_fla(spec["op"], spec["mode"], spec["B"], spec["T"], spec["H"], spec["D"],
                       spec["dtype"], spec["chunk_size"], spec["repeats"], spec["seed"])
  return measure(spec["op"], spec["impl"], spec["mode"], spec["B"], spec["T"], spec["H"],
                 spec["D"], spec["dtype"], spec["chunk_size"], spec["repeats"],
                 spec["slow_run_s"], spec["seed"])


def _child_main(spec_json: str) -> int:
  result = _run_spec(json.loads(spec_json))
  sys.stdout.write(_RESULT_MARKER + json.dumps(result) + "\n")
  sys.stdout.flush()
  return 0


def _cpu_seconds(pid: int) -> Optional[float]:
  """User + system CPU seconds of process ``pid`` (Linux /proc), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def _run_in_child(spec: dict, timeout_s: float, attempts: int,
                  stall_s: float = 0.0) -> tuple[Optional[dict], str]:
  """Runs ``spec`` in a fresh ``python -m nlx.bench`` process; (result, "") or (None, why).

  The child is killed after ``timeout_s`` seconds (0: never) or, with ``stall_s`` > 0, once it
  has used less than 0.1 s of CPU time in the last ``stall_s`` seconds (a hung XLA CPU runtime
  sleeps; a working CPU benchmark never does).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "nlx.bench", _CHILD_COMMAND, json.dumps(spec)]
  reasons = []
  for _ in range(max(1, attempts)):
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
      proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)  # pylint: disable=consider-using-with
      start = time.monotonic()
      cpu_mark, mark_time, killed = 0.0, start, None
      while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        if timeout_s and now - start > timeout_s:
          killed = f"timed out after {timeout_s:g} s (child killed)"
        elif stall_s:
          cpu = _cpu_seconds(proc.pid)
          if cpu is None or cpu - cpu_mark > 0.1:
            cpu_mark, mark_time = cpu or 0.0, now
          elif now - mark_time > stall_s:
            killed = (f"stalled: no CPU progress for {stall_s:g} s after {now - start:.0f} s "
                      "(hung XLA runtime; child killed)")
        if killed:
          proc.kill()
          proc.wait()
          break
      if killed:
        reasons.append(killed)
        continue
      out.seek(0)
      for line in out.read().splitlines():
        if line.startswith(_RESULT_MARKER):
          return json.loads(line[len(_RESULT_MARKER):]), ""
      err.seek(0)
      lines = err.read().strip().splitlines()
      reasons.append(f"child exited with status {proc.returncode}: "
                     f"{lines[-1] if lines else 'no output'}")
  return None, "; ".join(reasons)


# ----------------------------------------------------------------------------------------------
# bench ops
# ----------------------------------------------------------------------------------------------


def _write_json(path: str, result: dict) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def run_ops(args: argparse.Namespace, command: Optional[str] = None) -> dict:
  """Runs ``bench ops`` for parsed ``args``.

  Returns ``{records, speedups, unavailable, failures, meta}`` (see the module docstring). With
  ``args.out`` the file is rewritten after every configuration (``meta.complete`` false until the
  end), so a long run that is interrupted keeps what it measured.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  isolated = not args.in_process
  shapes = [tuple(x) for x in (args.shapes or [(args.batch, t, args.heads, args.dim)
                                               for t in args.seq_lens])]
  start = time.perf_counter()
  load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  git_before = _git_state()
  info = {}

  def run(spec: dict) -> tuple[Optional[dict], str]:
    spec = {"dtype": args.dtype, **spec}
    if not isolated:
      return _run_spec(spec), ""
    # Stall detection only where a working child is always busy on the CPU.
    stall_s = args.stall_s if info.get("backend") == "cpu" else 0.0
    return _run_in_child(spec, args.timeout_s, 1 + max(0, args.retries), stall_s)

  def result(complete: bool) -> dict:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    meta = {
        **info,
        "cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu_model": _cpu_model(),
        "python": platform.python_version(), "platform": platform.platform(), "date": date,
        "command": command if command is not None else " ".join(sys.argv),
        "config": {"benchmark": args.benchmark_name, "shapes": shapes,
                   "batch": args.batch, "heads": args.heads, "dim": args.dim,
                   "seq_lens": args.seq_lens, "ops": args.ops, "impls": args.impls,
                   "modes": args.modes, "dtype": args.dtype, "chunk_size": args.chunk_size,
                   "repeats": args.repeats, "slow_run_s": args.slow_run_s, "seed": args.seed,
                   "isolated": isolated, "timeout_s": args.timeout_s, "stall_s": args.stall_s,
                   "retries": args.retries},
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                           "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
        "total_s": time.perf_counter() - start,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "peak_bytes_definition": "argument + output + temp bytes of XLA's compiled memory analysis",
        "complete": complete,
        # The sources measured: children import nlx afresh, so edits during a run would count.
        "nlx_git_before": git_before, "nlx_git_after": _git_state(),
    }
    ratios = speedups(records) + speedups(records, "chunked") + speedups(records, "fla")
    ratios = [r for r in ratios if r["impl"] != BASELINE_IMPL]
    return {"records": records, "speedups": ratios, "unavailable": unavailable,
            "failures": failures, "meta": meta}

  records, failures = [], []
  probe, why = run({"kind": "probe", "impls": args.impls})
  if probe is None:
    raise RuntimeError(f"could not probe the implementations {args.impls}: {why}")
  info.update({k: v for k, v in probe.items() if k != "reasons"})
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
    record, why = run(spec)
    if record is None:
      failures.append({"op": op, "impl": impl, "mode": mode, "B": b, "T": t,
                       "H": h, "D": d, "dtype": args.dtype, "reason": why})
      bar.write(f"FAILED {op} {impl} {mode} T={t}: {why}", file=sys.stderr)
    else:
      record["isolated"] = isolated
      records.append(record)
    if args.out:
      _write_json(args.out, result(complete=False))
  bar.close()
  return result(complete=True)


def run_ops_command(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """``bench ops``: runs, prints the tables, writes ``--out``; 1 if a configuration failed."""
  result = run_ops(args, command)
  meta = result["meta"]
  print(format_tables(result))
  print(f"\ntotal {meta['total_s']:.1f} s on {meta.get('backend', '?')} "
        f"({meta.get('device_kind', '?')}; {meta['cpu_count']} CPUs: {meta['cpu_model']})")
  if args.out:
    _write_json(args.out, result)
    print(f"wrote {args.out}")
  return 1 if result["failures"] else 0


def run_parsed(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """Runs the benchmark selected by parsed arguments (from ``build_parser`` or ``nlx bench``)."""
  return args.bench_fn(args, command)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from nlx.cli import normalize_flags  # pylint: disable=g-import-not-at-top
  argv = normalize_flags(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [_CHILD_COMMAND]:
    return _child_main(argv[1])
  args = build_parser().parse_args(argv)
  return run_parsed(args, "python -m nlx.bench " + " ".join(argv))


if __name__ == "__main__":
  sys.exit(main())
