"""Language modelling at equal parameters and tokens, and the HOPE ablations of Table 6.

The study follows the paper's language-modelling comparison (docs/EQUATIONS.md §6, arXiv Table 2:
HOPE, Titans, Samba and Transformer++ at 760M / 1.3B on 30B / 100B tokens, with Gated DeltaNet from
the same table) and its ablation study (docs/EQUATIONS.md §4, Table 6), at a size a CPU can train:
byte-level Penn Treebank (``DATA/ptb/ptb.{train,valid}.txt``, ``DATA`` the datasets directory:
``--data DIR``, else ``$NLX_DATA``; ``--corpus tinyshakespeare`` takes the first 90% of
``DATA/tinyshakespeare/input.txt`` for training and the last 10% for validation).

1. Main comparison: ``hope``, ``titans_lmm``, ``gated_deltanet``, ``samba`` and ``transformer``,
   each sized with ``study.matched`` (the SwiGLU / CMS width ``mlp_dim``) to the parameter count of
   HOPE at the scale's size, trained on the same batches (a pure function of seed and step) for the
   same number of tokens. Reported: validation perplexity per byte token and bits per byte, with
   the validation curve against tokens. Every model is saved under ``<out>/models/<family>/`` for
   ``python -m experiments.zero_shot``.
2. Ablations of HOPE (Table 6): w/o DGD, w/o momentum, w/o weight decay, w/o CMS, w/o adaptive k,
   w/o adaptive v and with adaptive q (nlx's default q is not adaptive: the paper's "w/o adaptive
   q" row is nlx's default HOPE), each re-matched to the same parameter count and trained with the
   ablation settings of the scale (at ``tiny``: fewer tokens and shorter sequences than part 1,
   with a default HOPE trained the same way as the reference row).

Commands (from the repository root; ``DATA`` holds ``ptb/`` and ``tinyshakespeare/``)::

  python -m experiments.lm --scale tiny --data DATA      # ~8 min on an idle 2-core CPU
  python -m experiments.lm --scale small --out runs/lm_small   # a GPU / TPU; NLX_DATA=DATA
  python -m experiments.lm --corpus tinyshakespeare --ablations none --data DATA

Writes ``<out>/lm.json``, ``lm.md`` (two tables) and ``lm.png`` (validation perplexity against
tokens; ablation bars).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from flax import nnx

import nlx
from experiments import study
from nlx.train.fitting import compiled_step

FAMILIES = {"hope": "HOPE", "titans_lmm": "Titans (LMM)", "gated_deltanet": "Gated DeltaNet",
            "samba": "Samba", "transformer": "Transformer++"}
# Table 6 rows -> ModelConfig fields (nlx.nn.config). nlx's default q is non-adaptive.
ABLATIONS = {
    "HOPE": {},
    "w/o DGD": dict(hope_dgd="off"),
    "w/o momentum": dict(hope_momentum=False),
    "w/o weight decay": dict(hope_weight_decay=False),
    "w/o CMS": dict(cms=False),
    "w/o adaptive k": dict(hope_adaptive_k=False),
    "w/o adaptive v": dict(hope_adaptive_v=False),
    "with adaptive q": dict(hope_adaptive_q=True),
}
ABLATION_FAMILY = "hope"
CORPORA = ("ptb", "tinyshakespeare")
# Per corpus: its files under the datasets directory, and what to put there.
CORPUS_FILES = {
    "ptb": (("ptb/ptb.train.txt", "ptb/ptb.valid.txt"),
            "ptb/ptb.train.txt and ptb/ptb.valid.txt, Penn Treebank in Mikolov's preprocessing "
            "(ptb.zip of the d2l-ai/d2l-zh repository, data/ptb.zip)"),
    "tinyshakespeare": (("tinyshakespeare/input.txt",),
                        "tinyshakespeare/input.txt (karpathy/char-rnn, "
                        "data/tinyshakespeare/input.txt)"),
}
# target_params None: the parameter count of HOPE at `size` (byte vocabulary).
PRESETS = {
    "tiny": dict(size="tiny", target_params=200_000, batch=16, seq_len=128, steps=100, lr=3e-3,
                 eval_every=20, eval_rows=32, final_eval_rows=64, abl_batch=8, abl_seq_len=64,
                 abl_steps=60),
    "small": dict(size="20m", target_params=None, batch=32, seq_len=512, steps=3000, lr=1e-3,
                  eval_every=250, eval_rows=64, final_eval_rows=512, abl_batch=32,
                  abl_seq_len=512, abl_steps=1500),
    "paper": dict(size="760m", target_params=None, batch=64, seq_len=2048, steps=10000, lr=4e-4,
                  eval_every=500, eval_rows=64, final_eval_rows=1024, abl_batch=64,
                  abl_seq_len=2048, abl_steps=5000),
}


# ---------------------------------------------------------------------------------------------
# Data: byte streams and batches that are a pure function of (seed, step)
# ---------------------------------------------------------------------------------------------

def load_corpus(data_dir, corpus: str) -> tuple[np.ndarray, np.ndarray]:
  """``(train, valid)`` uint8 byte streams of ``corpus`` under the datasets directory
  ``data_dir`` (the ``--data`` value; None: ``$NLX_DATA``).

  Raises:
    study.DataNotFound: no directory, or the corpus's files are not in it (one line).
  """
  if corpus not in CORPORA:
    raise ValueError(f"--corpus={corpus!r} is not one of {list(CORPORA)}")
  files, what = CORPUS_FILES[corpus]
  root = study.data_dir(data_dir, files, what)
  paths = [os.path.join(root, f) for f in files]
  streams = [np.frombuffer(open(p, "rb").read(), np.uint8) for p in paths]  # pylint: disable=consider-using-with
  if corpus == "tinyshakespeare":
    cut = len(streams[0]) * 9 // 10
    streams = [streams[0][:cut], streams[0][cut:]]
  return streams[0], streams[1]


def train_batch(stream: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> study.Batch:
  """``batch`` random windows of ``seq_len + 1`` bytes; a pure function of (seed, step)."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(stream) - seq_len - 1, batch)
  return study.lm_batch(stream[starts[:, None] + np.arange(seq_len + 1)])


def eval_windows(stream: np.ndarray, rows: int, seq_len: int) -> np.ndarray:
  """``[rows, seq_len + 1]`` windows at evenly spaced offsets of the validation stream."""
  starts = np.linspace(0, len(stream) - seq_len - 1, rows).astype(np.int64)
  return stream[starts[:, None] + np.arange(seq_len + 1)]


# ---------------------------------------------------------------------------------------------
# Training with a validation curve
# ---------------------------------------------------------------------------------------------

def train_with_curve(cfg, batch_fn, steps: int, windows: np.ndarray, s: dict, seed: int,
                     eval_every: int, desc: str) -> dict:
  """``study.train``'s AdamW recipe, with the validation NLL every ``eval_every`` steps.

  The validation loss is the loss of ``fit``'s compiled step itself (its update discarded), so a
  model compiles once; ``windows [N, T + 1]`` are read ``B`` rows at a time, ``B`` the batch.

  Returns a dict: model, params, curve ``[(tokens, nll)]`` on the first ``s["eval_rows"]``
  windows, the final nll on all of them, train losses, seconds, tokens per second (the compiling
  step and the evaluations excluded) and the steps skipped as not finite.
  """
  model = nlx.build_model(cfg, rngs=nnx.Rngs(seed))
  tx = study.optimizer(steps, s["lr"], steps // 10, 0.1, 1.0)
  step_fn = compiled_step(nnx.split(model, nnx.Param, ...)[0], tx, study.masked_loss)
  rows = batch_fn(0).inputs.shape[0]
  latest = {}  # the optimizer state after the last step (the compiled step takes it)

  def nll(model, n_rows):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return float(np.mean([step_fn(params, rest, latest["opt_state"],
                                  study.lm_batch(windows[i:i + rows])).loss
                          for i in range(0, n_rows - rows + 1, rows)]))

  result = study.train(model, batch_fn, steps, tx=tx, desc=desc,
                       on_step=lambda step, up: latest.update(opt_state=up.opt_state),
                       evaluate=lambda m: {"nll": nll(m, s["eval_rows"])}, eval_every=eval_every)
  size, tic = batch_fn(0).inputs.size, time.time()
  final = nll(result.model, len(windows))
  return dict(model=result.model, params=result.params,
              curve=[(e["step"] * size, e["nll"]) for e in result.evals], nll=final,
              losses=result.losses, seconds=result.seconds + time.time() - tic,
              tokens_per_second=result.tokens_per_second, skipped=result.skipped)


def metrics(nll: float) -> dict:
  """Perplexity per byte token and bits per byte of a mean NLL in nats."""
  return {"val_nll": nll, "val_ppl": math.exp(nll), "val_bpb": nll / math.log(2)}


# ---------------------------------------------------------------------------------------------
# The two parts
# ---------------------------------------------------------------------------------------------

def target_count(s: dict) -> int:
  if s["target_params"]:
    return s["target_params"]
  return study.param_count(study.model_config("hope", s["size"], vocab_size=256))


def run_main(families, train, valid, s, seed, out) -> dict:
  """Part 1: every family at the matched size on the same batches."""
  target = target_count(s)
  windows = eval_windows(valid, s["final_eval_rows"], s["seq_len"])
  batch_fn = lambda step: train_batch(train, seed, step, s["batch"], s["seq_len"])
  results = {}
  for family in families:
    cfg = study.matched(family, target, s["size"], vocab_size=256)
    r = train_with_curve(cfg, batch_fn, s["steps"], windows, s, seed, s["eval_every"], family)
    study.save_model(r["model"], cfg, os.path.join(out, "models", family))
    results[family] = dict(name=FAMILIES.get(family, family), mlp_dim=cfg.mlp_dim,
                           params=r["params"], tokens=s["steps"] * s["batch"] * s["seq_len"],
                           curve=r["curve"], seconds=r["seconds"],
                           tokens_per_second=r["tokens_per_second"],
                           final_train_loss=float(np.mean(r["losses"][-5:])),
                           skipped_steps=r["skipped"], **metrics(r["nll"]))
    print(f"{family}: params {r['params']:,} val ppl {results[family]['val_ppl']:.3f}", flush=True)
  return results


def run_ablations(names, train, valid, s, seed) -> dict:
  """Part 2: the Table 6 rows of HOPE, re-matched in parameters, on the ablation settings."""
  target = target_count(s)
  windows = eval_windows(valid, s["final_eval_rows"], s["abl_seq_len"])
  batch_fn = lambda step: train_batch(train, seed, step, s["abl_batch"], s["abl_seq_len"])
  results = {}
  for name in names:
    cfg = study.matched(ABLATION_FAMILY, target, s["size"], vocab_size=256, **ABLATIONS[name])
    r = train_with_curve(cfg, batch_fn, s["abl_steps"], windows, s, seed, 0, name)
    results[name] = dict(fields=ABLATIONS[name], mlp_dim=cfg.mlp_dim, params=r["params"],
                         tokens=s["abl_steps"] * s["abl_batch"] * s["abl_seq_len"],
                         seconds=r["seconds"], skipped_steps=r["skipped"], **metrics(r["nll"]))
    print(f"{name}: params {r['params']:,} val ppl {results[name]['val_ppl']:.3f}", flush=True)
  return results


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def tables(main: dict, ablations: dict, s: dict) -> str:
  md = ""
  if main:
    rows = [(r["name"], r["params"], r["tokens"], r["val_ppl"], r["val_bpb"],
             round(r["tokens_per_second"]), round(r["seconds"], 1)) for r in main.values()]
    md += study.markdown_table(["model", "params", "train tokens", "val ppl (byte)",
                                "val bits/byte", "train tok/s", "seconds"], rows)
  if ablations:
    ref = ablations.get("HOPE", {}).get("val_ppl")
    rows = [(name, r["params"], r["tokens"], r["val_ppl"], r["val_bpb"],
             f"{r['val_ppl'] - ref:+.3f}" if ref else "-") for name, r in ablations.items()]
    md += (f"\nHOPE ablations (Table 6), batch {s['abl_batch']} x {s['abl_seq_len']} bytes, "
           f"{s['abl_steps']} steps:\n\n")
    md += study.markdown_table(["variant", "params", "train tokens", "val ppl (byte)",
                                "val bits/byte", "Δ ppl vs HOPE"], rows)
  return md


def plot(main: dict, ablations: dict):
  fig, (ax1, ax2) = study.figure(2, width=5.5)
  for r in main.values():
    tokens, nll = zip(*r["curve"]) if r["curve"] else ((), ())
    ax1.plot([t / 1000 for t in tokens], [math.exp(x) for x in nll], marker="o", ms=3,
             label=r["name"])
  ax1.set(xlabel="training tokens (thousand bytes)", ylabel="validation perplexity per byte",
          title="Equal parameters, equal tokens", yscale="log")
  ax1.legend(fontsize=8)
  names = list(ablations)
  ax2.barh(names, [ablations[n]["val_ppl"] for n in names], color="tab:blue")
  if "HOPE" in ablations:
    ax2.axvline(ablations["HOPE"]["val_ppl"], color="k", ls="--", lw=1)
  ax2.invert_yaxis()
  ax2.set(xlabel="validation perplexity per byte", title="HOPE ablations (Table 6)")
  if names:
    lo = min(ablations[n]["val_ppl"] for n in names)
    ax2.set_xlim(left=lo * 0.95)
  fig.tight_layout()
  return fig


def main(argv=None) -> dict:
  parser = study.arg_parser(__doc__, "lm")
  parser.add_argument("--corpus", default="ptb", choices=CORPORA)
  parser.add_argument("--families", default="all",
                      help=f"comma-separated subset of {', '.join(FAMILIES)} (or all, none)")
  parser.add_argument("--ablations", default="all",
                      help=f"comma-separated subset of {', '.join(ABLATIONS)} (or all, none)")
  for key in ("steps", "abl_steps", "batch", "seq_len", "abl_batch", "abl_seq_len", "eval_every",
              "eval_rows", "final_eval_rows", "target_params"):
    parser.add_argument(f"--{key}", type=int, default=None, help="(override of the scale)")
  args = parser.parse_args(argv)
  s = study.scale_settings(PRESETS, args.scale, **{k: getattr(args, k) for k in (
      "steps", "abl_steps", "batch", "seq_len", "abl_batch", "abl_seq_len", "eval_every",
      "eval_rows", "final_eval_rows", "target_params")})
  for rows, batch in (("eval_rows", "batch"), ("final_eval_rows", "batch"),
                      ("final_eval_rows", "abl_batch")):
    if s[rows] < s[batch]:
      raise ValueError(f"--{rows}={s[rows]} must be >= --{batch}={s[batch]} (the validation "
                       "windows are read a batch at a time)")
  families = study.parse_list("--families", args.families, known=list(FAMILIES), keywords=True)
  ablations = study.parse_list("--ablations", args.ablations, known=list(ABLATIONS),
                               keywords=True)
  train, valid = load_corpus(args.data, args.corpus)
  start = time.time()
  main_results = run_main(families, train, valid, s, args.seed, args.out)
  abl_results = run_ablations(ablations, train, valid, s, args.seed)
  md = tables(main_results, abl_results, s)
  results = dict(scale=args.scale, corpus=args.corpus, settings=s, seed=args.seed,
                 main=main_results, ablations=abl_results, seconds=time.time() - start)
  study.write_outputs(args.out, "lm", results, md, plot(main_results, abl_results),
                      command=study.command_line("lm", argv))
  print(md)
  return results


if __name__ == "__main__":
  main()
