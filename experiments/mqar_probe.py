"""What a trained MQAR model's memory mixers read and write with: their queries and keys.

    python -m experiments.mqar_probe --runs runs/mqar_a,runs/mqar_b --out runs/mqar_probe

reads each ``--scale cpu`` run of ``experiments.mqar`` (its ``mqar.json`` and the sweep's newest
saved weights under ``checkpoints/``, the configuration checked against the run's), feeds it
``--sequences`` test sequences of its level and records, in every layer whose mixer reads ``x``
through ``nlx.nn.qkv.QKV`` (DeltaNet, Gated DeltaNet, TTT, Titans, HOPE), that layer's q and k
(after the short convolution, SiLU and L2 normalisation). In Zoology's layout a pair ``k_i v_i``
sits at tokens ``2i, 2i + 1`` and the query of key ``i`` later repeats token ``k_i``; a memory
that reads the previous token through its convolution binds the pair at the value token. Per
such mixer (numbered in call order, which is the layer order when every layer has one; a hybrid's
attention layers are skipped) and head it reports:

* ``cos queries``: the mean cosine between the queries of one sequence (at its query tokens);
  near 1, every query reads the memory at the same point, and the read is the same blend of the
  written values whatever the key asked for: accuracy 1/P at best;
* ``cos keys``: the same between the keys at the context's value tokens;
* ``match``: the fraction of queries whose largest ``q·k`` over the P value tokens of the
  context is its own pair's (1/P by chance), and ``match (key tok)`` the same over the key tokens.

HOPE's adaptive key (``hope_adaptive_k``) writes with ``M_k(k)``, not the k recorded here.
Writes ``OUT/mqar_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nlx
from experiments import mqar, resume, study
from nlx.nn import qkv as qkv_module

STUDY = "mqar_probe"


def load_run(directory: str, index: int = 0):
  """``(model, run, settings)``: run ``index`` of ``directory/mqar.json`` and its trained weights
  (the newest save of its sweep). A ValueError names what is missing or does not match."""
  saved = mqar.read_saved("--runs", directory)
  settings = saved["settings"]
  if settings.get("layout") != "zoology":
    raise ValueError(f"--runs: {directory} is not a --scale cpu run of experiments.mqar")
  if not 0 <= index < len(saved["runs"]):
    raise ValueError(f"--runs: {directory} holds {len(saved['runs'])} runs; no run {index}")
  run = saved["runs"][index]
  family, width = run["family"], run["d_model"]
  level = {"pairs": run["pairs"], "seq_len": run["seq_len"]}
  cfg = mqar.run_config(settings, run)
  sweep = os.path.join(directory, "checkpoints", f"{family}_d{width}_P{level['pairs']}")
  if not os.path.isdir(sweep):
    raise ValueError(f"--runs: {directory} kept no weights ({sweep} is missing; the run was "
                     "made with --checkpoint_minutes -1)")
  graphdef, params, rest = nnx.split(nlx.build_model(cfg, rngs=nnx.Rngs(saved.get("seed", 0))),
                                     nnx.Param, ...)
  tx = mqar.sweep_optimizer(settings["steps"], settings["weight_decay"])
  template = [{"params": params, "opt_state": mqar.with_lr(tx.init(params), lr)}
              for lr in settings["lrs"]]
  saver = resume.SweepCheckpoint(sweep, mqar.sweep_fingerprint(
      family, width, level, settings, saved.get("seed", 0), cfg))
  restored = saver.restore(template)
  if restored is None:
    raise ValueError(f"--runs: {sweep} holds no saved weights")
  arrays, _ = restored
  which = list(settings["lrs"]).index(run["lr"])
  return nnx.merge(graphdef, arrays[which]["params"], rest), run, settings


@contextlib.contextmanager
def recorded_qkv():
  """Within the block, every ``QKV`` call appends its ``(q, k)`` (numpy, ``[B, T, H, dk]``) to the
  yielded list, in call order (layer by layer, also inside a scan over layers)."""
  calls, original = [], qkv_module.QKV.__call__

  def call(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    jax.debug.callback(lambda q, k: calls.append((np.asarray(q), np.asarray(k))), out[0], out[1],
                       ordered=True)
    return out

  qkv_module.QKV.__call__ = call
  try:
    yield calls
  finally:
    qkv_module.QKV.__call__ = original


def _mean_offdiagonal_cosine(x):
  """``x [B, N, H, d]`` unit vectors: the mean cosine between distinct rows of each sequence,
  per head ``[H]``."""
  cos = np.einsum("bihd,bjhd->bhij", x, x)
  off = ~np.eye(x.shape[1], dtype=bool)
  return cos[:, :, off].mean((0, 2))


def _match(q, keys, own):
  """The fraction of queries ``q [B, P, H, d]`` whose largest ``q·k`` over ``keys [B, P, H, d]``
  is at ``own [B, P]`` (the context index of its pair), per head ``[H]``."""
  best = np.einsum("bphd,bjhd->bhpj", q, keys).argmax(-1)  # [B, H, P]
  return (best == own[:, None, :]).mean((0, 2))


def probe(model, batch: mqar.QueryBatch, pairs: int) -> dict:
  """Per ``QKV`` call (mixer): ``cos_queries``, ``cos_keys``, ``match``, ``match_key_token``
  (each a list over heads), and the model's query ``accuracy`` on ``batch``."""
  with recorded_qkv() as calls:
    logits = np.asarray(mqar.query_logits(model, jnp.asarray(batch.inputs),
                                          jnp.asarray(batch.positions)))
    jax.effects_barrier()
  tokens, positions = np.asarray(batch.inputs), np.asarray(batch.positions)
  accuracy = float((logits.argmax(-1) == np.asarray(batch.answers)).mean())  # greedy
  values = tokens[:, 1:2 * pairs:2]  # the context's values, in pair order
  own = (np.asarray(batch.answers)[:, :, None] == values[:, None, :]).argmax(-1)  # [B, P]
  layers = []
  for q, k in calls:
    q_at = np.take_along_axis(q, positions[:, :, None, None], 1)
    layers.append({
        "cos_queries": _mean_offdiagonal_cosine(q_at).tolist(),
        "cos_keys": _mean_offdiagonal_cosine(k[:, 1:2 * pairs:2]).tolist(),
        "match": _match(q_at, k[:, 1:2 * pairs:2], own).tolist(),
        "match_key_token": _match(q_at, k[:, 0:2 * pairs:2], own).tolist()})
  return {"accuracy": accuracy, "layers": layers}


def table(results: list) -> str:
  """One row per (run, QKV mixer); each figure the mean over heads (their min–max beside it)."""
  cell = lambda xs: (f"{np.mean(xs):.3f}" if len(xs) == 1 else
                     f"{np.mean(xs):.3f} ({min(xs):.2f}–{max(xs):.2f})")
  md = ("| run | test acc (probe) | QKV mixer | cos queries | cos keys | match (value tok) | "
        "match (key tok) |\n|---|---:|---:|---:|---:|---:|---:|\n")
  for r in results:
    if not r["layers"]:
      md += f"| {r['label']} | {r['accuracy']:.3f} | – | no QKV mixer | | | |\n"
    for i, layer in enumerate(r["layers"]):
      md += (f"| {r['label']} | {r['accuracy']:.3f} | {i} | {cell(layer['cos_queries'])} | "
             f"{cell(layer['cos_keys'])} | {cell(layer['match'])} | "
             f"{cell(layer['match_key_token'])} |\n")
  chance = sorted({1 / r["pairs"] for r in results})
  md += f"\nChance of a match: {', '.join(f'{c:.3f}' for c in chance)} (1/P).\n"
  return md


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", required=True, metavar="DIR,DIR,...",
                      help="output directories of experiments.mqar --scale cpu runs")
  parser.add_argument("--out", default=os.path.join("runs", STUDY))
  parser.add_argument("--sequences", type=int, default=200,
                      help="test sequences of each run's level to probe with")
  args = parser.parse_args(argv)
  if args.sequences < 1:
    raise ValueError(f"--sequences must be >= 1; got {args.sequences}")
  results = []
  for directory in study.parse_list("--runs", args.runs):
    saved = mqar.read_saved("--runs", directory)
    for index in range(len(saved["runs"])):
      model, run, settings = load_run(directory, index)
      level = {"pairs": run["pairs"], "seq_len": run["seq_len"]}
      batch = mqar.zoology_batches(saved.get("seed", 0) + mqar.TEST_SEED_OFFSET, level, settings,
                                   args.sequences, rows=args.sequences)[0]
      found = probe(model, batch, run["pairs"])
      fields = mqar.command_fields(settings, run["family"])
      label = (f"{mqar.LABELS.get(run['family'], run['family'])} d={run['d_model']} "
               f"P={run['pairs']} lr={run['lr']:g}, {run['steps']} steps"
               + "".join(f", {k}={v}" for k, v in fields.items()) + f" ({directory})")
      results.append({"label": label, "source": directory, "family": run["family"],
                      "pairs": run["pairs"], "lr": run["lr"], "steps": run["steps"],
                      "model_fields": fields, **found})
  md = table(results)
  print(md)
  paths = study.write_outputs(args.out, STUDY, {"runs": results, "sequences": args.sequences},
                              md, command=study.command_line(STUDY, argv))
  return {"paths": paths, "runs": results}


if __name__ == "__main__":
  main()
