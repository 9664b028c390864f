"""``python -m benchmarks.models``: train-step throughput and peak memory of every family.

For each family, the ``20m`` size of its config shipped with nlx (``nlx.configs.load(
"<family>:20m")``: about 20M parameters, the paper sizes' family settings: d_model 384, 10
layers, 6 heads, vocabulary 4096) is trained for a few steps on random tokens. The step is nlx's
one train step, ``nlx.train.step.apply_gradients`` of the next-token cross-entropy
(``nlx.train.fitting.next_token_loss``) with an ``optax.adamw`` update, jitted as one pure
function of ``(params, rest, opt_state, tokens)`` that returns the new parameters, optimizer
state and loss.

Measurements (one record per family; timing and memory as in ``benchmarks.harness``):

* ``compile_s``: wall time of ``jax.jit(step).lower(...).compile()``.
* ``seconds``: median wall time of ``--repeats`` timed steps after one untimed warm-up step
  (once if the warm-up step took longer than ``--slow_run_s``).
* ``tokens_per_s = B·T / seconds``.
* ``peak_bytes``: XLA's compiled memory analysis, argument + output + temp bytes of the step.
* ``params``: the model's parameter count; ``loss``: the loss of the warm-up step.
* ``step_flops``: the matmul FLOPs of the step's jaxpr (``nlx.train.aot.jaxpr_flops``: every dot
  and convolution, scan bodies times their length, rematerialised forward passes included, so
  the work the step does, not ``6·N·tokens``); ``flops_per_token`` and ``gflops_per_s`` (achieved
  matmul throughput, ``step_flops / seconds``) follow. Two families at equal matmul efficiency
  run at the inverse ratio of their ``flops_per_token``.
* ``tokens_per_s_vs_transformer`` and ``peak_bytes_vs_transformer``: ratios to Transformer++
  measured in the same run (when it is among ``--families``).

``--packed both`` measures every family twice in one run, interleaved step by step: without
document boundaries, and with packed documents (``model(tokens, segment_ids=ids)`` and the loss
masked where a target crosses a boundary, as ``train.pack_documents`` trains), the documents of
every row of lengths drawn around ``--doc_len`` (a fixed layout per seed). The packed record adds
``packed_tokens_per_s``, ``packed_peak_bytes`` and ``packed_vs_unpacked`` (the ratio of the two
throughputs); ``--packed on`` measures the packed step only.

``--compare KEY=VALUE`` (repeatable) measures every family twice in one run, interleaved step by
step: with its config (and ``--override``), and with these overrides on top, e.g. ``--compare
model.scan_layers=False``. The record adds ``compare_tokens_per_s``, ``compare_peak_bytes``,
``compare_compile_s``, ``compare_loss`` and ``compare_vs_base`` (the ratio of the two
throughputs: above 1 when the overrides are faster).

Output: a table on stdout; with ``--out FILE.json``::

    {"records": [{family, params, B, T, tokens_per_s, peak_bytes, backend, ...}, ...],
     "failures": [{family, reason}, ...], "meta": {...}}

The exit status is 0, or 1 when a family failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

from benchmarks import harness

BASELINE = "transformer"
FAMILIES = ("transformer", "retnet", "mamba2", "deltanet", "gated_deltanet", "ttt_linear",
            "ttt_mlp", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "samba", "hope",
            "hope_attention")
REQUIRED_RECORD_KEYS = ("family", "params", "B", "T", "tokens_per_s", "peak_bytes", "backend")
OPTIMIZER = "optax.adamw(3e-4, weight_decay=0.1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of the models benchmark."""
  parser.add_argument("--families", type=harness.choice_list(FAMILIES, "family"),
                      default=list(FAMILIES),
                      help=f"families, comma-separated (default: all {len(FAMILIES)})")
  parser.add_argument("--size", default="20m",
                      help="the config size of every family (default 20m, ~20M parameters)")
  parser.add_argument("--batch", type=harness.positive_int, default=1, help="B (default 1)")
  parser.add_argument("--seq_len", type=harness.positive_int, default=2048,
                      help="T, tokens per sequence (default 2048)")
  harness.add_common_flags(parser, unit="step", slow_run_s=30.0,
                           out_help="write records, failures and metadata to this JSON file")
  parser.add_argument("--packed", choices=("off", "on", "both"), default="off",
                      help="document boundaries in the step: off (default), on, or both in one "
                           "run, interleaved")
  parser.add_argument("--doc_len", type=harness.positive_int, default=64,
                      help="mean document length of --packed (default 64 tokens)")
  parser.add_argument("--config_dir", default=None,
                      help="directory of <family>.py config files (default: the configs shipped "
                      "with nlx, nlx.configs.load('<family>:<size>'))")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every family, e.g. model.impl=recurrent "
                      "(repeatable)")
  parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                      help="also measure every family with these overrides, interleaved with "
                      "the plain step, e.g. model.scan_layers=False (repeatable; not with "
                      "--packed)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.models",
      description="Train-step (nlx's apply_gradients + adamw) tokens/s and peak memory of every "
      "family of the model zoo at about 20M parameters, with ratios to Transformer++.")
  add_arguments(parser)
  return parser


def config_spec(family: str, size: str, config_dir: Optional[str] = None) -> str:
  """The ``nlx.configs.load`` spec of ``family`` at ``size``: shipped, or in ``config_dir``."""
  if config_dir is None:
    return f"{family}:{size}"
  return os.path.join(config_dir, f"{family}.py:{size}")


def make_train_step(graphdef, tx):
  """``(params, rest, opt_state, tokens [B, T+1]) -> (params, opt_state, loss)``: nlx's train step
  (``apply_gradients`` of ``next_token_loss``), pure; a non-finite step keeps the old params."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx.train.fitting import next_token_loss  # pylint: disable=g-import-not-at-top
  from nlx.train.step import apply_gradients  # pylint: disable=g-import-not-at-top

  def train_step(params, rest, opt_state, tokens):
    up = apply_gradients(lambda p: next_token_loss(nnx.merge(graphdef, p, rest), tokens), tx,
                         params, opt_state)
    return up.params, up.opt_state, up.loss

  return train_step


def make_packed_train_step(graphdef, tx):
  """``make_train_step`` on packed documents: ``(params, rest, opt_state, tokens, ids)`` with
  ``ids [B, T+1]`` the segment ids; targets that cross a document boundary are not scored."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx.train.step import apply_gradients  # pylint: disable=g-import-not-at-top

  def loss_fn(params, rest, tokens, ids):
    model = nnx.merge(graphdef, params, rest)
    logits = model(tokens[:, :-1], segment_ids=ids[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    keep = (ids[:, 1:] == ids[:, :-1]).astype(jnp.float32)
    return (losses * keep).sum() / jnp.maximum(keep.sum(), 1.0)

  def train_step(params, rest, opt_state, tokens, ids):
    up = apply_gradients(lambda p: loss_fn(p, rest, tokens, ids), tx, params, opt_state)
    return up.params, up.opt_state, up.loss

  return train_step


def document_ids(batch: int, length: int, doc_len: int, seed: int):
  """Segment ids ``[batch, length]`` of documents with lengths ``1 + Poisson(doc_len − 1)``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    lo, doc = 0, 0
    while lo < length:
      n = 1 + int(rng.poisson(doc_len - 1))
      ids[row, lo:lo + n] = doc
      lo, doc = lo + n, doc + 1
  return ids


def measure(family: str, args: argparse.Namespace) -> dict:
  """Builds, compiles, warms up and times the train step of one family; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from nlx import configs  # pylint: disable=g-import-not-at-top
  from nlx.nn import build_model  # pylint: disable=g-import-not-at-top

  def setup(overrides):
    cfg = configs.load(config_spec(family, args.size, args.config_dir), overrides)
    model = build_model(cfg.model, rngs=nnx.Rngs(args.seed))
    return cfg, nnx.split(model, nnx.Param, ...)

  cfg, (graphdef, params, rest) = setup(args.override)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  tx = optax.adamw(3e-4, weight_decay=0.1)
  opt_state = tx.init(params)
  b, t = args.batch, args.seq_len
  tokens = jax.random.randint(jax.random.PRNGKey(args.seed), (b, t + 1), 0, cfg.model.vocab_size)

  packed = getattr(args, "packed", "off")
  compare = getattr(args, "compare", [])
  if compare:
    _, (graphdef_b, params_b, rest_b) = setup(list(args.override) + list(compare))
    opt_state_b = tx.init(params_b)
    step_b, compile_b = harness.compile_timed(make_train_step(graphdef_b, tx), params_b, rest_b,
                                              opt_state_b, tokens)
    run_b = lambda: step_b(params_b, rest_b, opt_state_b, tokens)
  if packed != "off":
    ids = jax.numpy.asarray(document_ids(b, t + 1, args.doc_len, args.seed))
    packed_step, packed_compile_s = harness.compile_timed(
        make_packed_train_step(graphdef, tx), params, rest, opt_state, tokens, ids)
    run_packed = lambda: packed_step(params, rest, opt_state, tokens, ids)
  if packed == "on":  # the packed step stands in for the plain one
    compiled, compile_s, run_plain = packed_step, packed_compile_s, run_packed
  else:
    compiled, compile_s = harness.compile_timed(make_train_step(graphdef, tx), params, rest,
                                                opt_state, tokens)
    run_plain = lambda: compiled(params, rest, opt_state, tokens)
  if packed == "both":  # interleaved: one plain step, one packed step, per repeat
    (out, packed_out), (timing, packed_timing) = harness.time_interleaved(
        [run_plain, run_packed], args.repeats, args.slow_run_s)
  elif compare:  # interleaved: one step without the compared overrides, one with them
    (out, out_b), (timing, timing_b) = harness.time_interleaved(
        [run_plain, run_b], args.repeats, args.slow_run_s)
  else:
    out, timing = harness.time_runs(run_plain, args.repeats, args.slow_run_s)
  loss = float(out[2])
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the warm-up step")
  record = {"family": family, "params": n_params, "B": b, "T": t,
            "tokens_per_s": b * t / timing["seconds"], "peak_bytes": None,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "size": args.size, "compile_s": compile_s, "packed": packed, **timing, "loss": loss}
  record.update(harness.memory_analysis(compiled))
  record.update(step_flops(make_train_step(graphdef, tx), timing["seconds"], b * t, params, rest,
                           opt_state, tokens))
  if packed == "both":
    record.update(packed_tokens_per_s=b * t / packed_timing["seconds"],
                  packed_seconds=packed_timing["seconds"], packed_compile_s=packed_compile_s,
                  packed_loss=float(packed_out[2]),
                  packed_peak_bytes=harness.memory_analysis(packed_step).get("peak_bytes"))
    record["packed_vs_unpacked"] = record["packed_tokens_per_s"] / record["tokens_per_s"]
  if compare:
    record.update(compare_tokens_per_s=b * t / timing_b["seconds"],
                  compare_seconds=timing_b["seconds"], compare_compile_s=compile_b,
                  compare_loss=float(out_b[2]),
                  compare_peak_bytes=harness.memory_analysis(step_b).get("peak_bytes"))
    record["compare_vs_base"] = record["compare_tokens_per_s"] / record["tokens_per_s"]
  return record


def step_flops(step, seconds: float, tokens: int, *args) -> dict:
  """``step_flops``, ``flops_per_token`` and ``gflops_per_s`` of ``step`` at ``args``."""
  import jax  # pylint: disable=g-import-not-at-top
  from nlx.train.aot import jaxpr_flops  # pylint: disable=g-import-not-at-top
  flops = jaxpr_flops(jax.make_jaxpr(step)(*args))
  return {"step_flops": flops, "flops_per_token": flops / tokens,
          "gflops_per_s": flops / seconds / 1e9}


def add_ratios(records: list) -> None:
  """Adds ``*_vs_transformer`` ratios to every record when the baseline was measured."""
  base = next((r for r in records if r["family"] == BASELINE), None)
  if base is None:
    return
  for r in records:
    r["tokens_per_s_vs_transformer"] = r["tokens_per_s"] / base["tokens_per_s"]
    if r["peak_bytes"] and base["peak_bytes"]:
      r["peak_bytes_vs_transformer"] = r["peak_bytes"] / base["peak_bytes"]
    r["flops_per_token_vs_transformer"] = r["flops_per_token"] / base["flops_per_token"]


def format_table(records: list) -> str:
  rows = []
  for r in records:
    speed = r.get("tokens_per_s_vs_transformer")
    mem = r.get("peak_bytes_vs_transformer")
    flops = r.get("flops_per_token_vs_transformer")
    rows.append([r["family"], f"{r['params'] / 1e6:.1f}M", r["B"], r["T"],
                 f"{r['tokens_per_s']:,.0f}", "n/a" if speed is None else f"{speed:.2f}x",
                 "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}",
                 "n/a" if mem is None else f"{mem:.2f}x", f"{r['flops_per_token'] / 1e6:,.2f}",
                 "n/a" if flops is None else f"{flops:.2f}x", f"{r['gflops_per_s']:.1f}",
                 f"{r['compile_s']:.1f}"])
  header = ["family", "params", "B", "T", "tokens/s", "vs T++", "peak MiB", "vs T++",
            "MFLOP/token", "vs T++", "GFLOP/s", "compile s"]
  if any("packed_vs_unpacked" in r for r in records):
    header += ["packed tokens/s", "packed/plain"]
    for row, r in zip(rows, records):
      row += ([f"{r['packed_tokens_per_s']:,.0f}", f"{r['packed_vs_unpacked']:.2f}x"]
              if "packed_vs_unpacked" in r else ["n/a", "n/a"])
  if any("compare_vs_base" in r for r in records):
    header += ["compare tokens/s", "compare/base", "compare peak MiB", "compare compile s"]
    for row, r in zip(rows, records):
      peak = r.get("compare_peak_bytes")
      row += ([f"{r['compare_tokens_per_s']:,.0f}", f"{r['compare_vs_base']:.2f}x",
               "n/a" if peak is None else f"{peak / 2**20:,.0f}", f"{r['compare_compile_s']:.1f}"]
              if "compare_vs_base" in r else ["n/a"] * 4)
  return harness.format_table(header, rows)


def run(args: argparse.Namespace, command: Optional[str] = None) -> int:
  """Runs the benchmark: prints the table, writes ``--out``; 1 if a family failed."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  run_info = harness.RunInfo(command)
  records, failures = [], []
  bar = tqdm(args.families, desc="bench models", unit="family", file=sys.stderr,
             dynamic_ncols=True)

  def result(complete: bool) -> dict:
    add_ratios(records)
    config = {"families": args.families, "size": args.size, "batch": args.batch,
              "seq_len": args.seq_len, "repeats": args.repeats, "slow_run_s": args.slow_run_s,
              "override": args.override, "seed": args.seed, "optimizer": OPTIMIZER,
              "packed": args.packed, "doc_len": args.doc_len, "compare": args.compare,
              "config_dir": args.config_dir}
    meta = run_info.meta(harness.device_info(), config, "argument + output + temp bytes of "
                         "XLA's compiled memory analysis of the train step", complete)
    return {"records": records, "failures": failures, "meta": meta}

  for family in bar:
    bar.set_postfix_str(family)
    try:
      records.append(measure(family, args))
    except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
      failures.append({"family": family, "reason": f"{type(e).__name__}: {e}"})
      bar.write(f"FAILED {family}: {type(e).__name__}: {e}", file=sys.stderr)
    if args.out:  # rewritten after every family: an interrupted run keeps what it measured
      harness.write_json(args.out, result(complete=False))
  bar.close()
  add_ratios(records)  # before the table: its "vs T++" columns are these ratios
  return harness.report(format_table(records),
                        [f"{f['family']}: {f['reason']}" for f in failures],
                        result(complete=True), args.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = harness.parse_args(parser, argv)
  if args.compare and args.packed != "off":
    parser.error(f"--compare measures the plain step; got --packed {args.packed} (allowed with "
                 "--compare: off)")
  return run(args, f"{parser.prog} " + " ".join(argv))


if __name__ == "__main__":
  sys.exit(main())
