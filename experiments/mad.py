"""The MAD synthetic suite (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid
Architectures") for HOPE, Transformer++, Gated DeltaNet, Titans (LMM) and Mamba2.

MAD trains a small model (width 128, two blocks of a sequence mixer and a SwiGLU) on six synthetic
tasks and reports the test accuracy of the best run of a learning-rate x weight-decay grid. The
Nested Learning paper reports HOPE on five of them (compression 51.2, in-context recall 100, fuzzy
in-context recall 52.1, selective copying 99.7, memorisation 85.2); the table prints that row
beside the measured ones. The six tasks (their generators, datasets and batches) are in
``experiments.mad_tasks``: in-context recall, fuzzy and noisy in-context recall, selective copying,
compression (through MAD's autoencoder backbone, ``AutoEncoder`` here) and memorisation.

Protocol (MAD's ``train.py`` / ``benchmark.py``, what differs is said):

* Data: 12,800 training sequences per task (memorisation 256, as in MAD's config), 1,280 test
  sequences from a seed disjoint from the training seed; the training set is reshuffled every
  epoch. Recall tasks train on next-token prediction at every position (MAD's training targets)
  and are tested on the scored positions only; the other tasks train and test on the scored
  positions (ignore index -100 elsewhere).
* Model: ``configs/<family>.py:tiny`` with ``d_model=128, n_layers=2``, the task's vocabulary,
  ``max_seq_len`` its length, an untied output head (MAD's ``unembed``), SwiGLU width 352 (MAD's:
  ``int(2 * 128 * 4 / 3)`` rounded up to 16); HOPE's MLP is its CMS, two levels (tiny periods
  16 / 64) of width 176 each (the same MLP parameters). Other fields stay at the tiny preset (2
  heads of dim 64; MAD's attention has 16 heads of dim 8).
* Optimisation: AdamW (torch defaults: β 0.9 / 0.999, ε 1e-8, decay on every parameter), batch
  128, cosine decay of the learning rate per epoch from lr to 1e-6 over the run (MAD's
  ``CosineAnnealingLR``), no warmup or clipping, float32 (MAD: bf16 mixed precision). Grid: lr
  {1e-4, 5e-4, 1e-3} x weight decay {0, 0.1}; 200 epochs.
* Score: MAD's accuracy is torchmetrics' ``MulticlassAccuracy`` with its default macro average,
  over the scored positions: the mean over classes (that occur as a target or a prediction) of
  the fraction of that class's targets predicted right; the JSON also has the plain fraction of
  scored positions right (``token_accuracy``). The table reports, per (task, model), the accuracy
  after the last epoch of the best grid run (MAD takes the best run of the sweep; its final
  evaluation loads the checkpoint of lowest test perplexity when checkpoints are saved, its
  default). Every run's curve (test accuracy after each epoch) is in the JSON. MAD's task
  score also averages harder variants of each task (longer, larger vocabulary, fewer examples);
  this study runs the baseline setting only.
* Generators: as said in ``experiments.mad_tasks`` (two corrections of mad-lab's).

Scales (``--scale``):

* ``tiny``: every task shrunk to T 32 and vocabulary 16 (fuzzy, selective copying, memorisation,
  noisy recall with their parameters scaled down) and padded to 32 tokens, 32 training and 32
  test sequences, batch 16, 2 epochs (4 steps), one grid point (lr 1e-3, weight decay 0). The
  numbers say nothing about the models; the scale checks the pipeline end to end (all six tasks
  and five models in a few minutes on 2 CPU cores).
* ``cpu``: MAD's task settings, batch, 1,280 test sequences and lr x weight-decay grid, 1,280
  training sequences (memorisation 256) and one epoch (10 optimizer steps per run; memorisation
  2), with a wall-time budget of 90 minutes for the whole suite (``--time_budget``): the grid's
  points run one after another (lr 1e-3 first), every task and model at each, and no run starts
  once the budget is spent, so a cut-short suite has whole grid points. On 2 CPU cores at load
  4-7, 35 of the 180 runs fit (every task and model at the first grid point; docs/RESULTS.md):
  HOPE trains at ~1,000 tokens/s here, Transformer++ at ~10,000. One epoch of MAD's 12,800
  sequences at one grid point would take some 4.8 hours there; MAD's 200 epochs x 6 grid points
  are far beyond a CPU. MAD's own difficulty variants go down to 800 training sequences.
* ``paper``: MAD's settings: 12,800 / 1,280 sequences, 200 epochs, the 6-point grid.

Commands (from the repository root; ``python experiments/mad.py`` works too)::

  python -m experiments.mad --scale tiny              # writes runs/mad/mad.{json,md,png}
  python -m experiments.mad --scale paper --out runs/mad_paper   # GPU/TPU
  python -m experiments.mad --tasks in_context_recall,compression --models transformer,hope \\
      --epochs 2

Run as a command, the study keeps a JAX compilation cache for the run in a temporary directory:
runs that compile the same program (the grid's learning rates and weight decays are optimizer
state, not constants, and at the tiny scale every task but compression has the same shapes)
compile once. ``--data`` is accepted for uniformity with the other studies and unused (the data
are generated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx

if __package__:  # python -m experiments.mad
  from experiments import mad_tasks, study
else:  # python experiments/mad.py: Python puts this folder first on the path
  import mad_tasks  # pylint: disable=import-error
  import study  # pylint: disable=import-error
IGNORE, TASKS = mad_tasks.IGNORE, mad_tasks.TASKS

STUDY = "mad"
MODELS = ("hope", "transformer", "gated_deltanet", "titans_lmm", "mamba2")
LABELS = {"hope": "HOPE", "transformer": "Transformer++", "gated_deltanet": "Gated DeltaNet",
          "titans_lmm": "Titans (LMM)", "mamba2": "Mamba2"}
SCALES = ("tiny", "cpu", "paper")
D_MODEL = 128
SWIGLU_WIDTH = 352  # MAD's SwiGLU: int(2 * 128 * 4 / 3) = 341, rounded up to a multiple of 16
MIN_LR = 1e-6  # MAD's cosine schedule ends at min_lr
# The Nested Learning paper's HOPE row on MAD (accuracy %; noisy recall not reported).
PAPER_HOPE = {"compression": 51.2, "in_context_recall": 100.0, "fuzzy_in_context_recall": 52.1,
              "noisy_in_context_recall": None, "selective_copying": 99.7, "memorization": 85.2}


# The tiny scale's task settings: every task at 32 tokens and vocabulary 16, so that one compiled
# program serves every task of a model (compression excepted: another backbone).
TINY_TASKS = {
    "in_context_recall": dict(seq_len=32),
    "fuzzy_in_context_recall": dict(seq_len=32),
    "noisy_in_context_recall": dict(vocab_size=16, noise_vocab_size=8, seq_len=32),
    "selective_copying": dict(seq_len=32, num_tokens_to_copy=4),
    "compression": dict(),
    "memorization": dict(vocab_size=16),
}

# train_examples: at most this many training sequences per task (None: MAD's, 12,800 and 256 for
# memorisation); pad_to: batches padded on the right to this length (None: the task's own);
# time_budget: seconds after which no run starts (0: none).
PRESETS = {
    "tiny": dict(epochs=2, batch_size=16, train_examples=32, test_examples=32, lrs=(1e-3,),
                 weight_decays=(0.0,), task_settings=TINY_TASKS, pad_to=32, time_budget=0),
    "cpu": dict(epochs=1, batch_size=128, train_examples=1280, test_examples=1280,
                lrs=(1e-3, 5e-4, 1e-4), weight_decays=(0.0, 0.1), task_settings={}, pad_to=None,
                time_budget=5400),
    "paper": dict(epochs=200, batch_size=128, train_examples=None, test_examples=1280,
                  lrs=(1e-4, 5e-4, 1e-3), weight_decays=(0.0, 0.1), task_settings={},
                  pad_to=None, time_budget=0),
}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def known_families() -> list:
  """The families of ``configs/*.py``."""
  return sorted(f[:-3] for f in os.listdir(os.path.join(study.REPO, "configs"))
                if f.endswith(".py"))


def model_config(family: str, vocab_size: int, seq_len: int, d_model: int = D_MODEL):
  """MAD's model in ``family``: ``configs/<family>.py:tiny`` at width ``d_model``, 2 blocks, an
  untied head, SwiGLU width 352 (HOPE: two CMS levels of 176, their periods
  ``study.cms_periods_within(seq_len)``: 4 / 16 at 32 tokens, so that both update in training).
  """
  mlp_dim = SWIGLU_WIDTH // 2 if family == "hope" else SWIGLU_WIDTH
  cms = ({"cms_periods": study.cms_periods_within(seq_len)}
         if nlx.nn.registry.get(family).mlp is not None else {})
  return study.model_config(family, vocab_size=vocab_size, d_model=d_model, n_layers=2,
                            mlp_dim=mlp_dim, max_seq_len=seq_len, tie_embeddings=False, **cms)


def sincos(length: int, dim: int) -> jax.Array:
  """MAD's ``posemb_sincos_1d``: ``[length, dim]``, sines then cosines of geometric frequencies."""
  half = dim // 2
  freq = jnp.exp(jnp.arange(half) * -(np.log(10000.0) / max(half - 1, 1)))
  angle = jnp.arange(length)[:, None] * freq[None]
  emb = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], 1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class AutoEncoder(nnx.Module):
  """MAD's compression backbone around an nlx model.

  The nlx model (the family's blocks) reads the sequence; its output at the last position is the
  code. The code plus a sinusoidal code of each position goes through MAD's MLP decoder (RMSNorm,
  Linear, GELU, RMSNorm, Linear, GELU) and an RMSNorm + Linear unembedding: logits ``[B, T, V]``.
  The nlx model's vocabulary is ``max(V, d_model)`` with an untied head, so that its "logits" are
  a linear read-out of its final state, the code (one extra linear map beside MAD's, which takes
  the last hidden state itself).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    width = max(cfg.vocab_size, cfg.d_model)
    self.encoder = nlx.build_model(dataclasses.replace(cfg, vocab_size=width,
                                                       tie_embeddings=False), rngs=rngs)
    if self.encoder.cms_next_token:
      raise ValueError("compression: the CMS next-token objective needs the model's logits; "
                       "use model.cms_objective='local'")
    d, init = cfg.d_model, nnx.initializers.normal(0.02)
    linear = lambda i, o: nnx.Linear(i, o, kernel_init=init, rngs=rngs)
    self.norm1, self.fc1 = nnx.RMSNorm(width, rngs=rngs), linear(width, d)
    self.norm2, self.fc2 = nnx.RMSNorm(d, rngs=rngs), linear(d, d)
    self.norm3, self.unembed = nnx.RMSNorm(d, rngs=rngs), linear(d, cfg.vocab_size)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    code = self.encoder(tokens)[:, -1]  # [B, width]
    x = code[:, None] + sincos(tokens.shape[1], code.shape[-1])[None]
    x = jax.nn.gelu(self.fc1(self.norm1(x)), approximate=False)
    x = jax.nn.gelu(self.fc2(self.norm2(x)), approximate=False)
    return self.unembed(self.norm3(x)).astype(jnp.float32)


def build(name: str, cfg, seed: int):
  """The model of task ``name``: the ``ModelConfig`` itself (``study.train`` builds it) or, for
  compression, an ``AutoEncoder``."""
  return AutoEncoder(cfg, rngs=nnx.Rngs(seed)) if name == "compression" else cfg


# ---------------------------------------------------------------------------------------------
# Optimizer and score
# ---------------------------------------------------------------------------------------------

def mad_optimizer(lr: float, weight_decay: float, epochs: int,
                  steps_per_epoch: int) -> optax.GradientTransformation:
  """MAD's optimizer: AdamW (torch defaults, decay on every parameter) with the learning rate
  ``MIN_LR + (lr - MIN_LR) (1 + cos(π e / epochs)) / 2`` in epoch ``e`` (``CosineAnnealingLR``
  stepped per epoch). ``lr`` and ``weight_decay`` are optimizer state, so every point of the grid
  runs the same compiled program."""
  def make(learning_rate, weight_decay):
    def schedule(count):
      epoch = jnp.minimum(count // steps_per_epoch, epochs)
      return MIN_LR + (learning_rate - MIN_LR) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / epochs))
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  return optax.inject_hyperparams(make)(learning_rate=lr, weight_decay=weight_decay)


def score(predicted: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
  """Accuracy over the scored positions (``mask`` 1).

  Returns ``{"accuracy": MAD's (torchmetrics' macro MulticlassAccuracy: the mean, over classes
  that occur as a target or a prediction, of the fraction of the class's targets predicted
  right), "token_accuracy": the fraction of scored positions right, "scored": their number}``.
  """
  counted = mask > 0
  p, t = predicted[counted].astype(np.int64), targets[counted].astype(np.int64)
  if not len(t):
    return {"accuracy": 0.0, "token_accuracy": 0.0, "scored": 0}
  n = int(max(p.max(), t.max())) + 1
  tp = np.bincount(t[p == t], minlength=n)
  support, predicted_count = np.bincount(t, minlength=n), np.bincount(p, minlength=n)
  present = (support + predicted_count) > 0  # tp + fp + fn > 0
  per_class = tp / np.maximum(support, 1)
  return {"accuracy": float(per_class[present].mean()), "token_accuracy": float((p == t).mean()),
          "scored": int(len(t))}


def evaluate(model, batches: Sequence[study.Batch]) -> dict:
  """``score`` of the greedy predictions of ``model`` on ``batches``."""
  predicted = np.concatenate([study.predict(model, b.inputs) for b in batches])
  return score(predicted, np.concatenate([b.targets for b in batches]),
               np.concatenate([b.mask for b in batches]))


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def run_one(name: str, family: str, data: dict, lr: float, weight_decay: float, settings: dict,
            seed: int) -> dict:
  """Trains one (task, model, lr, weight decay); the test accuracy after every epoch."""
  width = settings.get("pad_to") if name != "compression" else None
  length = max(data["length"], width or 0)
  cfg = model_config(family, data["vocab_size"], length)
  model = build(name, cfg, seed)
  batch, epochs = settings["batch_size"], settings["epochs"]
  per_epoch = len(data["train"][0]) // batch
  tests = mad_tasks.test_batches(data["test"], batch, width)
  batches = mad_tasks.train_batch_fn(data["train"], batch, seed, width)
  result = study.train(model, batches, per_epoch * epochs, seed=seed,
                       tx=mad_optimizer(lr, weight_decay, epochs, per_epoch),
                       desc=f"{name} {family} lr={lr:g} wd={weight_decay:g}",
                       evaluate=lambda m: evaluate(m, tests), eval_every=per_epoch)
  losses = np.asarray(result.losses)
  curve = [{"epoch": e["step"] / per_epoch, "step": e["step"],
            "train_loss": float(losses[max(0, e["step"] - per_epoch):e["step"]].mean()),
            **{k: e[k] for k in ("accuracy", "token_accuracy")}} for e in result.evals]
  diverged = next((i for i, x in enumerate(result.losses) if not np.isfinite(x)), None)
  return {"task": name, "model": family, "lr": lr, "weight_decay": weight_decay,
          "params": result.params, "steps": len(result.losses), "steps_per_epoch": per_epoch,
          "accuracy": curve[-1]["accuracy"], "token_accuracy": curve[-1]["token_accuracy"],
          "best_epoch_accuracy": max(c["accuracy"] for c in curve),
          "scored_test_positions": result.evals[-1]["scored"], "curve": curve,
          "diverged_at_step": diverged, "skipped_steps": result.skipped,
          "train_seconds": result.seconds,
          "tokens_per_second": result.tokens_per_second}


def best_runs(runs: Sequence[dict]) -> dict:
  """``{task: {model: run}}``: per (task, model) the grid run with the highest final accuracy
  (MAD's choice; the first such run on a tie)."""
  best = {}
  for r in runs:
    mine = best.setdefault(r["task"], {})
    if r["model"] not in mine or r["accuracy"] > mine[r["model"]]["accuracy"]:
      mine[r["model"]] = r
  return best


def table(runs: Sequence[dict], tasks: Sequence[str], models: Sequence[str]) -> str:
  """Markdown: MAD accuracy (%) of the best grid run per task and model, the paper's HOPE beside
  them; then per model its parameters and time."""
  best = best_runs(runs)
  cols = ["task"] + [LABELS.get(m, m) for m in models] + ["HOPE (paper)"]
  rows = []
  for name in tasks:
    cells = [TASKS[name].title]
    for m in models:
      r = best.get(name, {}).get(m)
      cells.append("–" if r is None else f"{100 * r['accuracy']:.1f}"
                   + (" (diverged)" if r["diverged_at_step"] is not None else ""))
    paper = PAPER_HOPE[name]
    rows.append(cells + ["–" if paper is None else f"{paper:.1f}"])
  per_model = []
  for m in models:
    mine = [r for r in runs if r["model"] == m]
    if mine:
      params = "/".join(str(best[t][m]["params"]) for t in tasks if m in best.get(t, {}))
      per_model.append([LABELS.get(m, m), params, float(sum(r["train_seconds"] for r in mine)),
                        float(np.mean([r["tokens_per_second"] for r in mine]))])
  return (study.markdown_table(cols, rows) + "\n"
          + study.markdown_table(["model", "params (per task, in table order)",
                                  "train s (all runs)", "tokens/s"], per_model, digits=0))


def plot(runs: Sequence[dict], tasks: Sequence[str], models: Sequence[str]):
  """A panel per task: test accuracy after each epoch of each model's best grid run."""
  fig, axes = study.figure(len(tasks), width=3.6, height=3.2)
  best = best_runs(runs)
  for ax, name in zip(axes, tasks):
    for m in models:
      r = best.get(name, {}).get(m)
      if r is not None:
        ax.plot([c["epoch"] for c in r["curve"]], [100 * c["accuracy"] for c in r["curve"]],
                marker="o" if len(r["curve"]) < 20 else None, label=LABELS.get(m, m))
    if PAPER_HOPE[name] is not None:
      ax.axhline(PAPER_HOPE[name], color="gray", linestyle=":", label="HOPE (paper)")
    ax.set_ylim(0, 102)
    ax.set_title(TASKS[name].title, fontsize=9)
    ax.set_xlabel("epoch")
  axes[0].set_ylabel("test accuracy (%)")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = study.arg_parser(__doc__, STUDY, scales=SCALES, scale_help=(
      "tiny: every task and model in minutes on 2 CPU cores (a pipeline check); cpu: MAD's grid, "
      "one epoch of 1,280 sequences, 90 min on 2 CPU cores; paper: MAD's settings"))
  parser.add_argument("--tasks", default=None, help=f"comma-separated of {', '.join(TASKS)}")
  parser.add_argument("--models", default=None,
                      help=f"comma-separated families (default: {', '.join(MODELS)})")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--train_examples", type=int, default=None,
                      help="at most this many training sequences per task")
  parser.add_argument("--test_examples", type=int, default=None)
  parser.add_argument("--lrs", default=None, help="comma-separated learning rates of the grid")
  parser.add_argument("--weight_decays", default=None,
                      help="comma-separated weight decays of the grid")
  parser.add_argument("--time_budget", type=float, default=None,
                      help="seconds after which no run starts (0: none; default: the scale's)")
  args = parser.parse_args(argv)
  tasks = study.parse_list("--tasks", args.tasks, known=tuple(TASKS))
  models = study.parse_list("--models", args.models, known=known_families(),
                            default=list(MODELS))
  for flag in ("epochs", "batch_size", "train_examples", "test_examples"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise ValueError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
  if args.time_budget is not None and args.time_budget < 0:
    raise ValueError(f"--time_budget must be >= 0 seconds; got {args.time_budget}")
  floats = lambda flag, value: value and tuple(study.parse_list(flag, value, convert=float,
                                                                minimum=0.0))
  settings = study.scale_settings(
      PRESETS, args.scale, epochs=args.epochs, batch_size=args.batch_size,
      train_examples=args.train_examples, test_examples=args.test_examples,
      lrs=floats("--lrs", args.lrs), weight_decays=floats("--weight_decays", args.weight_decays),
      time_budget=args.time_budget)
  command = study.command_line(STUDY, argv)
  start, runs, info, datasets = time.time(), [], {}, {}
  for name in tasks:
    datasets[name] = data = mad_tasks.dataset(name, settings, args.seed)
    info[name] = {"title": TASKS[name].title, "generator": data["kwargs"],
                  "train_examples": len(data["train"][0]), "test_examples": len(data["test"][0]),
                  "length": data["length"],
                  "scored_per_test_sequence": float((data["test"][1] != IGNORE).sum(1).mean()),
                  "paper_hope": PAPER_HOPE[name]}
  grid = [(lr, wd) for lr in settings["lrs"] for wd in settings["weight_decays"]]
  total, out, budget = len(tasks) * len(models) * len(grid), None, settings["time_budget"]
  # Grid point by grid point, so that a suite cut by its time budget has whole grid points.
  for lr, wd in grid:
    for name in tasks:
      for family in models:
        if budget and runs and time.time() - start > budget:  # at least one run
          print(f"time budget of {budget:g} s spent after {len(runs)} of {total} runs: the rest "
                "did not run", flush=True)
          return write(args, settings, tasks, models, info, runs, time.time() - start,
                       complete=False, command=command, final=True)
        runs.append(run_one(name, family, datasets[name], lr, wd, settings, args.seed))
        r = runs[-1]
        print(f"[{len(runs)}/{total}] {name:24s} {family:15s} lr={lr:g} wd={wd:g}: accuracy "
              f"{100 * r['accuracy']:.1f} (token {100 * r['token_accuracy']:.1f}) "
              f"({r['train_seconds']:.0f} s)", flush=True)
        out = write(args, settings, tasks, models, info, runs, time.time() - start,
                    complete=len(runs) == total, command=command)
  return out


def write(args, settings: dict, tasks, models, info: dict, runs: list, seconds: float,
          complete: bool, command: Optional[str] = None, final: bool = False) -> dict:
  """Writes the outputs of the runs so far (after every run, so that a cut-short suite leaves its
  finished runs on disk); the figure when ``complete`` or ``final`` (the time budget ended the
  suite)."""
  md = table(runs, [t for t in tasks if t in info], models)
  settings_line = (f"{settings['epochs']} epochs, batch {settings['batch_size']}, grid lr "
                   f"{settings['lrs']} x weight decay {settings['weight_decays']}; accuracy: MAD's "
                   "(macro over classes, scored positions), % of the best grid run after the last "
                   "epoch\n\n")
  results = {"scale": args.scale, "seed": args.seed, "settings": settings, "tasks": info,
             "models": list(models), "runs": runs,
             "best": {t: {m: {k: r[k] for k in ("accuracy", "token_accuracy", "lr",
                                                "weight_decay", "best_epoch_accuracy")}
                          for m, r in ms.items()} for t, ms in best_runs(runs).items()},
             "paper_hope": PAPER_HOPE, "complete": complete, "wall_seconds": seconds}
  total = len(tasks) * len(models) * len(settings["lrs"]) * len(settings["weight_decays"])
  settings_line += (f"runs: {len(runs)} of {total}"
                    + ("" if complete else " (the rest did not run)") + "\n\n")
  fig = plot(runs, [t for t in tasks if t in info], models) if complete or final else None
  if complete or final:
    print(md)
  paths = study.write_outputs(args.out, STUDY, results, settings_line + md, fig, command=command)
  if fig is not None:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    plt.close(fig)
  return {"paths": paths, "table": md, **results}


@contextlib.contextmanager
def compile_cache():
  """A JAX compilation cache in a temporary directory for the duration (unless one is set): runs
  that compile the same program, such as the points of the grid, compile it once."""
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  with tempfile.TemporaryDirectory(prefix="nlx_mad_jax_cache_") as directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


if __name__ == "__main__":
  with compile_cache():
    main()
