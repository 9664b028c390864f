"""What the benchmarks share: flags, timing, memory analysis, tables, JSON, metadata, children.

* Timing (``compile_timed``, ``time_runs``): ``compile_s`` is the wall time of
  ``jax.jit(f).lower(...).compile()``; then one untimed warm-up run, then ``repeats`` timed runs,
  each ended by ``jax.block_until_ready``, whose median is ``seconds``. A configuration whose
  warm-up run took longer than ``slow_run_s`` seconds is timed once (at that length one run is
  already a stable measurement).
* Memory (``memory_analysis``): XLA's compiled memory analysis of the executable;
  ``peak_bytes = argument + output + temp`` bytes (nothing is donated, so nothing is aliased),
  plus the parts and XLA's own ``peak_memory_in_bytes`` estimate (``xla_peak_memory_bytes``).
* Output: ``format_table`` (the printed tables), ``write_json`` (atomic rewrite, so that an
  interrupted run keeps what it measured), ``RunInfo.meta`` (host, device, load, git state of
  the nlx sources).
* Isolation (``run_in_child``): one configuration in a fresh ``python -m <module> _child SPEC``
  process, killed after a time limit or when it stops using the CPU (a hung XLA runtime), and
  retried.

JAX is imported inside the functions that need it, so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

# The repository root: the working directory of the child processes (``python -m benchmarks.X``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_COMMAND = "_child"
RESULT_MARKER = "NLX_BENCH_RESULT "
ENV_KEYS = ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "JAX_PLATFORMS",
            "CUDA_VISIBLE_DEVICES")

# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def choice_list(allowed: Sequence[str], what: str) -> Callable[[str], list]:
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


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
  return n


def positive_int_list(text: str) -> list:
  """argparse type: positive integers separated by commas (order kept, no repeats)."""
  try:
    values = [positive_int(x.strip()) for x in text.split(",") if x.strip()]
  except argparse.ArgumentTypeError as e:
    raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; {e}")
  if not values:
    raise argparse.ArgumentTypeError("expected at least one positive integer, e.g. 1024,4096")
  return list(dict.fromkeys(values))


def non_negative_float(text: str) -> float:
  """argparse type: a number of seconds >= 0."""
  try:
    x = float(text)
  except ValueError:
    x = -1.0
  if not x >= 0:
    raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds; got {text!r}")
  return x


def add_common_flags(parser: argparse.ArgumentParser, *, unit: str, slow_run_s: float,
                     out_help: str) -> None:
  """``--repeats``, ``--slow_run_s``, ``--seed`` and ``--out``; ``unit`` names a timed run."""
  parser.add_argument("--repeats", type=positive_int, default=3,
                      help=f"timed {unit}s, median reported (default 3)")
  parser.add_argument("--slow_run_s", type=non_negative_float, default=slow_run_s,
                      help=f"time only one {unit} when the warm-up {unit} takes longer than this "
                      f"many seconds (default {slow_run_s:g}; 0 disables the rule)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
  parser.add_argument("--out", metavar="FILE.json", default=None, help=out_help)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """``parser.parse_args`` after nlx's flag spelling (``--seq-len`` is ``--seq_len``)."""
  from nlx.cli import normalize_flags  # pylint: disable=g-import-not-at-top  (no JAX)
  return parser.parse_args(normalize_flags(argv))


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def compile_timed(fn: Callable, *args) -> tuple[Any, float]:
  """``(jax.jit(fn).lower(*args).compile(), its wall time in seconds)``."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_runs(run: Callable[[], Any], repeats: int, slow_run_s: float) -> tuple[Any, dict]:
  """One untimed warm-up ``run()``, then the timed runs (see the module docstring).

  Returns:
    ``(output of the warm-up run, {"warmup_s", "seconds", "repeats", "times_s"})``; ``seconds``
    is the median of ``times_s``, ``repeats`` how many runs were timed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = jax.block_until_ready(run())
  warmup_s = time.perf_counter() - start
  n = 1 if (slow_run_s > 0 and warmup_s > slow_run_s) else repeats
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return out, {"warmup_s": warmup_s, "seconds": statistics.median(times), "repeats": n,
               "times_s": times}


def time_interleaved(runs: Sequence[Callable[[], Any]], repeats: int,
                     slow_run_s: float) -> tuple[list, list]:
  """``time_runs`` of several functions, interleaved: one untimed warm-up of each, then each
  timed repeat runs every function once in turn, so that load on the machine hits all alike.

  Returns:
    ``(outputs of the warm-up runs, [time_runs' timing dict per function])``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  outs, warmups = [], []
  for run in runs:
    start = time.perf_counter()
    outs.append(jax.block_until_ready(run()))
    warmups.append(time.perf_counter() - start)
  n = 1 if (slow_run_s > 0 and max(warmups) > slow_run_s) else repeats
  times = [[] for _ in runs]
  for _ in range(n):
    for run, ts in zip(runs, times):
      start = time.perf_counter()
      jax.block_until_ready(run())
      ts.append(time.perf_counter() - start)
  return outs, [{"warmup_s": w, "seconds": statistics.median(ts), "repeats": n, "times_s": ts}
                for w, ts in zip(warmups, times)]


def memory_analysis(compiled) -> dict:
  """``peak_bytes`` and its parts from XLA's memory analysis of ``compiled`` ({} if none)."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without the analysis)
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


def available_bytes() -> Optional[int]:
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


def check_memory(peak_bytes: Optional[int]) -> None:
  """Refuses (MemoryError) to run what XLA says needs more than 90% of the free memory."""
  available = available_bytes()
  if peak_bytes and available and peak_bytes > 0.9 * available:
    raise MemoryError(f"not run: needs {peak_bytes / 2**30:.1f} GiB (XLA memory analysis), "
                      f"{available / 2**30:.1f} GiB available")


def device_peak_bytes() -> dict:
  """``{"device_peak_bytes_in_use": n}`` where the device reports ``memory_stats()``, else {}."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"device_peak_bytes_in_use": int(stats["peak_bytes_in_use"])}
  return {}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: list) -> str:
  """A plain-text table: the first four columns left-aligned, the others right-aligned."""
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda row: "  ".join(str(x).rjust(w) if i >= 4 or x == "" else str(x).ljust(w)
                               for i, (x, w) in enumerate(zip(row, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_json(path: str, result: dict) -> None:
  """Writes ``result`` to ``path`` atomically (a temporary file, then a rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def git_state() -> Optional[dict]:
  """Commit and dirty files of the nlx sources when they are a git checkout (else None)."""
  import nlx  # pylint: disable=g-import-not-at-top  (no JAX)
  here = os.path.dirname(os.path.abspath(nlx.__file__))
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


def loadavg() -> Optional[tuple]:
  return os.getloadavg() if hasattr(os, "getloadavg") else None


class RunInfo:
  """The metadata of one benchmark run: taken at its start, completed by ``meta``."""

  def __init__(self, command: Optional[str]):
    self.command = command if command is not None else " ".join(sys.argv)
    self.start = time.perf_counter()
    self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.loadavg_before = loadavg()
    self.git_before = git_state()

  def meta(self, device: dict, config: dict, peak_bytes_definition: str,
           complete: bool) -> dict:
    """``{**device, host, date, command, config, timings, load, nlx git state, complete}``."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        **device,
        "cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu_model": cpu_model(),
        "python": platform.python_version(), "platform": platform.platform(),
        "date": self.date, "command": self.command, "config": config,
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "total_s": time.perf_counter() - self.start,
        "loadavg_before": self.loadavg_before, "loadavg_after": loadavg(),
        "peak_bytes_definition": peak_bytes_definition,
        "complete": complete,
        # The sources measured: children import nlx afresh, so edits during a run would count.
        "nlx_git_before": self.git_before, "nlx_git_after": git_state(),
    }


def summary_line(meta: dict) -> str:
  return (f"total {meta['total_s']:.1f} s on {meta.get('backend', '?')} "
          f"({meta.get('device_kind', '?')}; {meta['cpu_count']} CPUs: {meta['cpu_model']})")


def report(table: str, failures: Sequence[str], final: dict, out: Optional[str]) -> int:
  """Prints a finished run (its table, each failure, the summary line), writes ``final`` to
  ``out`` when given, and returns the exit status: 1 if anything failed, else 0."""
  print(table)
  for failure in failures:
    print(f"\nFAILED {failure}")
  print("\n" + summary_line(final["meta"]))
  if out:
    write_json(out, final)
    print(f"wrote {out}")
  return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# Child processes: one per configuration
# ----------------------------------------------------------------------------------------------


def child_main(run_spec: Callable[[dict], dict], spec_json: str) -> int:
  """The child's side: runs one spec, prints its result after ``RESULT_MARKER``."""
  result = run_spec(json.loads(spec_json))
  sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
  sys.stdout.flush()
  return 0


def cpu_seconds(pid: int) -> Optional[float]:
  """User + system CPU seconds of process ``pid`` (Linux /proc), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def run_in_child(module: str, spec: dict, timeout_s: float, attempts: int,
                 stall_s: float = 0.0) -> tuple[Optional[dict], str]:
  """Runs ``spec`` in a fresh ``python -m module _child SPEC``; (result, "") or (None, why).

  The child runs in the repository root. It is killed after ``timeout_s`` seconds (0: never)
  or, with ``stall_s`` > 0, once it has used less than 0.1 s of CPU time in the last ``stall_s``
  seconds (a hung XLA CPU runtime sleeps; a working CPU benchmark never does).
  """
  cmd = [sys.executable, "-m", module, CHILD_COMMAND, json.dumps(spec)]
  reasons = []
  for _ in range(max(1, attempts)):
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
      # pylint: disable-next=consider-using-with  (polled, killed and waited for below)
      proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
      start = time.monotonic()
      cpu_mark, mark_time, killed = 0.0, start, None
      while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        if timeout_s and now - start > timeout_s:
          killed = f"timed out after {timeout_s:g} s (child killed)"
        elif stall_s:
          cpu = cpu_seconds(proc.pid)
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
        if line.startswith(RESULT_MARKER):
          return json.loads(line[len(RESULT_MARKER):]), ""
      err.seek(0)
      lines = err.read().strip().splitlines()
      reasons.append(f"child exited with status {proc.returncode}: "
                     f"{lines[-1] if lines else 'no output'}")
  return None, "; ".join(reasons)
