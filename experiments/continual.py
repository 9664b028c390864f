"""Class-incremental text classification: Hope-attention (level stacking) against fine-tuning,
EWC and in-context learning (docs/EQUATIONS.md §3, §6; docs/EQUATIONS.md, choice 12).

The paper converts a pretrained Transformer into a Hope-attention model by level stacking (each
MLP becomes a CMS level) and reports, in a figure only, that it beats ICL, EWC and InCA on
class-incremental CLINC150, Banking77 and DBpedia, and that a lowest CMS frequency of 2K (among
512 / 2K / 8K, with 1-4 levels) is near-optimal and much cheaper than 512. This study repeats
that setup at a size that runs on a CPU:

1. A Transformer++ (``configs/transformer.py``) is pretrained briefly on bytes of the embedded
   tinyshakespeare corpus.
2. Each dataset's classes are drawn with the seed and cut into ``n_tasks`` disjoint groups of
   ``classes_per_task`` (the task order is that draw). The model learns the tasks one after
   the other and, after each task, is tested on every class seen so far.
3. Classification is next-token prediction of a label id token: an example reads
   ``"<text>\\nlabel: X"`` with ``X`` one byte per class (``A``, ``B``, ... in task order); the
   prediction is the argmax of the logits at the position after ``"label: "`` over the label
   tokens of the classes seen so far. (Scoring every class name instead costs one forward per
   class and example, and a byte-level model of this size knows nothing of intent names.)

Methods (every one starts from the same pretrained Transformer):

* ``fine-tune``: the Transformer trained on each task in turn (AdamW, loss on the label token).
* ``EWC``: the same, plus ``lambda/2 · Σ F (θ − θ*)²``: after each task the diagonal Fisher
  ``F`` (mean squared gradient of the task's loss over a few batches) is added to the running
  sum and ``θ*`` becomes the current parameters (online EWC). ``lambda`` = 1e5 was picked on
  CLINC150 (tiny) among 1e3 (the penalty changes nothing), 1e5 and 1e7 (stops learning).
* ``ICL``: the pretrained Transformer, never updated; its context holds ``icl_shots`` labelled
  examples of every class seen so far (seeded order) before the query.
* ``Hope-attention``: ``nlx.convert.transformer_to_hope_attention`` puts each block's MLP into
  the slowest CMS level (the faster levels start adding 0). How it "learns the tasks" here: the
  outer loop fine-tunes it on each task exactly like ``fine-tune`` (same data, steps, rate),
  while (a) its CMS levels also learn in context (``cms_lr > 0``: every sequence, in training
  and at test time, updates the levels at their periods, local objective), and (b) the outer
  updates of level ℓ follow its frequency: they are scaled by ``min(1, outer_period / C_ℓ)``,
  so a level that updates 4x less often in context also moves 4x less in the outer loop and
  the slow level that holds the pretrained MLP changes least. Attention, embedding and norms
  take full outer steps, as in ``fine-tune``. (The other reading, streaming a task's examples
  as one long context so that only in-context updates learn, is not run here: the tiny model's
  attention is pretrained on short contexts and each test query would need the whole stream.)

Metrics (docs/EQUATIONS.md, choice 12): the accuracy matrix ``A[i, j]`` (accuracy on task j's
classes after learning task i, argmax over all classes seen after task i); average accuracy after
task i (over every test example of the classes seen so far); forgetting after the last task (mean
over earlier tasks of the max earlier accuracy minus the final accuracy).

Sweep (first dataset only), Hope-attention with the fastest level at ``outer_period`` (16
tokens at tiny): the number of CMS levels (1-4; the slowest at ``levels_period`` = 128, the
others at 16, 32, 64) and the lowest frequency (two levels ``(16, P)``, P in 32 / 128 / 512:
the paper's 512 / 2K / 8K, each 4x the last, scaled to 64-byte sequences; with sequences of 64
bytes a level of period > 64 never updates in context, so here the lowest frequency acts through
the outer-update scale ``16 / P`` of the level that holds the pretrained MLP).

Tiny setup: d_model 64, 2 layers, byte vocabulary; 150 pretraining steps of 16 x 128 bytes; per
dataset 3 tasks x 5 classes (DBpedia: 3 x 4 of its 14), 24 training and 8 test examples per
class, texts cut to 55 bytes; 50 steps of 16 examples per task for every trained method (lr
3e-3).

Sanity row (the baselines' known behaviour, e.g. van de Ven et al. 2022: fine-tuning learns each
new task and forgets the earlier ones in class-incremental learning): fine-tune's mean accuracy on
the task just learned (``acc[i, i]``) is >= 0.5 on every dataset (chance <= 0.2); forgetting is
what the study measures. ``--scale cpu`` gives it more to learn from: 100 training and 30 test
examples per class, 150 steps per task, 300 pretraining steps; no sweep.

Data: the datasets directory (``--data DIR``, else ``$NLX_DATA``) holds ``clinc150/``,
``banking77/`` and ``dbpedia14/`` (``experiments.continual_data``, which also builds the tasks).

Commands (from the repository root; ``DATA`` the datasets directory)::

  python -m experiments.continual --scale tiny --data DATA     # ~10 min on 2 idle CPU cores
  python -m experiments.continual --scale cpu --data DATA --out runs/continual_cpu   # <= 90 min
  python -m experiments.continual --scale small --out runs/continual_small   # GPU/TPU; NLX_DATA
  python -m experiments.continual --datasets clinc150 --steps 2 --levels "" --lowest-periods ""

Outputs: ``runs/continual/continual.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx
from experiments import study
from experiments.continual_data import (DATASETS, PROMPT, Examples, Task, encode_examples,
                                        icl_prefix, load_dataset, make_tasks, train_batch)
from nlx import convert
from nlx.data import sources
from nlx.data.tokenizers import ByteTokenizer
from nlx.train.fitting import fit

STUDY = "continual"
METHODS = ("fine-tune", "EWC", "ICL", "Hope-attention")

PRESETS = {
    "tiny": dict(size="tiny", pretrain_steps=150, pretrain_len=128, pretrain_batch=16,
                 n_tasks=3, classes_per_task=5, n_train=24, n_test=8, max_text=55, seq_len=64,
                 steps=50, batch=16, lr=3e-3, ewc_lambda=1e5, fisher_batches=4,
                 icl_shots=1, icl_text=28, cms_lr=1e-2, outer_period=16,
                 main_periods=(16, 128), levels=(1, 2, 3, 4), levels_period=128,
                 lowest_periods=(32, 128, 512)),
    # <= 90 min on 2 CPU cores: 4x tiny's training examples per class (CLINC150 has 100), 3x its
    # steps per task, 2x its pretraining; no sweep (its levels and lowest periods: --levels, ...)
    "cpu": dict(size="tiny", pretrain_steps=300, pretrain_len=128, pretrain_batch=16,
                n_tasks=3, classes_per_task=5, n_train=100, n_test=30, max_text=55, seq_len=64,
                steps=150, batch=16, lr=3e-3, ewc_lambda=1e5, fisher_batches=8,
                icl_shots=1, icl_text=28, cms_lr=1e-2, outer_period=16,
                main_periods=(16, 128), levels=(), levels_period=128, lowest_periods=()),
    "small": dict(size="20m", pretrain_steps=3000, pretrain_len=512, pretrain_batch=32,
                  n_tasks=5, classes_per_task=10, n_train=64, n_test=30, max_text=120,
                  seq_len=128, steps=300, batch=32, lr=5e-4, ewc_lambda=1e5,
                  fisher_batches=16, icl_shots=2, icl_text=60, cms_lr=1e-2, outer_period=32,
                  main_periods=(32, 256), levels=(1, 2, 3, 4), levels_period=256,
                  lowest_periods=(64, 256, 1024)),
    "paper": dict(size="760m", pretrain_steps=20000, pretrain_len=2048, pretrain_batch=64,
                  n_tasks=7, classes_per_task=10, n_train=100, n_test=30, max_text=500,
                  seq_len=512, steps=500, batch=32, lr=1e-4, ewc_lambda=1e5,
                  fisher_batches=32, icl_shots=2, icl_text=120, cms_lr=1e-3, outer_period=128,
                  main_periods=(128, 2048), levels=(1, 2, 3, 4), levels_period=2048,
                  lowest_periods=(512, 2048, 8192)),
}


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def classify(logits: np.ndarray, allowed: Sequence[int]) -> np.ndarray:
  """Argmax of ``logits [N, V]`` over the token ids ``allowed``: the predicted ids ``[N]``."""
  allowed = np.asarray(allowed)
  return allowed[np.argmax(np.asarray(logits)[:, allowed], axis=-1)]


def average_accuracy(acc: np.ndarray, sizes: Sequence[int]) -> list[float]:
  """Average accuracy over the seen classes after each task.

  Args:
    acc: ``[n_tasks, n_tasks]``: ``acc[i, j]`` accuracy on task j after task i (j <= i used).
    sizes: test examples per task (weights).
  """
  sizes = np.asarray(sizes, np.float64)
  return [float(np.dot(acc[i, :i + 1], sizes[:i + 1]) / sizes[:i + 1].sum())
          for i in range(len(sizes))]


def forgetting(acc: np.ndarray) -> float:
  """Mean over the tasks before the last of (max accuracy after earlier tasks − final)."""
  n = acc.shape[0]
  if n < 2:
    return 0.0
  return float(np.mean([acc[j:n - 1, j].max() - acc[n - 1, j] for j in range(n - 1)]))


# ---------------------------------------------------------------------------------------------
# Learners: a model trained by nlx's one train step (``fit``), its Fisher and its predictions
# ---------------------------------------------------------------------------------------------

def ewc_loss(model, batch) -> jax.Array:
  """``masked_loss`` plus the EWC penalty ``lambda/2 · Σ F (θ − θ*)²`` of ``model``'s parameters
  ``θ``; ``batch = (study.Batch, fisher F, anchor θ*, lambda)`` (lambda 0: plain fine-tuning)."""
  data, fisher, anchor, lam = batch
  params = nnx.state(model, nnx.Param)
  sq = jax.tree.map(lambda f, x, a: jnp.sum(f * (x - a) ** 2), fisher, params, anchor)
  return study.masked_loss(model, data) + 0.5 * lam * sum(jax.tree.leaves(sq))


def level_scales(params, cfg, outer_period: int):
  """Outer-update scale per parameter: ``min(1, outer_period / C_ℓ)`` on CMS level ℓ, 1 else."""
  periods = cfg.cms_periods if cfg.family == "hope_attention" else ()

  def scale(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if "mlp" in keys and periods:
      level = keys[keys.index("mlp") + 2]
      return min(1.0, outer_period / periods[int(level)])
    return 1.0

  return jax.tree_util.tree_map_with_path(scale, params)


class Learner:
  """Trains and evaluates one model; the jitted functions are reused across tasks and datasets.

  Args:
    model: an ``nlx`` LM.
    lr: AdamW rate (constant; a fresh optimizer per task).
    outer_period: see ``level_scales`` (Hope-attention only).
  """

  def __init__(self, model, lr: float, outer_period: int = 1):
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.params = params
    scales = level_scales(params, model.cfg, outer_period)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    # One optimizer object per learner: ``fit`` compiles its step once per learner (per graph,
    # optimizer and loss), for every task and dataset.
    self.tx = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(lr, b2=0.95, weight_decay=0.0, mask=decay),
                          optax.stateless(lambda u, _: jax.tree.map(jnp.multiply, u, scales)))
    self._grad = jax.jit(jax.grad(self._loss))
    self._logits = jax.jit(self._logits_impl)

  def load(self, model) -> None:
    """Starts again from ``model``'s parameters (same architecture: the compiled steps stay)."""
    params = nnx.split(model, nnx.Param, ...)[1]
    if jax.tree.structure(params) != jax.tree.structure(self.params):
      raise ValueError("Learner.load: the model's parameters differ from the learner's")
    self.params = params

  def _loss(self, params, batch):
    return study.masked_loss(nnx.merge(self.graphdef, params, self.rest), batch)

  def _logits_impl(self, params, tokens, pos):
    logits = nnx.merge(self.graphdef, params, self.rest)(tokens)
    return jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0].astype(jnp.float32)

  def fit(self, batch_fn: Callable[[int], study.Batch], steps: int, ewc=None, desc=""):
    """``steps`` AdamW steps (a fresh optimizer state) on ``batch_fn`` with ``ewc_loss``;
    ``ewc = (fisher, anchor, lambda)`` or None. Returns the loss of every step."""
    zeros = jax.tree.map(jnp.zeros_like, self.params)
    fisher, anchor, lam = ewc if ewc else (zeros, zeros, 0.0)
    lam = jnp.float32(lam)
    result = fit(nnx.merge(self.graphdef, self.params, self.rest),
                 lambda step: (batch_fn(step), fisher, anchor, lam), steps, tx=self.tx,
                 loss=ewc_loss, desc=desc)
    self.params = nnx.split(result.model, nnx.Param, ...)[1]
    return result.losses

  def fisher(self, batch_fn: Callable[[int], study.Batch], n: int):
    """Diagonal empirical Fisher: mean over ``n`` batches of the squared loss gradient."""
    total = jax.tree.map(jnp.zeros_like, self.params)
    for i in range(n):
      batch = study.Batch(*(jnp.asarray(x) for x in batch_fn(10_000 + i)))
      grads = self._grad(self.params, batch)
      total = jax.tree.map(lambda t, g: t + g * g / n, total, grads)
    return total

  def predict(self, ex: Examples, allowed: Sequence[int], batch: int = 40) -> np.ndarray:
    """Predicted label bytes ``[N]`` of ``ex`` (rows padded to ``batch`` to keep one shape)."""
    out = []
    for i in range(0, len(ex.label), batch):
      tokens, pos = ex.tokens[i:i + batch], ex.pos[i:i + batch]
      pad = batch - len(pos)
      tokens = np.concatenate([tokens, np.zeros((pad,) + tokens.shape[1:], np.int32)])
      pos = np.concatenate([pos, np.zeros(pad, np.int32)])
      logits = np.asarray(self._logits(self.params, jnp.asarray(tokens), jnp.asarray(pos)))
      out.append(classify(logits[:len(logits) - pad], allowed))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# One continual run
# ---------------------------------------------------------------------------------------------

def accuracy_row(predict: Callable, tasks: list[Task], upto: int) -> list[float]:
  """Accuracy on each task ``j <= upto`` (argmax over the classes of tasks ``<= upto``)."""
  allowed = [b for t in tasks[:upto + 1] for b in t.tokens]
  return [float(np.mean(predict(t.test, allowed) == t.test.label)) for t in tasks[:upto + 1]]


def summarize(rows: list[list[float]], tasks: list[Task]) -> dict:
  """Accuracy matrix, average accuracy after each task and forgetting."""
  n = len(tasks)
  acc = np.zeros((n, n))
  for i, row in enumerate(rows):
    acc[i, :len(row)] = row
  sizes = [len(t.test.label) for t in tasks]
  return {"acc_matrix": acc.tolist(), "avg_acc": average_accuracy(acc, sizes),
          "forgetting": forgetting(acc)}


def run_sequential(learner: Learner, tasks: list[Task], s: dict, seed: int, ewc: bool,
                   desc: str) -> dict:
  """Learns the tasks in order with ``learner`` (optionally EWC); tests after each."""
  rows, fisher, anchor, losses = [], None, None, []
  for i, task in enumerate(tasks):
    batch_fn = lambda step, t=task, i=i: train_batch(t.train, step, s["batch"], seed * 1000 + i)
    reg = (fisher, anchor, s["ewc_lambda"]) if ewc and fisher is not None else None
    losses.append(learner.fit(batch_fn, s["steps"], reg, desc=f"{desc} task {i + 1}"))
    if ewc:
      new = learner.fisher(batch_fn, s["fisher_batches"])
      fisher = new if fisher is None else jax.tree.map(jnp.add, fisher, new)
      anchor = learner.params
    rows.append(accuracy_row(learner.predict, tasks, i))
  return {**summarize(rows, tasks), "final_loss": [l[-1] for l in losses]}


def run_icl(learner: Learner, tasks: list[Task], s: dict, seed: int) -> dict:
  """In-context learning: labelled examples of the seen classes before each query."""
  rows = []
  longest = len(icl_prefix(tasks, len(tasks) - 1, s, seed)) + s["seq_len"]
  seq_len = -(-longest // 64) * 64
  for i in range(len(tasks)):
    prefix = icl_prefix(tasks, i, s, seed)

    def predict(ex, allowed):
      items = [(list(ex.tokens[r, :ex.pos[r] + 1 - len(PROMPT)]), ex.label[r])
               for r in range(len(ex.label))]
      return learner.predict(encode_examples(items, seq_len, prefix), allowed, batch=20)

    rows.append(accuracy_row(predict, tasks, i))
  return {**summarize(rows, tasks), "context_len": seq_len}


# ---------------------------------------------------------------------------------------------
# Pretraining, conversion, the study
# ---------------------------------------------------------------------------------------------

def pretrain(s: dict, seed: int):
  """The Transformer++ pretrained on windows of the embedded corpus (bytes): (model, result)."""
  import gzip  # pylint: disable=g-import-not-at-top
  with gzip.open(sources.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
    corpus = np.asarray(ByteTokenizer().encode(f.read()), np.int32)
  n, b = s["pretrain_len"], s["pretrain_batch"]

  def batch_fn(step):
    starts = np.random.default_rng([seed, 7, step]).integers(0, len(corpus) - n - 1, b)
    return study.lm_batch(np.stack([corpus[i:i + n + 1] for i in starts]))

  cfg = study.model_config("transformer", s["size"])
  if not s["pretrain_steps"]:  # smoke runs: the untrained model
    model = nlx.build_model(cfg, rngs=nnx.Rngs(seed))
    return model, study.FitResult(model, [], 0.0, 0.0, 0)
  result = study.train(cfg, batch_fn, s["pretrain_steps"], lr=3e-3, seed=seed, desc="pretrain")
  return result.model, result


def hope_model(pretrained, s: dict, periods: Sequence[int], seed: int):
  """Hope-attention with CMS ``periods`` by level stacking of ``pretrained`` (slowest level).

  A level never updates within a sequence shorter than its period; when that holds for every
  level (``min(periods) > seq_len``) the model is built with ``cms_lr = 0``, which gives the
  same outputs and gradients without the token-by-token path.
  """
  in_context = min(periods) <= s["seq_len"]
  cfg = study.model_config("hope_attention", s["size"], mlp_dim=pretrained.cfg.mlp_dim,
                           cms_periods=tuple(int(p) for p in periods),
                           cms_lr=s["cms_lr"] if in_context else 0.0)
  return convert.transformer_to_hope_attention(pretrained, cfg, seed=seed)


def sweep_periods(s: dict) -> list[tuple[str, tuple]]:
  """``(sweep name, periods)``. Levels: n levels, the slowest at ``levels_period``, the others
  at ``outer_period``, 2x, 4x it (n = 3: 16 / 32 / 128 at tiny). Lowest frequency: two levels
  ``(outer_period, P)`` for each ``P`` in ``lowest_periods``."""
  fast = [s["outer_period"] << k for k in range(3)]
  out = [("levels", tuple(fast[:n - 1]) + (s["levels_period"],)) for n in s["levels"]]
  out += [("lowest", (s["outer_period"], p)) for p in s["lowest_periods"]]
  return out


def run_dataset(name: str, tasks: list[Task], learners: dict, pretrained, s: dict,
                seed: int, methods: Sequence[str] = METHODS) -> dict:
  """The ``methods`` on one dataset's tasks: ``{method: summary}``."""
  out = {}
  for method in methods:
    start = time.time()
    if method == "ICL":
      res = run_icl(learners["icl"], tasks, s, seed)
    elif method == "Hope-attention":
      learners["hope"].load(hope_model(pretrained, s, s["main_periods"], seed))
      res = run_sequential(learners["hope"], tasks, s, seed, False, f"{name} {method}")
      res["periods"] = list(s["main_periods"])
    else:
      learners["transformer"].load(pretrained)
      res = run_sequential(learners["transformer"], tasks, s, seed, method == "EWC",
                           f"{name} {method}")
    res["seconds"] = time.time() - start
    out[method] = res
    print(f"{name:10s} {method:15s} avg acc {np.round(res['avg_acc'], 3)} forgetting "
          f"{res['forgetting']:.3f} ({res['seconds']:.0f} s)", flush=True)
  return out


def run_sweep(tasks: list[Task], main: dict, pretrained, s: dict, seed: int) -> list[dict]:
  """Hope-attention on the first dataset for every ``sweep_periods`` entry."""
  out, done = [], {tuple(s["main_periods"]): main} if main else {}
  for sweep, periods in sweep_periods(s):
    if periods not in done:
      start = time.time()
      learner = Learner(hope_model(pretrained, s, periods, seed), s["lr"], s["outer_period"])
      done[periods] = run_sequential(learner, tasks, s, seed, False, f"sweep {periods}")
      done[periods]["seconds"] = time.time() - start
      print(f"sweep {sweep:7s} {str(periods):20s} avg acc "
            f"{np.round(done[periods]['avg_acc'], 3)} forgetting "
            f"{done[periods]['forgetting']:.3f}", flush=True)
    res = done[periods]
    out.append({"sweep": sweep, "periods": list(periods), "levels": len(periods),
                "lowest_period": periods[-1], "avg_acc": res["avg_acc"],
                "forgetting": res["forgetting"]})
  return out


SANITY_CURRENT = 0.5  # fine-tune's mean accuracy on the task just learned (5-class chance <= 0.2)


def current_task_accuracy(res: dict) -> float:
  """Mean over tasks of the accuracy on task i right after learning it (``acc_matrix[i][i]``)."""
  acc = np.asarray(res["acc_matrix"])
  return float(np.mean(np.diag(acc)))


def sanity(results: dict) -> dict:
  """The sanity row: fine-tuning learns each task when trained on it (mean current-task accuracy
  >= ``SANITY_CURRENT``) on every dataset; forgetting is what the study measures."""
  values = {name: current_task_accuracy(per["fine-tune"]) for name, per in results.items()
            if "fine-tune" in per}
  return {"metric": "fine-tune's mean accuracy on the task just learned", "values": values,
          "threshold": SANITY_CURRENT,
          "holds": bool(values) and all(v >= SANITY_CURRENT for v in values.values())}


def chance_levels(tasks: list[Task]) -> list[float]:
  """Average accuracy of a uniform guess among the seen classes after each task."""
  seen = np.cumsum([len(t.tokens) for t in tasks])
  return [float(1.0 / k) for k in seen]


def table(results: dict, sweep: list[dict], s: dict, chance: dict) -> str:
  """Markdown: average accuracy after each task and forgetting, per dataset and method (with
  the chance level), then the sweep."""
  n = s["n_tasks"]
  cols = (["dataset", "method", "CMS periods"] + [f"avg acc after task {i + 1}" for i in range(n)]
          + ["forgetting", "current-task acc"])
  rows = []
  for name, per in results.items():
    rows.append([name, "chance", "-"] + list(chance[name]) + ["-", "-"])
    for method, res in per.items():
      periods = "/".join(map(str, res["periods"])) if "periods" in res else "-"
      rows.append([name, method, periods] + list(res["avg_acc"]) + [res["forgetting"],
                                                                     current_task_accuracy(res)])
  first = next(iter(results), "-")
  for row in sweep:
    rows.append([first, f"Hope-attention ({row['sweep']} sweep)",
                 "/".join(map(str, row["periods"]))] + list(row["avg_acc"])
                + [row["forgetting"], "-"])
  md = study.markdown_table(cols, rows)
  md += ("\ncurrent-task acc: the mean over tasks of the accuracy on task i right after learning "
         "it (argmax over every class seen so far).\n")
  san = sanity(results)
  if san["values"]:
    md += (f"\nSanity row: {san['metric']} >= {san['threshold']} on every dataset ("
           + ", ".join(f"{k} {v:.3f}" for k, v in san["values"].items())
           + f"): **{'holds' if san['holds'] else 'fails'}**.\n")
  md += "\nAccuracy matrices (row i: after task i; column j: task j):\n\n"
  for name, per in results.items():
    for method, res in per.items():
      acc = np.asarray(res["acc_matrix"])
      md += f"- {name} {method}: " + " / ".join(
          "[" + ", ".join(f"{acc[i, j]:.2f}" for j in range(i + 1)) + "]"
          for i in range(acc.shape[0])) + "\n"
  return md


def plot(results: dict, sweep: list[dict], s: dict, chance: dict):
  """Average accuracy after each task per method (a panel per dataset), then the sweeps."""
  kinds = [k for k in ("levels", "lowest") if any(r["sweep"] == k for r in sweep)]
  fig, axes = study.figure(len(results) + len(kinds), width=4.2, height=3.6)
  tasks = np.arange(1, s["n_tasks"] + 1)
  for ax, (name, per) in zip(axes, results.items()):
    for method, res in per.items():
      ax.plot(tasks, res["avg_acc"], marker="o", label=method)
    ax.plot(tasks, chance[name], "k:", label="chance")
    ax.set(title=name, xlabel="tasks learned", ylabel="average accuracy (seen classes)",
           xticks=tasks, ylim=(0, 1))
  axes[0].legend(fontsize=7)
  first = next(iter(results), "")
  panels = [(kind, key, label) for kind, key, label in (
      ("levels", "levels", "CMS levels"),
      ("lowest", "lowest_period", "lowest frequency (slowest period, tokens)")) if kind in kinds]
  for ax, (kind, key, label) in zip(axes[len(results):], panels):
    rows = [r for r in sweep if r["sweep"] == kind]
    x = [r[key] for r in rows]
    ax.plot(x, [r["avg_acc"][-1] for r in rows], marker="o", label="final average accuracy")
    ax.plot(x, [r["forgetting"] for r in rows], marker="s", label="forgetting")
    ax.set(title=f"Hope-attention on {first}", xlabel=label, ylim=(0, 1))
    if kind == "lowest" and x:
      ax.set_xscale("log", base=2)
    if x:
      ax.set_xticks(x, [str(v) for v in x])
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def parse_args(argv=None):
  parser = study.arg_parser(__doc__, STUDY, scales=tuple(PRESETS),
                            scale_help="tiny: ~10 min on 2 idle CPU cores; cpu: <= 90 min on 2 CPU "
                                       "cores (more examples and steps per task, no sweep); small:"
                                       " a GPU/TPU; paper: the paper's sizes")
  parser.add_argument("--datasets", default=",".join(DATASETS),
                      help=f"comma-separated subset of {','.join(DATASETS)} (the first one is "
                           "swept)")
  for flag in ("steps", "pretrain_steps", "n_train", "n_test", "classes_per_task", "n_tasks"):
    parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                        help=argparse.SUPPRESS)  # hidden: smoke tests and quick checks
  parser.add_argument("--methods", default=",".join(METHODS), help=argparse.SUPPRESS)
  for flag in ("levels", "lowest_periods", "main_periods"):  # comma-separated ints
    parser.add_argument("--" + flag.replace("_", "-"), default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  # "16,64" -> (16, 64); "" -> () (no sweep of that kind); None: the scale's.
  ints = lambda flag, text: None if text is None else tuple(
      study.parse_list(flag, text, convert=int, minimum=1, empty=True))
  s = study.scale_settings(
      PRESETS, args.scale, steps=args.steps, pretrain_steps=args.pretrain_steps,
      n_train=args.n_train, n_test=args.n_test, classes_per_task=args.classes_per_task,
      n_tasks=args.n_tasks, levels=ints("--levels", args.levels),
      lowest_periods=ints("--lowest-periods", args.lowest_periods),
      main_periods=ints("--main-periods", args.main_periods))
  names = study.parse_list("--datasets", args.datasets, known=DATASETS)
  methods = study.parse_list("--methods", args.methods, known=METHODS)
  datasets = {name: load_dataset(name, args.data, args.seed) for name in names}
  all_tasks = {name: make_tasks(data, s, args.seed) for name, data in datasets.items()}
  chance = {name: chance_levels(tasks) for name, tasks in all_tasks.items()}
  start = time.time()
  pretrained, pre = pretrain(s, args.seed)
  learners = {"transformer": Learner(pretrained, s["lr"]), "icl": Learner(pretrained, s["lr"]),
              "hope": Learner(hope_model(pretrained, s, s["main_periods"], args.seed), s["lr"],
                              s["outer_period"])}
  results = {}
  for name, tasks in all_tasks.items():
    results[name] = run_dataset(name, tasks, learners, pretrained, s, args.seed, methods)
    if len(results) < len(all_tasks):  # a run cut short keeps the datasets it finished
      done = {k: chance[k] for k in results}
      study.write_outputs(args.out, STUDY, {"settings": s, "chance": done, "results": results,
                                            "sanity": sanity(results), "partial": True},
                          table(results, [], s, done), plot(results, [], s, done),
                          command=study.command_line(STUDY, argv))
  first = names[0]
  sweep = run_sweep(all_tasks[first], results[first].get("Hope-attention"), pretrained, s,
                    args.seed)
  md = table(results, sweep, s, chance)
  print(md)
  out = {"settings": s, "pretrain": {"final_loss": pre.losses[-1] if pre.losses else None,
                                     "seconds": pre.seconds},
         "classes": {name: [dict(zip(t.classes, map(chr, t.tokens))) for t in tasks]
                     for name, tasks in all_tasks.items()},
         "chance": chance, "results": results, "sweep": sweep, "sanity": sanity(results),
         "seconds": time.time() - start}
  paths = study.write_outputs(args.out, STUDY, out, md, plot(results, sweep, s, chance),
                              command=study.command_line(STUDY, argv))
  return {"paths": paths, **out}


if __name__ == "__main__":
  main()
