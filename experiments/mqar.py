"""Multi-query associative recall (MQAR): accuracy vs model width (state size) and sequence length.

The study of Zoology (Arora et al., 2023, "Zoology: measuring and improving recall in efficient
language models"): a context of ``P`` key-value pairs is followed by queries of ``P`` distinct keys
of the context; at every query the model must predict the value paired with it
(``nlx/data/synthetic.py``). Zoology trains two-layer models of widths 64 / 128 / 256 / 512 on
lengths 64 ... 512 with the number of pairs growing with the length, and plots the accuracy against
the width: attention solves MQAR at every width, gated linear RNNs only once their recurrent state
is large enough for the number of pairs. Here the four families of the HOPE comparison run the same
protocol: HOPE (``hope``), Titans LMM (``titans_lmm``), Gated DeltaNet (``gated_deltanet``) and
Transformer++ (``transformer``).

Protocol (what differs from Zoology is said here):

* Levels: ``P`` pairs and ``P`` queries fill a sequence of ``4 P`` tokens (the generator puts the
  queries right after the context); the length grows with ``P``. Tiny: P = 4 / 8 / 16 (T = 16 / 32
  / 64), vocabulary 64 (31 keys, 32 values), widths 32 / 64, 300 steps of 16 sequences, AdamW
  1e-2; small and paper (GPU/TPU sizes, not run on CPU) go to T = 256 / 512 and widths 256 / 512.
* One model per (family, width) is trained on a mixture of the levels (example ``i`` has the
  ``i mod L``-th number of pairs), every sequence padded to the longest level ``4 max(P)`` so that
  each model compiles once; the padding comes after the last query and is not counted, and the
  models are causal, so a level's accuracy is that of its unpadded length ``4 P``. Each level is
  evaluated on its own test sequences. Zoology trains one model per length.
* Widths: ``d_model`` from ``--widths`` (2 layers, 2 heads, head dim ``d_model / 2``); the MLP width
  scales with ``d_model`` like the family's tiny config (3 d; HOPE's CMS levels d each).
* Accuracy: the fraction of query positions whose greedy prediction is the paired value (Zoology's
  metric), on test sequences drawn from a seed disjoint from the training seed. References: 1 / P
  (guessing one of the P values of the context) and 1 / (number of values) (uniform guessing).
* State size: floats per layer of the recurrent state that decoding carries, counted from
  ``model.init_state(batch=1, max_len=T)``: the KV cache ``2 T d`` of attention, ``heads dk dv``
  of the delta rule, the memory MLP weights and their momentum for Titans and HOPE (Titans also
  keeps the chunk-start copy of its weights; HOPE also its k / v / eta / alpha memories and the CMS
  levels, with their gradient sums, that change in context), plus the short-convolution caches.

The tiny scale (2 CPU cores, about 8 minutes idle) trains 300 steps, some 4800 sequences per
model, orders of magnitude fewer than Zoology; at that scale the models are still learning (in the
development runs none got far past the 1 / P reference), and the numbers say how far they got, not
where they would end.

Commands (from the repository root)::

  python -m experiments.mqar --scale tiny                     # writes runs/mqar/mqar.{json,md,png}
  python -m experiments.mqar --scale small --out runs/mqar_small   # GPU/TPU
  python -m experiments.mqar --scale tiny --families transformer,gated_deltanet --widths 32 \\
      --steps 30                                              # a quick look

``--data`` is accepted for uniformity with the other studies and unused (the data are generated).
"""

from __future__ import annotations

import ast
import os
import time

import jax
import numpy as np

from experiments import study
from nlx.data import synthetic

STUDY = "mqar"
FAMILIES = ("transformer", "gated_deltanet", "titans_lmm", "hope")  # cheapest first
LABELS = {"hope": "HOPE", "titans_lmm": "Titans (LMM)", "gated_deltanet": "Gated DeltaNet",
          "transformer": "Transformer++"}
# The MLP width / d_model of each family's configs/<family>.py:tiny (d_model 64).
MLP_RATIO = {"hope": 1.0}
DEFAULT_MLP_RATIO = 3.0

# pairs: P of each level (its sequence is 4 P tokens); batch_size: training sequences per step
# (each 4 max(P) tokens, levels mixed); eval_sequences: test sequences per level.
PRESETS = {
    "tiny": dict(widths=(32, 64), pairs=(4, 8, 16), vocab_size=64, steps=300, lr=1e-2,
                 batch_size=16, eval_sequences=256, n_layers=2, n_heads=2),
    "small": dict(widths=(64, 128, 256), pairs=(8, 16, 32, 64), vocab_size=512, steps=6000,
                  lr=3e-3, batch_size=64, eval_sequences=2048, n_layers=2, n_heads=2),
    "paper": dict(widths=(64, 128, 256, 512), pairs=(16, 32, 64, 128), vocab_size=8192,
                  steps=20000, lr=1e-3, batch_size=128, eval_sequences=4096, n_layers=2,
                  n_heads=2),
}
TEST_SEED_OFFSET = 1_000_003  # test data: seed + offset (disjoint from every training seed)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def level_length(pairs: int) -> int:
  """Tokens of a level with ``pairs`` key-value pairs and as many queries: ``4 * pairs``."""
  return 4 * pairs


def example_level(index: int, pairs: tuple) -> int:
  """P of example ``index`` of the mixture: ``pairs[index mod len(pairs)]``."""
  return pairs[index % len(pairs)]


def mqar_rows(seed: int, indices, pairs: tuple, vocab_size: int) -> study.Batch:
  """The mixture's examples ``indices`` (each a pure function of ``(seed, index)``), padded to the
  longest level ``4 max(pairs)``: a ``Batch [len(indices), 4 max(pairs)]``."""
  seq_len = level_length(max(pairs))
  rows = [synthetic.mqar(seed, int(i), num_pairs=example_level(int(i), pairs), seq_len=seq_len,
                         vocab_size=vocab_size, num_queries=example_level(int(i), pairs))
          for i in indices]
  return study.Batch(np.stack([r["tokens"] for r in rows]), np.stack([r["targets"] for r in rows]),
                     np.stack([r["mask"] for r in rows]).astype(np.float32))


def train_batch_fn(seed: int, pairs: tuple, vocab_size: int, batch_size: int):
  """step -> the training ``Batch`` of step ``step``: examples ``step * batch_size ..``."""
  return lambda step: mqar_rows(seed, range(step * batch_size, (step + 1) * batch_size), pairs,
                                vocab_size)


def test_batches(seed: int, level: int, pairs: tuple, vocab_size: int, sequences: int,
                 rows: int = 64) -> list:
  """``sequences`` test examples of level ``pairs[level]`` (seed ``seed + TEST_SEED_OFFSET``)."""
  indices = [level + i * len(pairs) for i in range(sequences)]
  return [mqar_rows(seed + TEST_SEED_OFFSET, indices[s:s + rows], pairs, vocab_size)
          for s in range(0, sequences, rows)]


# ---------------------------------------------------------------------------------------------
# Models and their state
# ---------------------------------------------------------------------------------------------

def check_families(families) -> tuple:
  """The family names, each with a ``configs/<family>.py``; ValueError names ``--families``."""
  known = sorted(f[:-3] for f in os.listdir(os.path.join(study.REPO, "configs"))
                 if f.endswith(".py"))
  for family in families:
    if family not in known:
      raise ValueError(f"--families: unknown family {family!r}; known: {', '.join(known)}")
  return tuple(families)


def config(family: str, width: int, settings: dict):
  """The ``ModelConfig`` of ``family`` at ``d_model = width`` (2 layers, 2 heads)."""
  ratio = MLP_RATIO.get(family, DEFAULT_MLP_RATIO)
  fields = dict(vocab_size=settings["vocab_size"], d_model=width, n_layers=settings["n_layers"],
                n_heads=settings["n_heads"], mlp_dim=max(8, int(ratio * width)),
                max_seq_len=level_length(max(settings["pairs"])))
  fields.update(settings.get("model", {}))
  return study.model_config(family, **fields)


def state_floats_per_layer(model, max_len: int) -> int:
  """Floats of ``model.init_state(1, max_len)`` (float leaves only) divided by the layers."""
  shapes = jax.eval_shape(lambda: model.init_state(1, max_len))
  floats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)
               if np.issubdtype(x.dtype, np.floating))
  return floats // model.cfg.n_layers


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def run_one(family: str, width: int, settings: dict, seed: int) -> dict:
  """Trains one (family, width) on the level mixture; accuracy and state size of every level."""
  cfg = config(family, width, settings)
  pairs = tuple(settings["pairs"])
  batch_fn = train_batch_fn(seed, pairs, settings["vocab_size"], settings["batch_size"])
  result = study.train(cfg, batch_fn, settings["steps"], lr=settings["lr"], seed=seed,
                       desc=f"{family} d={width}")
  levels = {}
  for level, p in enumerate(pairs):
    acc = study.accuracy(result.model, test_batches(seed, level, pairs, settings["vocab_size"],
                                                    settings["eval_sequences"]))
    levels[str(p)] = {"pairs": p, "seq_len": level_length(p), "accuracy": acc["token"],
                      "sequence_accuracy": acc["sequence"],
                      "state_floats_per_layer": state_floats_per_layer(result.model,
                                                                       level_length(p))}
  diverged = next((i for i, x in enumerate(result.losses) if not np.isfinite(x)), None)
  return {"family": family, "d_model": width, "params": result.params,
          "train_seconds": result.seconds, "final_loss": float(np.mean(result.losses[-10:])),
          "diverged_at_step": diverged, "skipped_steps": result.skipped,
          "losses": result.losses, "levels": levels}


def table(runs: list, pairs: tuple, vocab_size: int) -> str:
  """The markdown table: one row per (family, width), the accuracy of each level."""
  num_values = synthetic.mqar_vocab(vocab_size).num_values
  cols = (["model", "d_model", "params", "state floats/layer (T=" +
           "/".join(str(level_length(p)) for p in pairs) + ")"] +
          [f"acc P={p} (T={level_length(p)})" for p in pairs] + ["final loss", "train s"])
  rows = [[LABELS.get(r["family"], r["family"]), r["d_model"], r["params"],
           "/".join(str(r["levels"][str(p)]["state_floats_per_layer"]) for p in pairs)] +
          [r["levels"][str(p)]["accuracy"] for p in pairs] +
          [final_loss_cell(r), round(r["train_seconds"])] for r in runs]
  rows.append(["reference: 1/P (a value of the context)", "", "", ""] + [1 / p for p in pairs] +
              ["", ""])
  rows.append([f"reference: 1/{num_values} (uniform value)", "", "", ""] +
              [1 / num_values for _ in pairs] + ["", ""])
  return study.markdown_table(cols, rows)


def final_loss_cell(run: dict):
  """The mean of the last 10 losses, or where the loss first became NaN / inf and how many steps
  were not finite (the shared train step skips their update: the model keeps its last finite
  parameters)."""
  if run.get("diverged_at_step") is not None:
    skipped = run.get("skipped_steps")
    return (f"diverged (non-finite loss from step {run['diverged_at_step']}"
            + ("" if skipped is None else f"; {skipped} steps skipped") + ")")
  return run["final_loss"]


def plot(runs: list, pairs: tuple):
  """Accuracy vs d_model, a panel per level, a line per family; dotted: 1/P."""
  fig, axes = study.figure(len(pairs), width=4.0, height=3.4)
  families = list(dict.fromkeys(r["family"] for r in runs))
  for ax, p in zip(axes, pairs):
    for family in families:
      mine = sorted((r for r in runs if r["family"] == family), key=lambda r: r["d_model"])
      ax.plot([r["d_model"] for r in mine], [r["levels"][str(p)]["accuracy"] for r in mine],
              marker="o", label=LABELS.get(family, family))
    ax.axhline(1 / p, color="gray", linestyle=":", label="1/P")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["d_model"] for r in runs}))
    ax.set_xticklabels([str(w) for w in sorted({r["d_model"] for r in runs})])
    ax.set_ylim(0, 1.02)
    ax.set_title(f"P={p} pairs, T={level_length(p)}")
    ax.set_xlabel("d_model")
  axes[0].set_ylabel("MQAR accuracy (query positions)")
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  return fig


def parse_fields(flag: str, items) -> dict:
  """``["conv_size=0", "window=16"]`` -> ``{"conv_size": 0, "window": 16}`` (Python literals, else
  strings); ValueError names the flag."""
  fields = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"{flag}: expected FIELD=VALUE, got {item!r}")
    try:
      fields[key.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[key.strip()] = text
  return fields


def main(argv=None) -> dict:
  parser = study.arg_parser(__doc__, STUDY)
  parser.add_argument("--families", default=",".join(FAMILIES),
                      help="comma-separated families (configs/<family>.py)")
  parser.add_argument("--widths", default=None, help="comma-separated d_model values")
  parser.add_argument("--pairs", default=None, help="comma-separated P of the levels")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model")
  parser.add_argument("--eval_sequences", type=int, default=None,
                      help="test sequences per level")
  parser.add_argument("--batch_size", type=int, default=None, help="training sequences per step")
  parser.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="vocabulary (pad, then disjoint key and value ranges)")
  parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                      help="a ModelConfig field of every model, e.g. conv_size=0 (repeatable)")
  args = parser.parse_args(argv)
  families = check_families(study.parse_list("--families", args.families))
  ints = lambda flag, value: value and tuple(study.parse_list(flag, value, convert=int,
                                                              minimum=1))
  settings = study.scale_settings(
      PRESETS, args.scale, steps=args.steps, eval_sequences=args.eval_sequences,
      batch_size=args.batch_size, lr=args.lr, vocab_size=args.vocab_size,
      widths=ints("--widths", args.widths), pairs=ints("--pairs", args.pairs))
  settings["model"] = parse_fields("--model", args.model)
  for p in settings["pairs"]:  # fails early, naming the field, if a level does not fit
    synthetic.check_mqar_args(num_pairs=p, seq_len=level_length(p),
                              vocab_size=settings["vocab_size"], num_queries=p)
  start, runs = time.time(), []
  for family in families:
    for width in settings["widths"]:
      runs.append(run_one(family, width, settings, args.seed))
      accs = ", ".join(f"P={k}: {v['accuracy']:.3f}" for k, v in runs[-1]["levels"].items())
      print(f"{family} d={width}: {accs} ({runs[-1]['train_seconds']:.0f} s)", flush=True)
      done = len(runs) == len(families) * len(settings["widths"])
      out = write(args, settings, runs, time.time() - start, complete=done,
                  command=study.command_line(STUDY, argv))
  return out


def write(args, settings: dict, runs: list, seconds: float, complete: bool,
          command: str) -> dict:
  """Writes the outputs of the runs so far (after every model, so a cut-short run leaves its
  finished models on disk; ``complete`` says whether every model is in)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pairs = tuple(settings["pairs"])
  md = table(runs, pairs, settings["vocab_size"])
  if complete:
    print(md)
  results = {"scale": args.scale, "seed": args.seed, "settings": settings, "runs": runs,
             "complete": complete, "wall_seconds": seconds}
  fig = plot(runs, pairs)
  paths = study.write_outputs(args.out, STUDY, results, md, fig, command=command)
  plt.close(fig)
  return {"paths": paths, **results}


if __name__ == "__main__":
  main()
