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

``--scale cpu`` (issue 21: the baseline first, trained until its validation curve is flat): part 1
is Transformer++ and HOPE (and Transformer++ with embedding std 1.0, ``VARIANTS``) at ~200k
parameters on 1,500 steps of 16 x 128 bytes (3.1M tokens), a validation point every 75 steps;
part 2 is HOPE with the CMS's two inner objectives (``OBJECTIVES``: ``next_token``, the paper's,
and ``local``; nlx's default is one of them, whose row reuses the run of the ``HOPE`` row) on 120
steps of 16 x 128 bytes, because ``next_token`` trains ~10x slower than ``local``. Each table
says whether a curve is flat (``FLAT_TOLERANCE``: the last quarter of the tokens lowers the
validation NLL by at most 2%) and part 2 which objective is better. Outputs are rewritten after
every row (``"complete": false`` until the end). Measured (commit ecb32fc, nice 19 beside other
jobs, load ~10 on 2 cores): 80 min wall, of which 36 min are ``next_token``'s 246k tokens (145
tokens/s; ``local`` 2,197) and 40 min part 1.

Commands (from the repository root; ``DATA`` holds ``ptb/`` and ``tinyshakespeare/``)::

  python -m experiments.lm --scale tiny --data DATA      # ~8 min on an idle 2-core CPU
  nice -n 19 python -m experiments.lm --scale cpu --data DATA --out runs/lm_cpu  # ~80 min, loaded
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
# Rows of part 1 that are a family with ModelConfig fields changed (``--families`` names them;
# ``all`` is FAMILIES only): name -> (family, fields, label).
VARIANTS = {
    # The MQAR finding (docs/RESULTS.md): the tied embedding's std 0.02 hurts Transformer++'s
    # recall and std 1.0 recalls; does std 1.0 also hold for language modelling?
    "transformer_std1": ("transformer", dict(init_std=1.0), "Transformer++ (embedding std 1.0)"),
}
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
# The CMS's inner objective (nlx.nn.cms_config, model.cms_objective; one of the two is nlx's
# default, so one of these rows has HOPE's own config): part 2 rows beside Table 6's
# (``--ablations`` names them; ``all`` is Table 6 only).
OBJECTIVES = {
    "CMS objective next_token": dict(cms_objective="next_token"),  # the paper's: the task's loss
    "CMS objective local": dict(cms_objective="local"),
}
ABLATION_FAMILY = "hope"
# What ``--scale cpu`` runs when --families / --ablations are not given: Transformer++ and HOPE
# (and Transformer++ at embedding std 1.0, cheap) in part 1, HOPE's CMS objectives in part 2.
CPU_FAMILIES = ("transformer", "hope", "transformer_std1")
CPU_ABLATIONS = ("HOPE", "CMS objective next_token", "CMS objective local")
# The flattening criterion of --scale cpu's validation curves: over the last quarter of the
# training tokens the validation NLL falls by at most this fraction of its final value.
FLAT_FRACTION, FLAT_TOLERANCE = 0.25, 0.02
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
CPU_STEPS, CPU_ABL_STEPS = 1500, 120
PRESETS = {
    "tiny": dict(size="tiny", target_params=200_000, batch=16, seq_len=128, steps=100, lr=3e-3,
                 eval_every=20, eval_rows=32, final_eval_rows=64, abl_batch=8, abl_seq_len=64,
                 abl_steps=60, abl_eval_every=0),
    # ~80 min (measured) on a loaded 2-core CPU at nice 19 (docs/RESULTS.md, study 1): part 1 as
    # long as HOPE allows (its curves fall 2.3-2.7% in the last quarter: just short of flat); part
    # 2 (HOPE's CMS objectives) shorter, since next_token runs the LM chunk by chunk (~15x fewer
    # tokens/s than HOPE's default).
    "cpu": dict(size="tiny", target_params=200_000, batch=16, seq_len=128, steps=CPU_STEPS,
                lr=3e-3, eval_every=CPU_STEPS // 20, eval_rows=32, final_eval_rows=128,
                abl_batch=16, abl_seq_len=128, abl_steps=CPU_ABL_STEPS,
                abl_eval_every=CPU_ABL_STEPS // 8),
    "small": dict(size="20m", target_params=None, batch=32, seq_len=512, steps=3000, lr=1e-3,
                  eval_every=250, eval_rows=64, final_eval_rows=512, abl_batch=32,
                  abl_seq_len=512, abl_steps=1500, abl_eval_every=0),
    "paper": dict(size="760m", target_params=None, batch=64, seq_len=2048, steps=10000, lr=4e-4,
                  eval_every=500, eval_rows=64, final_eval_rows=1024, abl_batch=64,
                  abl_seq_len=2048, abl_steps=5000, abl_eval_every=0),
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


def flattening(curve) -> dict | None:
  """How flat the end of a validation curve ``[(tokens, nll)]`` is: the nll at the point nearest
  to ``1 - FLAT_FRACTION`` of the tokens, the last nll, the fall between them as a fraction of
  the last (``last_quarter_drop``) and ``flat``: that fall is at most ``FLAT_TOLERANCE``. None for
  a curve of fewer than two points."""
  if len(curve) < 2:
    return None
  mark = (1 - FLAT_FRACTION) * curve[-1][0]
  tokens, nll_mark = min(curve[:-1], key=lambda point: abs(point[0] - mark))
  last = curve[-1][1]
  drop = (nll_mark - last) / last
  return dict(tokens_at_mark=tokens, nll_at_mark=nll_mark, nll_last=last,
              last_quarter_drop=drop, flat=bool(drop <= FLAT_TOLERANCE))


def _trained(cache, cfg, batch_fn, steps, windows, s, seed, eval_every, desc, shape):
  """``train_with_curve``, run once per identical (config, steps, batches, evaluation): a row
  whose config equals an earlier row's (e.g. the CMS objective that is HOPE's default) reuses that
  run. Returns ``(result, name of the row that ran it or None)``."""
  key = (repr(cfg), steps, shape, eval_every, len(windows))
  if key in cache:
    return cache[key][0], cache[key][1]
  r = train_with_curve(cfg, batch_fn, steps, windows, s, seed, eval_every, desc)
  cache[key] = (r, desc)
  return r, None


def _row(r, cfg, tokens) -> dict:
  return dict(mlp_dim=cfg.mlp_dim, params=r["params"], tokens=tokens, curve=r["curve"],
              flattening=flattening(r["curve"]), seconds=r["seconds"],
              tokens_per_second=r["tokens_per_second"],
              final_train_loss=float(np.mean(r["losses"][-5:])), skipped_steps=r["skipped"],
              **metrics(r["nll"]))


def row_config(name: str, target: int, size: str):
  """``(family, fields, label)`` of a part-1 row (a family or a VARIANTS name) and its config
  matched to ``target`` parameters."""
  family, fields, label = VARIANTS.get(name, (name, {}, FAMILIES.get(name, name)))
  return family, fields, label, study.matched(family, target, size, vocab_size=256, **fields)


def run_main(families, train, valid, s, seed, out, cache=None, on_row=None) -> dict:
  """Part 1: every family (or variant) at the matched size on the same batches; ``on_row(results
  so far)`` after each row."""
  cache = {} if cache is None else cache
  target = target_count(s)
  windows = eval_windows(valid, s["final_eval_rows"], s["seq_len"])
  batch_fn = lambda step: train_batch(train, seed, step, s["batch"], s["seq_len"])
  results = {}
  for name in families:
    family, fields, label, cfg = row_config(name, target, s["size"])
    r, same = _trained(cache, cfg, batch_fn, s["steps"], windows, s, seed, s["eval_every"], name,
                       (s["batch"], s["seq_len"]))
    if same is None:
      study.save_model(r["model"], cfg, os.path.join(out, "models", name))
    results[name] = dict(name=label, family=family, fields=fields, same_run_as=same,
                         **_row(r, cfg, s["steps"] * s["batch"] * s["seq_len"]))
    print(f"{name}: params {r['params']:,} val ppl {results[name]['val_ppl']:.3f}", flush=True)
    if on_row:
      on_row(results)
  return results


def run_ablations(names, train, valid, s, seed, cache=None, on_row=None) -> dict:
  """Part 2: the Table 6 rows of HOPE and its CMS objectives, re-matched in parameters, on the
  ablation settings (a validation curve every ``abl_eval_every`` steps, if not 0)."""
  cache = {} if cache is None else cache
  target = target_count(s)
  windows = eval_windows(valid, s["final_eval_rows"], s["abl_seq_len"])
  batch_fn = lambda step: train_batch(train, seed, step, s["abl_batch"], s["abl_seq_len"])
  results = {}
  for name in names:
    fields = {**ABLATIONS, **OBJECTIVES}[name]
    cfg = study.matched(ABLATION_FAMILY, target, s["size"], vocab_size=256, **fields)
    r, same = _trained(cache, cfg, batch_fn, s["abl_steps"], windows, s, seed,
                       s["abl_eval_every"], name, (s["abl_batch"], s["abl_seq_len"]))
    results[name] = dict(fields=fields, cms_objective=cfg.cms_objective, same_run_as=same,
                         **_row(r, cfg, s["abl_steps"] * s["abl_batch"] * s["abl_seq_len"]))
    print(f"{name}: params {r['params']:,} val ppl {results[name]['val_ppl']:.3f}"
          + (f" (the run of {same!r})" if same else ""), flush=True)
    if on_row:
      on_row(results)
  return results


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def _flat_cells(r) -> tuple:
  f = r.get("flattening")
  if not f:
    return ("-", "-", "-")
  return (round(math.exp(f["nll_at_mark"]), 3), f"{100 * f['last_quarter_drop']:.2f}%",
          "yes" if f["flat"] else "no")


FLAT_HEADER = [f"val ppl at {100 * (1 - FLAT_FRACTION):.0f}% tokens (curve)",
               "val nll fall, last 25%", f"flat (<= {100 * FLAT_TOLERANCE:.0f}%)"]


def objective_verdict(ablations: dict, default: str) -> str:
  """One sentence: which CMS inner objective has the lower validation perplexity, and whether
  nlx's default (``default``) is it. Empty without both objective rows."""
  rows = {r["cms_objective"]: r for name, r in ablations.items() if name in OBJECTIVES}
  if len(rows) < 2:
    return ""
  best = min(rows, key=lambda k: rows[k]["val_ppl"])
  other = next(k for k in rows if k != best)
  gap = 100 * (rows[other]["val_ppl"] / rows[best]["val_ppl"] - 1)
  follow = (f"nlx's default (`cms_objective={default!r}`) already is the better one"
            if best == default else
            f"nlx's default is `cms_objective={default!r}`: the library default should follow "
            f"the better one, `{best!r}`")
  return (f"CMS inner objective at equal parameters and tokens: `{best}` "
          f"{rows[best]['val_ppl']:.3f} val ppl, `{other}` {rows[other]['val_ppl']:.3f} "
          f"({gap:+.2f}%): `{best}` is better; {follow}.\n")


def tables(main: dict, ablations: dict, s: dict, default_objective: str = "local") -> str:
  md = ""
  if main:
    rows = [(r["name"], r["params"], r["tokens"], r["val_ppl"], r["val_bpb"], *_flat_cells(r),
             round(r["tokens_per_second"]), round(r["seconds"], 1)) for r in main.values()]
    md += study.markdown_table(["model", "params", "train tokens", "val ppl (byte)",
                                "val bits/byte", *FLAT_HEADER, "train tok/s", "seconds"], rows)
  if ablations:
    ref = ablations.get("HOPE", {}).get("val_ppl")
    rows = [(name + (f" (= {r['same_run_as']})" if r.get("same_run_as") else ""), r["params"],
             r["tokens"], r["val_ppl"], r["val_bpb"],
             f"{r['val_ppl'] - ref:+.3f}" if ref else "-", *_flat_cells(r),
             round(r["tokens_per_second"]), round(r["seconds"], 1))
            for name, r in ablations.items()]
    md += (f"\nHOPE ablations (Table 6) and CMS objectives, batch {s['abl_batch']} x "
           f"{s['abl_seq_len']} bytes, {s['abl_steps']} steps:\n\n")
    md += study.markdown_table(["variant", "params", "train tokens", "val ppl (byte)",
                                "val bits/byte", "Δ ppl vs HOPE", *FLAT_HEADER, "train tok/s",
                                "seconds"], rows)
    verdict = objective_verdict(ablations, default_objective)
    md += f"\n{verdict}" if verdict else ""
  return md


def _curves(ax, rows: dict, labels: dict, title: str):
  for key, r in rows.items():
    tokens, nll = zip(*r["curve"]) if r["curve"] else ((), ())
    ax.plot([t / 1000 for t in tokens], [math.exp(x) for x in nll], marker="o", ms=3,
            label=labels[key])
  ends = [r["curve"][-1][0] for r in rows.values() if r["curve"]]
  if ends:
    ax.axvline((1 - FLAT_FRACTION) * max(ends) / 1000, color="0.6", ls=":", lw=1)
  ax.set(xlabel="training tokens (thousand bytes)", ylabel="validation perplexity per byte",
         title=title, yscale="log")
  ax.legend(fontsize=8)


def plot(main: dict, ablations: dict):
  fig, (ax1, ax2) = study.figure(2, width=5.5)
  _curves(ax1, main, {k: r["name"] for k, r in main.items()}, "Equal parameters, equal tokens")
  names = list(ablations)
  if any(len(ablations[n]["curve"]) > 1 for n in names):  # part 2 with curves: the curves
    _curves(ax2, ablations, {n: n for n in names}, "HOPE variants (part 2)")
  else:
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
  parser = study.arg_parser(__doc__, "lm", scales=tuple(PRESETS),
                            scale_help="tiny: ~8 min on 2 CPU cores; cpu: ~80 min on a loaded "
                                       "2-core CPU (flat validation curves); small: a GPU/TPU "
                                       "hour; paper: the paper's sizes")
  parser.add_argument("--corpus", default="ptb", choices=CORPORA)
  parser.add_argument("--families", default=None,
                      help=f"comma-separated subset of {', '.join([*FAMILIES, *VARIANTS])} (or "
                           f"all: {', '.join(FAMILIES)}; none); default all, at --scale cpu "
                           f"{','.join(CPU_FAMILIES)}")
  parser.add_argument("--ablations", default=None,
                      help=f"comma-separated subset of {', '.join([*ABLATIONS, *OBJECTIVES])} "
                           f"(or all: Table 6's rows; none); default all, at --scale cpu "
                           f"{','.join(CPU_ABLATIONS)}")
  keys = ("steps", "abl_steps", "batch", "seq_len", "abl_batch", "abl_seq_len", "eval_every",
          "abl_eval_every", "eval_rows", "final_eval_rows", "target_params")
  for key in keys:
    parser.add_argument(f"--{key}", type=int, default=None, help="(override of the scale)")
  args = parser.parse_args(argv)
  s = study.scale_settings(PRESETS, args.scale, **{k: getattr(args, k) for k in keys})
  for rows, batch in (("eval_rows", "batch"), ("final_eval_rows", "batch"),
                      ("final_eval_rows", "abl_batch")):
    if s[rows] < s[batch]:
      raise ValueError(f"--{rows}={s[rows]} must be >= --{batch}={s[batch]} (the validation "
                       "windows are read a batch at a time)")
  cpu = args.scale == "cpu"
  fam_arg = args.families or (",".join(CPU_FAMILIES) if cpu else "all")
  families = (list(FAMILIES) if fam_arg == "all" else
              study.parse_list("--families", fam_arg, known=[*FAMILIES, *VARIANTS],
                               keywords=True))
  abl_arg = args.ablations or (",".join(CPU_ABLATIONS) if cpu else "all")
  ablations = (list(ABLATIONS) if abl_arg == "all" else
               study.parse_list("--ablations", abl_arg, known=[*ABLATIONS, *OBJECTIVES],
                                keywords=True))
  train, valid = load_corpus(args.data, args.corpus)
  start, cache = time.time(), {}
  default_objective = study.model_config(ABLATION_FAMILY, s["size"]).cms_objective

  def write(main_results, abl_results, done):
    """The outputs; also after every row (``done`` False), so that a cut run keeps its rows."""
    results = dict(scale=args.scale, corpus=args.corpus, settings=s, seed=args.seed,
                   flat_criterion=dict(fraction=FLAT_FRACTION, tolerance=FLAT_TOLERANCE),
                   default_cms_objective=default_objective, complete=done,
                   main=main_results, ablations=abl_results, seconds=time.time() - start)
    md = tables(main_results, abl_results, s, default_objective)
    study.write_outputs(args.out, "lm", results, md, plot(main_results, abl_results),
                        command=study.command_line("lm", argv))
    return results, md

  main_results = run_main(families, train, valid, s, args.seed, args.out, cache,
                          on_row=lambda rows: write(rows, {}, False))
  abl_results = run_ablations(ablations, train, valid, s, args.seed, cache,
                              on_row=lambda rows: write(main_results, rows, False))
  results, md = write(main_results, abl_results, True)
  print(md)
  return results


if __name__ == "__main__":
  main()
