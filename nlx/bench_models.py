"""``nlx bench models``: train-step throughput and peak memory of every family of the zoo.

For each family, the ``20m`` size of ``configs/<family>.py`` (about 20M parameters, the paper
sizes' family settings: d_model 384, 10 layers, 6 heads, vocabulary 4096) is trained for a few
steps on random tokens. The step is one jitted pure function of ``(params, opt_state, tokens)``:
``jax.value_and_grad`` of the next-token cross-entropy, then an ``optax.adamw`` update.

Measurements (one record per family), as in ``nlx bench ops``:

* ``compile_s``: wall time of ``jax.jit(step).lower(...).compile()``.
* ``seconds``: median wall time of ``--repeats`` timed steps after one untimed warm-up step
  (once if the warm-up step took longer than ``--slow_run_s``).
* ``tokens_per_s = B·T / seconds``.
* ``peak_bytes``: XLA's compiled memory analysis, argument + output + temp bytes of the step.
* ``params``: the model's parameter count.
* ``tokens_per_s_vs_transformer`` and ``peak_bytes_vs_transformer``: ratios to Transformer++
  measured in the same run (when it is among ``--families``).

Output: a table on stdout; with ``--out FILE.json``::

    {"records": [{family, params, B, T, tokens_per_s, peak_bytes, backend, ...}, ...],
     "failures": [{family, reason}, ...], "meta": {...}}

The exit status is 0, or 1 when a family failed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from typing import Optional

from nlx import bench

BASELINE = "transformer"
FAMILIES = ("transformer", "retnet", "mamba2", "deltanet", "gated_deltanet", "ttt_linear",
            "ttt_mlp", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "samba", "hope",
            "hope_attention")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
REQUIRED_RECORD_KEYS = ("family", "params", "B", "T", "tokens_per_s", "peak_bytes", "backend")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of ``bench models``."""
  parser.add_argument("--families", type=bench._choice_list(FAMILIES, "family"),  # pylint: disable=protected-access
                      default=list(FAMILIES),
                      help=f"families, comma-separated (default: all {len(FAMILIES)})")
  parser.add_argument("--size", default="20m",
                      help="the config size of every family (default 20m, ~20M parameters)")
  parser.add_argument("--batch", type=bench._positive_int, default=1, help="B (default 1)")  # pylint: disable=protected-access
  parser.add_argument("--seq_len", type=bench._positive_int, default=2048,  # pylint: disable=protected-access
                      help="T, tokens per sequence (default 2048)")
  parser.add_argument("--repeats", type=bench._positive_int, default=3,  # pylint: disable=protected-access
                      help="timed steps, median reported (default 3)")
  parser.add_argument("--slow_run_s", type=bench._non_negative_float, default=30.0,  # pylint: disable=protected-access
                      help="time only one step when the warm-up step took longer (default 30)")
  parser.add_argument("--config_dir", default=CONFIG_DIR,
                      help="directory of the family configs (default: the repository's configs/)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every family, e.g. model.impl=recurrent "
                      "(repeatable)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
  parser.add_argument("--out", metavar="FILE.json", default=None,
                      help="write records, failures and metadata to this JSON file")


def make_train_step(graphdef, tx):
  """The pure train step ``(params, opt_state, tokens [B, T+1]) -> (params, opt_state, loss)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def measure(family: str, args: argparse.Namespace) -> dict:
  """Builds, compiles, warms up and times the train step of one family; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx import configs  # pylint: disable=g-import-not-at-top
  from nlx.nn import build_model  # pylint: disable=g-import-not-at-top

  cfg = configs.load(os.path.join(args.config_dir, f"{family}.py:{args.size}"), args.override)
  model = build_model(cfg.model, rngs=nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  tx = optax.adamw(3e-4, weight_decay=0.1)
  opt_state = tx.init(params)
  b, t = args.batch, args.seq_len
  tokens = jax.random.randint(jax.random.PRNGKey(args.seed), (b, t + 1), 0, cfg.model.vocab_size)

  start = time.perf_counter()
  compiled = jax.jit(make_train_step(graphdef, tx)).lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(params, opt_state, tokens))
  warmup_s = time.perf_counter() - start
  if not math.isfinite(float(out[2])):
    raise FloatingPointError(f"non-finite loss {float(out[2])} in the warm-up step")
  n = 1 if (args.slow_run_s > 0 and warmup_s > args.slow_run_s) else args.repeats
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, opt_state, tokens))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  record = {"family": family, "params": n_params, "B": b, "T": t, "tokens_per_s": b * t / seconds,
            "peak_bytes": None, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "size": args.size,
            "compile_s": compile_s, "warmup_s": warmup_s, "seconds": seconds, "repeats": n,
            "times_s": times, "loss": float(out[2])}
  record.update(bench._memory(compiled))  # pylint: disable=protected-access
  return record


def add_ratios(records: list) -> None:
  """Adds ``*_vs_transformer`` ratios to every record when the baseline was measured."""
  base = next((r for r in records if r["family"] == BASELINE), None)
  if base is None:
    return
  for r in records:
    r["tokens_per_s_vs_transformer"] = r["tokens_per_s"] / base["tokens_per_s"]
    if r["peak_bytes"] and base["peak_bytes"]:
      r["peak_bytes_vs_transformer"] = r["peak_bytes"] / base["peak_bytes"]


def format_table(records: list) -> str:
  rows = []
  for r in records:
    speed = r.get("tokens_per_s_vs_transformer")
    mem = r.get("peak_bytes_vs_transformer")
    rows.append([r["family"], f"{r['params'] / 1e6:.1f}M", r["B"], r["T"],
                 f"{r['tokens_per_s']:,.0f}", "n/a" if speed is None else f"{speed:.2f}x",
                 "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}",
                 "n/a" if mem is None else f"{mem:.2f}x", f"{r['compile_s']:.1f}"])
  header = ["family", "params", "B", "T", "tokens/s", "vs T++", "peak MiB", "vs T++", "compile s"]
  return bench._table(header, rows)  # pylint: disable=protected-access


def run(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """Runs ``bench models``: prints the table, writes ``--out``; 1 if a family failed."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
  git_before = bench._git_state()  # pylint: disable=protected-access
  records, failures = [], []
  bar = tqdm(args.families, desc="bench models", unit="family", file=sys.stderr,
             dynamic_ncols=True)

  def result(complete: bool) -> dict:
    add_ratios(records)
    return {"records": records, "failures": failures, "meta": make_meta(complete)}

  def make_meta(complete: bool) -> dict:
    return {**bench.device_info(), "cpu_count": os.cpu_count(), "cpu_model": bench._cpu_model(),  # pylint: disable=protected-access
            "python": platform.python_version(), "platform": platform.platform(), "date": date,
            "command": command if command is not None else " ".join(sys.argv),
            "config": {"families": args.families, "size": args.size, "batch": args.batch,
                       "seq_len": args.seq_len, "repeats": args.repeats,
                       "slow_run_s": args.slow_run_s, "override": args.override,
                       "seed": args.seed, "optimizer": "optax.adamw(3e-4, weight_decay=0.1)"},
            "total_s": time.perf_counter() - start, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "peak_bytes_definition": "argument + output + temp bytes of XLA's compiled memory "
                                     "analysis of the train step",
            "nlx_git_before": git_before, "nlx_git_after": bench._git_state(),  # pylint: disable=protected-access
            "complete": complete}

  for family in bar:
    bar.set_postfix_str(family)
    try:
      records.append(measure(family, args))
    except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
      failures.append({"family": family, "reason": f"{type(e).__name__}: {e}"})
      bar.write(f"FAILED {family}: {type(e).__name__}: {e}", file=sys.stderr)
    if args.out:  # rewritten after every family: an interrupted run keeps what it measured
      bench._write_json(args.out, result(complete=False))  # pylint: disable=protected-access
  bar.close()
  final = result(complete=True)
  meta = final["meta"]
  print(format_table(records))
  for f in failures:
    print(f"\nFAILED {f['family']}: {f['reason']}")
  print(f"\ntotal {meta['total_s']:.1f} s on {meta['backend']} ({meta['device_kind']}; "
        f"{meta['cpu_count']} CPUs: {meta['cpu_model']})")
  if args.out:
    bench._write_json(args.out, final)  # pylint: disable=protected-access
    print(f"wrote {args.out}")
  return 1 if failures else 0
