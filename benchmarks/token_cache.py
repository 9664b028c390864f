"""``python -m benchmarks.token_cache``: a run's data start-up time and peak host memory, with the
token cache (``nlx.data.token_cache``) and without (``data.token_cache=False``).

A text corpus of ``--size_mb`` MiB (the embedded tinyshakespeare corpus repeated, each copy headed
by its number) is written to a temporary directory; it is one ``data.source='text'`` file, whose
last 10% is the validation split. Each variant then starts a run's data in a fresh child process
(``python -m benchmarks.token_cache _child SPEC``), as ``nlx train`` does: ``pipeline.load_splits``,
a grain train iterator (``pipeline.train_iterator``) and its first batch, the validation batches.

Variants, in order (they share the cache directory):

* ``in_memory``: ``data.token_cache=False``: the text read, tokenized and packed in memory (what
  every host did at every start before the cache).
* ``cache_build``: the token cache, empty: the first start tokenizes once into the store.
* ``cache_restart``: the token cache again: a restart, or another host, reuses the store.

Measurements (one record per tokenizer and variant):

* ``startup_s``: wall time from before ``load_splits`` to the first training batch (and the
  validation batches) in hand.
* ``peak_rss_bytes``: the child's peak resident set (``VmHWM`` of ``/proc/self/status``);
  ``base_rss_bytes`` its resident set after the imports, before any data; ``data_rss_bytes`` the
  difference (what the data cost).
* ``train_windows``, ``store_bytes`` (the store's files; 0 in memory).

A child whose resident set passes ``--max_rss_gb`` is killed (a failure, not a crash of the
machine). ``--tokenizers sentencepiece`` adds a SentencePiece model of 1024 pieces trained (once,
not timed) on the first 2 MiB.

Output: a table on stdout; with ``--out FILE.json``::

    {"records": [{tokenizer, variant, startup_s, peak_rss_bytes, ...}, ...],
     "failures": [{tokenizer, variant, reason}, ...], "meta": {...}}

The exit status is 0, or 1 when a variant failed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from benchmarks import harness

VARIANTS = ("in_memory", "cache_build", "cache_restart")
TOKENIZERS = ("byte", "sentencepiece")
CORPUS = os.path.join(harness.ROOT, "nlx", "data", "corpus", "tinyshakespeare_400k.txt.gz")
REQUIRED_RECORD_KEYS = ("tokenizer", "variant", "startup_s", "peak_rss_bytes", "base_rss_bytes",
                        "train_windows")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.token_cache",
      description="Data start-up time and peak host RSS of a text corpus: tokenized in memory, "
      "a first start that builds the token cache, and a restart that reuses it.")
  parser.add_argument("--size_mb", type=harness.positive_int, default=1024,
                      help="corpus size in MiB (default 1024)")
  parser.add_argument("--tokenizers", type=harness.choice_list(TOKENIZERS, "tokenizer"),
                      default=["byte"], help="comma-separated: byte (default), sentencepiece")
  parser.add_argument("--variants", type=harness.choice_list(VARIANTS, "variant"),
                      default=list(VARIANTS),
                      help=f"comma-separated (default {','.join(VARIANTS)})")
  parser.add_argument("--seq_len", type=harness.positive_int, default=2048,
                      help="train.seq_len (default 2048)")
  parser.add_argument("--batch_size", type=harness.positive_int, default=16,
                      help="train.batch_size (default 16)")
  parser.add_argument("--dir", default=None,
                      help="where the corpus and the cache go (default: a temporary directory, "
                      "removed at the end)")
  parser.add_argument("--max_rss_gb", type=float, default=None,
                      help="kill a variant whose resident set passes this (default: 85%% of the "
                      "memory available at the start)")
  parser.add_argument("--timeout_s", type=float, default=3600.0,
                      help="kill a variant after this many seconds (default 3600)")
  parser.add_argument("--out", metavar="FILE.json", default=None,
                      help="write records, failures and metadata to this JSON file")
  return parser


def write_corpus(path: str, size_mb: int) -> int:
  """Writes ``size_mb`` MiB of text (the embedded corpus repeated); returns its bytes."""
  with gzip.open(CORPUS, "rb") as f:
    text = f.read()
  target, written, copy = size_mb << 20, 0, 0
  with open(path, "wb") as f:
    while written < target:
      chunk = (f"=== copy {copy} ===\n".encode() + text)[:target - written]
      f.write(chunk)
      written, copy = written + len(chunk), copy + 1
  return written


def _status(key: str, pid: str = "self", meminfo: bool = False) -> Optional[int]:
  """``VmRSS``/``VmHWM`` of ``/proc/PID/status`` (or ``key`` of ``/proc/meminfo``) in bytes (None
  where unknown)."""
  try:
    with open("/proc/meminfo" if meminfo else f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return None


def _store_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory)
             for f in files)


def run_spec(spec: dict) -> dict:
  """The child: one variant's data start-up, measured."""
  from nlx.data import pipeline  # pylint: disable=g-import-not-at-top
  from nlx.train import config as run_config  # pylint: disable=g-import-not-at-top
  os.environ["NLX_CACHE"] = spec["cache"]
  data = run_config.DataConfig(source="text", path=spec["corpus"], tokenizer=spec["tokenizer"],
                               spm_model=spec.get("spm_model"),
                               token_cache=spec["variant"] != "in_memory")
  base = _status("VmRSS")
  start = time.perf_counter()
  _, train, val = pipeline.load_splits(data, spec["seq_len"])
  batches = pipeline.train_iterator(train, batch_size=spec["batch_size"], steps=10, seed=0)
  first = next(batches)
  pipeline.eval_batches(val, batch_size=spec["batch_size"], n_batches=2)
  startup = time.perf_counter() - start
  peak = _status("VmHWM")
  return {"tokenizer": spec["tokenizer"], "variant": spec["variant"], "startup_s": startup,
          "peak_rss_bytes": peak, "base_rss_bytes": base,
          "data_rss_bytes": peak - base if peak and base else None,
          "train_windows": len(train), "val_windows": len(val),
          "first_batch_sum": int(first.sum()),
          "store_bytes": _store_bytes(os.path.join(spec["cache"], "tokens"))
                         if spec["variant"] != "in_memory" else 0}


def run_child(spec: dict, timeout_s: float, max_rss: Optional[int]) -> tuple:
  """``(result, "")`` of ``spec`` in a fresh child, or ``(None, why)``; killed over the limits."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    # pylint: disable-next=consider-using-with  (polled, killed and waited for below)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.token_cache",
                             harness.CHILD_COMMAND, json.dumps(spec)], stdout=out, stderr=err,
                            text=True, cwd=harness.ROOT, env=env)
    start, killed, seen = time.monotonic(), None, 0
    while proc.poll() is None:
      time.sleep(0.05)
      rss = _status("VmRSS", str(proc.pid)) or 0
      seen = max(seen, rss)
      if max_rss and rss > max_rss:
        killed = f"resident set {rss / 2**30:.1f} GiB passed --max_rss_gb (child killed)"
      elif time.monotonic() - start > timeout_s:
        killed = f"timed out after {timeout_s:g} s (child killed)"
      if killed:
        proc.kill()
        proc.wait()
        return None, killed
    out.seek(0)
    for line in out.read().splitlines():
      if line.startswith(harness.RESULT_MARKER):
        return json.loads(line[len(harness.RESULT_MARKER):]), ""
    err.seek(0)
    lines = err.read().strip().splitlines()
    return None, f"child exited with status {proc.returncode}: {lines[-1] if lines else ''}"


def format_table(records: list) -> str:
  rows = [[r["tokenizer"], r["variant"], f"{r['train_windows']:,}", "",
           f"{r['startup_s']:.2f}", f"{r['peak_rss_bytes'] / 2**20:,.0f}",
           f"{(r['data_rss_bytes'] or 0) / 2**20:,.0f}", f"{r['store_bytes'] / 2**20:,.0f}"]
          for r in records]
  return harness.format_table(["tokenizer", "variant", "windows", "", "startup s",
                               "peak RSS MiB", "data RSS MiB", "store MiB"], rows)


def run(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """Runs the benchmark: prints the table, writes ``--out``; 1 if a variant failed."""
  run_info = harness.RunInfo(command)
  available = _status("MemAvailable", meminfo=True)
  max_rss = int(args.max_rss_gb * 2**30) if args.max_rss_gb else (
      int(0.85 * available) if available else None)
  directory = args.dir or tempfile.mkdtemp(prefix="nlx_bench_token_cache_")
  os.makedirs(directory, exist_ok=True)
  corpus = os.path.join(directory, "corpus.txt")
  corpus_bytes = write_corpus(corpus, args.size_mb)
  records, failures = [], []

  def result(complete: bool) -> dict:
    config = {"size_mb": args.size_mb, "corpus_bytes": corpus_bytes, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "tokenizers": args.tokenizers,
              "variants": args.variants, "max_rss_bytes": max_rss}
    meta = run_info.meta({"backend": "cpu (data only)", "device_kind": "host"}, config,
                         "peak_rss_bytes: VmHWM (peak resident set) of the child process",
                         complete)
    return {"records": records, "failures": failures, "meta": meta}

  try:
    for tokenizer in args.tokenizers:
      spec = {"tokenizer": tokenizer, "corpus": corpus, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "cache": os.path.join(directory, f"cache_{tokenizer}")}
      if tokenizer == "sentencepiece":
        spec["spm_model"] = _train_spm(corpus, directory)
      for variant in args.variants:
        print(f"{tokenizer} {variant} ...", file=sys.stderr, flush=True)
        record, why = run_child({**spec, "variant": variant}, args.timeout_s, max_rss)
        if record is None:
          failures.append({"tokenizer": tokenizer, "variant": variant, "reason": why})
          print(f"FAILED {tokenizer} {variant}: {why}", file=sys.stderr)
        else:
          records.append(record)
        if args.out:  # rewritten after every variant: an interrupted run keeps what it measured
          harness.write_json(args.out, result(complete=False))
  finally:
    if not args.dir:
      shutil.rmtree(directory, ignore_errors=True)
  return harness.report(format_table(records),
                        [f"{f['tokenizer']} {f['variant']}: {f['reason']}" for f in failures],
                        result(complete=True), args.out)


def _train_spm(corpus: str, directory: str) -> str:
  from nlx.data import tokenizers  # pylint: disable=g-import-not-at-top
  with open(corpus, encoding="utf-8") as f:
    text = f.read(2 << 20)
  return tokenizers.train_sentencepiece([text], os.path.join(directory, "spm"), 1024)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [harness.CHILD_COMMAND]:
    return harness.child_main(run_spec, argv[1])
  parser = build_parser()
  return run(harness.parse_args(parser, argv), f"{parser.prog} " + " ".join(argv))


if __name__ == "__main__":
  sys.exit(main())
