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

``--scale cpu``: Zoology's Figure 2 protocol, sized for 90 minutes on 2 CPU cores (what differs
from Zoology is said here):

* Levels (T, P) = (64, 4), (128, 8), (256, 16) (T = 16 P; ``--pairs`` picks P), vocabulary 8192
  (keys 1 .. 4095, values 4096 .. 8191), one model per (family, width, level) as in Zoology.
* Data (``zoology_example``): the P pairs (distinct keys, distinct values), then the T - 2P
  remaining tokens as two-token slots; key i's query goes to slot g_i, drawn without replacement
  with p(g) ∝ (g + 1)^(a - 1), a = 0.01 (Zoology's power law: most queries come soon after the
  context); every other token is the pad 0 and the answer is never an input (Zoology's
  ``random_non_queries=False``). The loss and the accuracy count the P query positions only (the
  8192-wide head runs there only: ``query_logits``). Fresh examples every step, a pure function
  of (seed, index) (Zoology: 100,000 fixed training examples); validation (early stopping) and
  test (1000 sequences per level; Zoology 3000) come from seeds disjoint from training.
* Models: the nlx families at d_model 64 / 128, 2 layers, 2 heads, with their MLPs and RoPE
  (Zoology's attention: 1 head, learned positions, no MLP, dropout 0.1). The embedding's init
  std (``model.init_std``) is set per family (``CPU_FAMILY_MODEL``): 1.0 for Transformer++ (at
  nlx's default 0.02 the token's own embedding is ~2% of what the first block adds to the residual
  stream, and Transformer++ then fails to learn recall in this budget: docs/RESULTS.md, MQAR),
  nlx's default 0.02 for the others (Gated DeltaNet at (64, 4), lr 1e-2: 0.001 after 800 steps
  at 1.0; at 0.02 0.339 after 800 steps and 0.99 after about 1,200 of a 6,000-step run). The init
  is not swept; ``--model init_std=X`` sets it for every family of a command.
* Titans LMM's memory chunk is 4 (``CPU_FAMILY_MODEL``; nlx's tiny default is 16). A chunk takes
  its C gradients at its start state, so nlx bounds the inner rate by ``0.5 / C``
  (``model.titans_lr_max``), and at C = 16 a key seen once is written with at most 3% of its
  error: at (64, 4), lr 1e-2, Titans stays on the 1 / P plateau for 6000 steps at C = 16
  (validation 0.255), and at C = 4 with the C = 16 bound (0.251 after 1200), while C = 4 with
  its own bound reaches 0.978 (docs/RESULTS.md, MQAR). ``--model memory_chunk_size=16``
  measures the default.
* Training: AdamW (β2 0.95), weight decay 0.1, 10% warmup then cosine decay, batch 32, at most
  6000 steps (192,000 sequences; Zoology trains 64 epochs of 100,000 at batch 512 / 256, some 30×
  more); early stop once the validation accuracy (256 sequences, every 50 steps) reaches 0.99.
  Learning-rate sweep 1e-2, 3e-3, 3e-2 (Zoology: 1e-4 .. 1e-2, 4 values; 1e-3 and below learn
  nothing in 100 steps here), run in that order, each to the full 6000 steps; a rate that reaches
  0.99 ends the sweep (the later rates are not run). The table reports the run with the best
  validation accuracy, with its test accuracy. Why full runs: attention sits at the 1 / P plateau
  for some 3,000 steps and then rises to 0.99 within ~200 (docs/RESULTS.md, MQAR), so a short
  sweep cannot tell the rates apart; the previous preset (each rate 100 steps, the lowest loss
  continued to 800) chose 3e-2 at (64, 4), which was still at 0.23 after 6000 steps, where 1e-2
  reaches 0.97 and 3e-3 0.99 (validation; 0.989 test).
* Order and budget: Transformer++ then RetNet (the sanity rows) at d_model 64, then at 128;
  then Gated DeltaNet, Titans LMM, TTT-Linear and HOPE at 64, then at 128. Training stops after
  80 minutes (``--budget_minutes``); the table names the runs cut and the sweeps not run. On 2
  CPU cores Transformer++ at d_model 64 alone takes most of it (its three levels: about 12, 16
  and 32 minutes here), so the rows need one command each (``--families F --widths W --pairs
  P``); ``--combine DIR,...`` merges their outputs into the study's table, figure and sanity
  check (refusing commands whose protocol or a family's model fields differ). ``--curves
  DIR,...`` is for ablations, runs that differ in their ``--model`` fields: a table of them (the
  fields in which they differ) and their loss and validation curves on shared axes
  (``OUT/mqar_curves.{json,md,png}``).
* Resuming: each sweep saves its runs every 10 minutes (``--checkpoint_minutes``), when a run
  ends and when the budget cuts it, under ``OUT/checkpoints/<family>_d<width>_P<P>``
  (``experiments/resume.py``). Rerunning the same command continues every sweep from its newest
  save (the training data are a function of the seed and the step, so it takes the steps the
  first run would have taken) and reads the finished ones back without training, so a level
  that outlasts one sitting (HOPE's take hours here) is trained in several. A rerun with other
  settings for the same ``--out`` is refused, naming what differs.
* Sanity (Zoology's Figure 2): Transformer++ at >= 0.99 on every level and width, and a gated
  linear model's accuracy falling as P grows at a fixed width. That model is RetNet (linear
  attention with a fixed decay per head, the kind of recurrence Zoology shows losing recall at
  fixed state), not Gated DeltaNet: the delta rule overwrites the value of a key it has seen
  instead of adding to it, and its papers (Yang et al. 2024) report it more effective at
  associative recall than additive linear attention; here Gated DeltaNet at d_model 64 recalls
  0.985 at (64, 4) and 0.93 (validation) at (256, 16) (docs/RESULTS.md, MQAR), so it is one of
  the rows compared. The
  figure plots the best accuracy against state floats per layer, a panel per level, and the
  validation curves of those runs.

The tiny scale (2 CPU cores, about 8 minutes idle) trains 300 steps, some 4800 sequences per
model, orders of magnitude fewer than Zoology; at that scale the models are still learning (in the
development runs none got far past the 1 / P reference), and the numbers say how far they got, not
where they would end.

Commands (from the repository root)::

  python -m experiments.mqar --scale tiny                     # writes runs/mqar/mqar.{json,md,png}
  python -m experiments.mqar --scale cpu --out runs/mqar_cpu  # Zoology's protocol, <= 90 min
  python -m experiments.mqar --scale cpu --combine runs/a,runs/b --out runs/mqar_cpu_all
  python -m experiments.mqar --scale cpu --curves runs/a,runs/b --out runs/ablation
  python -m experiments.mqar --scale small --out runs/mqar_small   # GPU/TPU
  python -m experiments.mqar --scale tiny --families transformer,gated_deltanet --widths 32 \\
      --steps 30                                              # a quick look

``--data`` is accepted for uniformity with the other studies and unused (the data are generated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx
from experiments import resume
from experiments import study
from nlx.data import synthetic
from nlx.train import fitting

STUDY = "mqar"
FAMILIES = ("transformer", "gated_deltanet", "titans_lmm", "hope")  # cheapest first
LABELS = {"hope": "HOPE", "titans_lmm": "Titans (LMM)", "gated_deltanet": "Gated DeltaNet",
          "transformer": "Transformer++", "retnet": "RetNet", "ttt_linear": "TTT-Linear",
          "ttt_mlp": "TTT-MLP"}
# The MLP width / d_model of each family's configs/<family>.py:tiny (d_model 64).
MLP_RATIO = {"hope": 1.0}
DEFAULT_MLP_RATIO = 3.0

CPU_STEPS = 6000  # the most steps of one --scale cpu run (early stop at 0.99 ends most sooner)
CPU_SWEEP_STEPS = None  # None: every rate runs to CPU_STEPS, in order, until one reaches 0.99
CPU_LRS = (1e-2, 3e-3, 3e-2)  # the sweep, in the order run (one that stops early ends it)
CPU_BUDGET_MINUTES = 80  # training stops here (the table names the runs cut and not run)
CPU_CHECKPOINT_MINUTES = 10  # a sweep saves its runs this often (a rerun continues from there)
# What a sweep's checkpoint keeps of each run beside its arrays (``sweep_level``).
PROGRESS_KEYS = ("losses", "finite", "curve", "seconds", "stopped")
# ModelConfig fields the cpu preset sets per family (see the docstring): the embedding's init
# std of Transformer++ (others: nlx's default 0.02) and Titans' memory chunk, whose inner-rate
# bound ``0.5 / memory_chunk_size`` otherwise keeps a key seen once from being bound.
CPU_FAMILY_MODEL = {"transformer": {"init_std": 1.0}, "titans_lmm": {"memory_chunk_size": 4}}
CPU_FAMILIES = ("transformer", "retnet", "gated_deltanet", "titans_lmm", "ttt_linear", "hope")
FALLING_FAMILY = "retnet"  # the gated linear model of the sanity row (see the docstring)
SANITY_FAMILIES = ("transformer", FALLING_FAMILY)

# pairs: P of each level (its sequence is 4 P tokens); batch_size: training sequences per step
# (each 4 max(P) tokens, levels mixed); eval_sequences: test sequences per level.
PRESETS = {
    "tiny": dict(widths=(32, 64), pairs=(4, 8, 16), vocab_size=64, steps=300, lr=1e-2,
                 batch_size=16, eval_sequences=256, n_layers=2, n_heads=2),
    # Zoology's Figure 2 protocol (one model per level, queries spread with power-law gaps over
    # T = 16 P tokens, vocabulary 8192, an LR sweep, early stop), sized for 90 minutes on 2 cores.
    "cpu": dict(widths=(64, 128), pairs=(4, 8, 16), vocab_size=8192, steps=CPU_STEPS, lr=None,
                lrs=CPU_LRS, sweep_steps=CPU_SWEEP_STEPS, batch_size=32, eval_sequences=1000,
                n_layers=2, n_heads=2,
                layout="zoology", power_a=0.01, weight_decay=0.1, early_stop=0.99,
                eval_every=50, val_sequences=256,
                family_model={f: dict(v) for f, v in CPU_FAMILY_MODEL.items()},
                budget_minutes=CPU_BUDGET_MINUTES, checkpoint_minutes=CPU_CHECKPOINT_MINUTES),
    "small": dict(widths=(64, 128, 256), pairs=(8, 16, 32, 64), vocab_size=512, steps=6000,
                  lr=3e-3, batch_size=64, eval_sequences=2048, n_layers=2, n_heads=2),
    "paper": dict(widths=(64, 128, 256, 512), pairs=(16, 32, 64, 128), vocab_size=8192,
                  steps=20000, lr=1e-3, batch_size=128, eval_sequences=4096, n_layers=2,
                  n_heads=2),
}
TEST_SEED_OFFSET = 1_000_003  # test data: seed + offset (disjoint from every training seed)
VAL_SEED_OFFSET = 2_000_003  # early-stopping data of --scale cpu: seed + offset


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
# Zoology's layout (--scale cpu): queries spread over the rest of the sequence
# ---------------------------------------------------------------------------------------------

ZOOLOGY_TOKENS_PER_PAIR = 16  # Figure 2's levels: (T, P) = (64, 4), (128, 8), (256, 16)


class QueryBatch(NamedTuple):
  """``inputs [B, T]``; ``positions [B, P]``: the query positions of each row; ``answers [B, P]``:
  the value each query must predict there (the next token at a query is its answer)."""

  inputs: np.ndarray
  positions: np.ndarray
  answers: np.ndarray


def gap_probabilities(slots: int, power_a: float) -> np.ndarray:
  """``p[g] ∝ (g + 1) ** (power_a - 1)``, g = 0 .. slots - 1: the power law of Zoology's query
  placement (``power_a`` 0.01: near ``1 / (g + 1)``, most queries close to the context's end)."""
  p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
  return p / p.sum()


def zoology_example(seed: int, index: int, *, num_pairs: int, seq_len: int, vocab_size: int,
                    power_a: float = 0.01) -> dict:
  """One MQAR example in Zoology's layout, a pure function of ``(seed, index)``.

  The context holds ``P`` pairs ``k_1 v_1 .. k_P v_P`` (distinct keys, distinct values; the
  vocabulary ranges of ``nlx.data.synthetic.mqar_vocab``). The remaining ``T - 2P`` tokens are
  ``(T - 2P) / 2`` two-token slots; key ``i``'s query goes to slot ``g_i`` (token ``2P + 2 g_i``),
  the ``g_i`` drawn one after the other without replacement from ``gap_probabilities``. Every
  other token is the pad 0 (Zoology's ``random_non_queries=False``); the answer is never an
  input. ``targets`` holds the paired value at each query and 0 elsewhere; ``mask`` marks the
  queries.

  Returns:
    ``{"tokens", "targets": int32 [T], "mask": bool [T], "slots": int [P]}``.
  """
  synthetic.check_mqar_args(num_pairs=num_pairs, seq_len=seq_len, vocab_size=vocab_size,
                            num_queries=num_pairs)
  if seq_len % 2:
    raise ValueError(f"seq_len must be even (two-token query slots); got {seq_len}")
  vocab = synthetic.mqar_vocab(vocab_size)
  if vocab.num_values < num_pairs:
    raise ValueError(f"vocab_size {vocab_size} holds {vocab.num_values} values; need "
                     f"num_pairs = {num_pairs} distinct ones")
  rng = np.random.default_rng([seed, index])
  keys = vocab.key_lo + rng.choice(vocab.num_keys, size=num_pairs, replace=False)
  values = vocab.value_lo + rng.choice(vocab.num_values, size=num_pairs, replace=False)
  context, slots = 2 * num_pairs, (seq_len - 2 * num_pairs) // 2
  gaps = rng.choice(slots, size=num_pairs, replace=False, p=gap_probabilities(slots, power_a))
  tokens = np.full(seq_len, synthetic.PAD, np.int32)
  targets = np.zeros(seq_len, np.int32)
  mask = np.zeros(seq_len, bool)
  tokens[0:context:2], tokens[1:context:2] = keys, values
  where = context + 2 * gaps
  tokens[where], targets[where], mask[where] = keys, values, True
  return {"tokens": tokens, "targets": targets, "mask": mask, "slots": gaps}


def zoology_rows(seed: int, indices, *, num_pairs: int, seq_len: int, vocab_size: int,
                 power_a: float) -> QueryBatch:
  """Examples ``indices`` of one level as a ``QueryBatch`` (positions in increasing order)."""
  rows = [zoology_example(seed, int(i), num_pairs=num_pairs, seq_len=seq_len,
                          vocab_size=vocab_size, power_a=power_a) for i in indices]
  positions = np.stack([np.flatnonzero(r["mask"]) for r in rows]).astype(np.int32)
  answers = np.stack([r["targets"][pos] for r, pos in zip(rows, positions)]).astype(np.int32)
  return QueryBatch(np.stack([r["tokens"] for r in rows]), positions, answers)


def query_logits(model, inputs, positions):
  """``[B, P, vocab]``: the logits at the query ``positions`` only (the head, 8192 wide, runs on
  P of the T positions; the same numbers as ``model(inputs)`` there)."""
  if getattr(model, "cms_next_token", False):  # the chunked CMS path has its own call
    logits = model(inputs)
    return jnp.take_along_axis(logits, positions[..., None], axis=1)
  x, _ = model._run_layers(model.embed(inputs))  # pylint: disable=protected-access
  x = jnp.take_along_axis(x, positions[..., None], axis=1)
  return model._logits(x)  # pylint: disable=protected-access


def query_loss(model, batch: QueryBatch):
  """Mean cross-entropy of the answers at the queries."""
  logits = query_logits(model, batch.inputs, batch.positions).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch.answers).mean()


_QUERY_PREDICT: dict = {}


def query_accuracy(model, batches) -> float:
  """The fraction of queries whose greedy prediction is their answer."""
  graphdef, state = nnx.split(model)
  fn = _QUERY_PREDICT.get(graphdef)
  if fn is None:
    fn = _QUERY_PREDICT[graphdef] = jax.jit(
        lambda s, x, p: jnp.argmax(query_logits(nnx.merge(graphdef, s), x, p), -1))
  right = total = 0
  for b in batches:
    right += int((np.asarray(fn(state, jnp.asarray(b.inputs), jnp.asarray(b.positions)))
                  == b.answers).sum())
    total += b.answers.size
  return right / max(total, 1)


def zoology_batches(seed: int, level: dict, settings: dict, sequences: int, rows: int = 100
                    ) -> list:
  """``sequences`` examples of ``level`` from ``seed`` (indices 0 ..), in batches of ``rows``."""
  kw = dict(num_pairs=level["pairs"], seq_len=level["seq_len"],
            vocab_size=settings["vocab_size"], power_a=settings["power_a"])
  return [zoology_rows(seed, range(s, min(s + rows, sequences)), **kw)
          for s in range(0, sequences, rows)]


_SWEEP_TX: dict = {}


def sweep_optimizer(steps: int, weight_decay: float) -> optax.GradientTransformation:
  """``study.optimizer`` (AdamW β2 0.95, 10% warmup, cosine to peak/10, decay on matrices,
  clipping at 1) with the peak learning rate in the optimizer state (``with_lr``), so that the
  runs of a sweep share one compiled step. One object per ``(steps, weight_decay)``."""
  key = (steps, weight_decay)
  if key not in _SWEEP_TX:
    warmup = max(steps // 10, 1)
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(steps, warmup + 1), 0.1)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    _SWEEP_TX[key] = optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.95),
        optax.add_decayed_weights(weight_decay, decay_mask), optax.scale_by_schedule(unit),
        optax.inject_hyperparams(optax.scale)(step_size=-1.0))
  return _SWEEP_TX[key]


def with_lr(opt_state, lr: float):
  """``sweep_optimizer``'s state with the peak learning rate ``lr``."""
  *head, last = opt_state
  hyper = dict(last.hyperparams, step_size=jnp.asarray(-lr, jnp.float32))
  return type(opt_state)((*head, last._replace(hyperparams=hyper)))


def run_config(settings: dict, run: dict):
  """The ``ModelConfig`` a saved run (``family``, ``d_model``, ``pairs``, ``seq_len``) trained
  with ``settings`` (its command's)."""
  return config(run["family"], run["d_model"], dict(settings, pairs=(run["pairs"],)),
                max_seq_len=run["seq_len"])


def sweep_fingerprint(family: str, width: int, level: dict, settings: dict, seed: int,
                      cfg) -> dict:
  """Everything that decides the training and test of one sweep (``resume.SweepCheckpoint``)."""
  keys = ("steps", "sweep_steps", "lrs", "batch_size", "weight_decay", "eval_every",
          "val_sequences", "early_stop", "eval_sequences", "vocab_size", "power_a")
  return {"family": family, "d_model": width, "pairs": level["pairs"],
          "seq_len": level["seq_len"], "seed": seed, **{k: settings.get(k) for k in keys},
          "model": resume.model_fingerprint(cfg)}


def sweep_level(family: str, width: int, level: dict, settings: dict, seed: int,
                deadline: Optional[float] = None, checkpoint_dir: Optional[str] = None) -> list:
  """The learning-rate sweep of one (family, width, level): one model per rate of
  ``settings["lrs"]`` (same initialization), trained with nlx's train step and the studies'
  AdamW (warmup, cosine decay over ``steps``). The rates run in order, each ``sweep_steps`` steps
  (None: ``steps``); unless one stopped early, the one with the lowest loss over its last
  ``eval_every`` steps then continues to ``steps``. Every
  ``eval_every`` steps the accuracy on ``val_sequences`` held-out sequences is
  measured, and a run that reaches ``early_stop`` stops (it ends the sweep). Returns a run dict
  per rate, the test accuracy on ``eval_sequences`` sequences in each. Past ``deadline`` (a
  ``time.time()``) training stops at the next evaluation; the run says so (``cut_by_budget``).

  ``checkpoint_dir``: the sweep saves its runs there (``resume.SweepCheckpoint``) every
  ``settings["checkpoint_minutes"]`` (0: every evaluation), when a run ends and when it is cut,
  and continues from the newest save when called again; a sweep finished there returns its
  saved results and trains nothing."""
  cfg = config(family, width, dict(settings, pairs=(level["pairs"],)),
               max_seq_len=level["seq_len"])
  saver = None
  if checkpoint_dir is not None:
    saver = resume.SweepCheckpoint(
        checkpoint_dir, sweep_fingerprint(family, width, level, settings, seed, cfg),
        every_seconds=60 * (CPU_CHECKPOINT_MINUTES if settings.get("checkpoint_minutes") is None
                            else settings["checkpoint_minutes"]))
    finished = saver.finished()
    if finished is not None:
      print(f"{family} d={width} P={level['pairs']}: finished earlier ({checkpoint_dir})",
            flush=True)
      return finished
  steps, every = settings["steps"], settings["eval_every"]
  tx = sweep_optimizer(steps, settings["weight_decay"])
  kw = dict(num_pairs=level["pairs"], seq_len=level["seq_len"],
            vocab_size=settings["vocab_size"], power_a=settings["power_a"])
  batch_size = settings["batch_size"]
  val = zoology_batches(seed + VAL_SEED_OFFSET, level, settings, settings["val_sequences"])
  graphdef = step_fn = None
  runs = []
  for lr in settings["lrs"]:
    model = nlx.build_model(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step_fn = step_fn or fitting.compiled_step(graphdef, tx, query_loss)  # one compile a sweep
    runs.append({"lr": lr, "params": params, "rest": rest,
                 "opt_state": with_lr(tx.init(params), lr), "losses": [], "finite": [],
                 "curve": [], "seconds": 0.0, "stopped": None, "cut": False})

  if saver is not None:
    restored = saver.restore([{"params": r["params"], "opt_state": r["opt_state"]}
                              for r in runs])
    if restored is not None:
      for run, arrays, progress in zip(runs, *restored):
        run.update(arrays, **{k: progress[k] for k in PROGRESS_KEYS})
      print(f"{family} d={width} P={level['pairs']}: resuming from "
            + ", ".join(f"lr={r['lr']:g} step {len(r['losses'])}" for r in runs), flush=True)

  def save(force: bool = False):
    if saver is not None:
      saver.maybe_save([{"params": r["params"], "opt_state": r["opt_state"]} for r in runs],
                       lambda: [dict({k: r[k] for k in PROGRESS_KEYS},
                                     losses=[float(x) for x in jax.device_get(r["losses"])],
                                     finite=[bool(x) for x in jax.device_get(r["finite"])])
                                for r in runs], force=force)

  def advance(run, until):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    tic = time.time()

    def tick():  # the run's training seconds, up to now
      nonlocal tic
      run["seconds"] += time.time() - tic
      tic = time.time()

    bar = tqdm(range(len(run["losses"]), until), desc=f"{family} d={width} P={level['pairs']} "
               f"lr={run['lr']:g}", unit="step", dynamic_ncols=True, leave=False)
    for step in bar:
      batch = zoology_rows(seed, range(step * batch_size, (step + 1) * batch_size), **kw)
      up = step_fn(run["params"], run["rest"], run["opt_state"],
                   jax.tree.map(jnp.asarray, batch))
      run["params"], run["opt_state"] = up.params, up.opt_state
      run["losses"].append(up.loss)
      run["finite"].append(up.finite)
      if (step + 1) % every == 0 or step == steps - 1:
        acc = query_accuracy(nnx.merge(graphdef, run["params"], run["rest"]), val)
        loss = float(np.mean(jax.device_get(run["losses"][-every:])))
        tick()
        run["curve"].append({"step": step + 1, "loss": loss, "val_accuracy": acc,
                             "seconds": run["seconds"]})
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.3f}")
        if acc >= settings["early_stop"]:
          run["stopped"] = step + 1
          break
        if deadline is not None and time.time() > deadline:
          run["cut"] = True
          break
        save()
    bar.close()
    tick()
    save(force=True)

  first = min(settings.get("sweep_steps") or steps, steps)
  for run in runs:
    advance(run, first)
    if run["stopped"]:
      break
  if not any(r["stopped"] for r in runs):
    # The loss of the last eval_every steps: on examples the model had not seen before each step
    # (fresh data), so a held-out loss; it ranks rates that are all still near 0 accuracy.
    advance(min(runs, key=lambda r: r["curve"][-1]["loss"]), steps)
  test = zoology_batches(seed + TEST_SEED_OFFSET, level, settings, settings["eval_sequences"])
  out = []
  for run in runs:
    if not run["losses"]:
      continue  # a rate after one that stopped early
    model = nnx.merge(graphdef, run["params"], run["rest"])
    losses = [float(x) for x in jax.device_get(run["losses"])]
    out.append({
        "family": family, "d_model": width, "pairs": level["pairs"],
        "seq_len": level["seq_len"], "lr": run["lr"], "params": fitting.param_count(run["params"]),
        "steps": len(losses), "early_stopped_at": run["stopped"],
        "train_seconds": run["seconds"], "accuracy": query_accuracy(model, test),
        "final_loss": float(np.mean(losses[-10:])),
        "skipped_steps": int(len(losses) - np.sum(jax.device_get(run["finite"]))),
        "diverged_at_step": next((i for i, x in enumerate(losses) if not np.isfinite(x)), None),
        "state_floats_per_layer": state_floats_per_layer(model, level["seq_len"]),
        "cut_by_budget": run["cut"], "curve": run["curve"]})
  if saver is not None and not any(r["cut_by_budget"] for r in out):
    saver.finish(out)
  return out


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


def config(family: str, width: int, settings: dict, max_seq_len: Optional[int] = None):
  """The ``ModelConfig`` of ``family`` at ``d_model = width`` (2 layers, 2 heads; a CMS's periods
  ``study.cms_periods_within`` the training length ``max_seq_len``)."""
  ratio = MLP_RATIO.get(family, DEFAULT_MLP_RATIO)
  length = max_seq_len or level_length(max(settings["pairs"]))
  fields = dict(vocab_size=settings["vocab_size"], d_model=width, n_layers=settings["n_layers"],
                n_heads=settings["n_heads"], mlp_dim=max(8, int(ratio * width)),
                max_seq_len=length)
  if nlx.nn.registry.get(family).mlp is not None:  # every CMS level updates in training
    fields["cms_periods"] = study.cms_periods_within(length)
  fields.update(settings.get("family_model", {}).get(family, {}))  # the preset's, per family
  fields.update(settings.get("model", {}))  # --model: every family
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


def main(argv=None) -> dict:
  parser = study.arg_parser(__doc__, STUDY, scales=tuple(PRESETS),
                            scale_help="tiny: ~15 min on 2 CPU cores (levels packed, T = 4P); cpu: "
                                       "Zoology's protocol, <= 90 min on 2 cores; small, paper: "
                                       "GPU/TPU")
  parser.add_argument("--families", default=None,
                      help="comma-separated families (configs/<family>.py); default: "
                           f"{','.join(FAMILIES)} (tiny, small, paper), "
                           f"{','.join(CPU_FAMILIES)} (cpu)")
  parser.add_argument("--widths", default=None, help="comma-separated d_model values")
  parser.add_argument("--pairs", default=None, help="comma-separated P of the levels")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model")
  parser.add_argument("--eval_sequences", type=int, default=None,
                      help="test sequences per level")
  parser.add_argument("--batch_size", type=int, default=None, help="training sequences per step")
  parser.add_argument("--lr", type=float, default=None,
                      help="peak AdamW learning rate (cpu: the sweep's only value)")
  parser.add_argument("--lrs", default=None,
                      help="cpu: comma-separated learning rates of the sweep, in the order run")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="vocabulary (pad, then disjoint key and value ranges)")
  parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                      help="a ModelConfig field of every model, e.g. conv_size=0 (repeatable)")
  parser.add_argument("--budget_minutes", type=float, default=None,
                      help=f"cpu: training stops after this many minutes (default "
                           f"{CPU_BUDGET_MINUTES}; 0: no budget)")
  parser.add_argument("--combine", default=None, metavar="DIR,DIR,...",
                      help="cpu: train nothing; merge the runs of earlier --scale cpu commands "
                           "(their OUT directories) into one table, figure and sanity check")
  parser.add_argument("--curves", default=None, metavar="DIR,DIR,...",
                      help="cpu: train nothing; overlay the loss and validation curves of "
                           "earlier runs that differ in their --model fields (an ablation)")
  resume.add_flag(parser, CPU_CHECKPOINT_MINUTES, "evaluation", "cpu: each sweep")
  args = parser.parse_args(argv)
  if args.budget_minutes is not None and args.budget_minutes < 0:
    raise ValueError(f"--budget_minutes must be >= 0 (0: no budget); got {args.budget_minutes}")
  default_families = CPU_FAMILIES if args.scale == "cpu" else FAMILIES
  families = check_families(study.parse_list("--families", args.families)
                            if args.families is not None else default_families)
  ints = lambda flag, value: value and tuple(study.parse_list(flag, value, convert=int,
                                                              minimum=1))
  settings = study.scale_settings(
      PRESETS, args.scale, steps=args.steps, eval_sequences=args.eval_sequences,
      batch_size=args.batch_size, lr=args.lr, vocab_size=args.vocab_size,
      widths=ints("--widths", args.widths), pairs=ints("--pairs", args.pairs))
  settings["model"] = {**settings.get("model", {}),
                       **study.parse_fields("--model", args.model)}
  resume.apply_flag(args, settings)
  if args.curves is not None:
    return write_curves(args.out, study.parse_list("--curves", args.curves), argv)
  if args.combine is not None:
    if settings.get("layout") != "zoology":
      raise ValueError(f"--combine merges --scale cpu runs; got --scale {args.scale}")
    merged, runs, seconds = combine_runs(study.parse_list("--combine", args.combine),
                                         settings["pairs"], settings["widths"])
    return write_zoology(args, merged, runs, seconds, True, argv)
  if settings.get("layout") == "zoology":
    lrs = (args.lr,) if args.lr is not None else tuple(
        study.parse_list("--lrs", args.lrs, convert=float, default=list(settings["lrs"])))
    settings["lrs"] = lrs
    if args.budget_minutes is not None:
      settings["budget_minutes"] = args.budget_minutes or None
    return main_zoology(args, argv, families, settings)
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


# ---------------------------------------------------------------------------------------------
# --scale cpu: the sweep, its table and figure
# ---------------------------------------------------------------------------------------------

def zoology_levels(settings: dict) -> list:
  """``[{"pairs": P, "seq_len": 16 P}]`` of ``settings["pairs"]``."""
  return [{"pairs": p, "seq_len": ZOOLOGY_TOKENS_PER_PAIR * p} for p in settings["pairs"]]


def best_runs(runs: list) -> dict:
  """``{(family, d_model, pairs): run}``: the run the sweep chose for each level. A rate that
  reached the early-stop accuracy wins; otherwise the rate that was continued to the full
  ``steps`` (chosen by its held-out loss after the sweep's first steps), so a short sweep run
  whose last validation accuracy is higher by noise is never reported as the level's result.
  Among equals, the best last validation accuracy, then the lowest loss."""
  best = {}
  for r in runs:
    key = (r["family"], r["d_model"], r["pairs"])
    last = r["curve"][-1] if r["curve"] else {"val_accuracy": -1.0, "loss": 0.0}
    score = (r["early_stopped_at"] is not None, r["steps"], last["val_accuracy"], -last["loss"])
    if key not in best or score > best[key][0]:
      best[key] = (score, r)
  return {k: v[1] for k, v in best.items()}


def sanity(runs: list, pairs: tuple, widths: tuple, threshold: float) -> dict:
  """The two checks Zoology's Figure 2 makes of its baselines, on the best run of each sweep:
  Transformer++ at ``threshold`` or above at every level and width, and the gated linear
  model's (``FALLING_FAMILY``'s) accuracy not rising with P at each width where every level
  ran (``gated_linear_widths``), and falling from the first level to the last. None where runs
  are missing (or only one level ran: nothing can fall)."""
  best = best_runs(runs)
  def accs(family, width):
    got = [best.get((family, width, p)) for p in pairs]
    return None if any(r is None for r in got) else [r["accuracy"] for r in got]
  out = {}
  t = [accs("transformer", w) for w in widths]
  out["transformer_solves_every_level"] = (None if any(a is None for a in t) else
                                           all(x >= threshold for a in t for x in a))
  g = [(w, accs(FALLING_FAMILY, w)) for w in widths]
  g = [(w, a) for w, a in g if a is not None]  # the widths where every level ran
  out["gated_linear_falls_with_pairs"] = (
      None if len(pairs) < 2 or not g else  # a fall needs two levels
      all(all(a[i + 1] <= a[i] + 0.01 for i in range(len(a) - 1)) and a[-1] < a[0] - 0.01
          for _, a in g))
  out["gated_linear_widths"] = [w for w, _ in g]
  return out


def sanity_line(checks: dict, threshold: float) -> str:
  """The sanity checks of ``sanity`` in words: holds, does not hold, or not tested (a sweep it
  needs did not run)."""
  verdict = lambda ok: ("not tested (runs missing)" if ok is None else
                        "holds" if ok else "does not hold")
  fall = verdict(checks["gated_linear_falls_with_pairs"])
  if checks.get("gated_linear_widths"):
    fall += " (d_model %s)" % ", ".join(map(str, checks["gated_linear_widths"]))
  return ("\nSanity (Zoology's Figure 2): Transformer++ >= %g at every level: %s; %s's "
          "accuracy falling as P grows at fixed width: %s\n"
          % (threshold, verdict(checks["transformer_solves_every_level"]),
             LABELS[FALLING_FAMILY], fall))


def zoology_table(runs: list, settings: dict) -> str:
  """One row per (family, width): the best accuracy of each level, its learning rate and steps,
  and the state floats per layer; then every run of the sweeps."""
  pairs, best = tuple(settings["pairs"]), best_runs(runs)
  keys = list(dict.fromkeys((r["family"], r["d_model"]) for r in runs))
  lengths = "/".join(str(ZOOLOGY_TOKENS_PER_PAIR * p) for p in pairs)
  cols = (["model", "d_model", f"state floats/layer (T={lengths})"] +
          [f"acc P={p} T={ZOOLOGY_TOKENS_PER_PAIR * p} (lr, steps)" for p in pairs])
  rows = []
  for family, width in keys:
    cells = []
    states = []
    for p in pairs:
      r = best.get((family, width, p))
      states.append("-" if r is None else str(r["state_floats_per_layer"]))
      cells.append("not run" if r is None else
                   f"{r['accuracy']:.3f} ({r['lr']:g}, {r['steps']}"
                   + ("" if r["early_stopped_at"] is None else ", stopped")
                   + (", cut by the time budget" if r.get("cut_by_budget") else "")
                   + (", diverged" if r["diverged_at_step"] is not None else "") + ")")
    rows.append([LABELS.get(family, family), width, "/".join(states)] + cells)
  md = study.markdown_table(cols, rows)
  cols = ["model", "d_model", "P", "T", "lr", "steps", "early stop", "val acc (last)",
          "test acc", "final loss", "train s"]
  rows = [[LABELS.get(r["family"], r["family"]), r["d_model"], r["pairs"], r["seq_len"],
           f"{r['lr']:g}", r["steps"], r["early_stopped_at"] or "",
           r["curve"][-1]["val_accuracy"] if r["curve"] else "", r["accuracy"],
           final_loss_cell(r), round(r["train_seconds"])] for r in runs]
  return md + "\nEvery run of the sweeps:\n\n" + study.markdown_table(cols, rows)


def zoology_plot(runs: list, settings: dict):
  """Top: best accuracy against state floats per layer (log), a panel per level, a line per
  family through its widths. Bottom: the validation curves of those best runs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pairs, best = tuple(settings["pairs"]), best_runs(runs)
  fig, axes = plt.subplots(2, len(pairs), figsize=(4.2 * len(pairs), 7.0), squeeze=False)
  families = list(dict.fromkeys(r["family"] for r in runs))
  for col, p in enumerate(pairs):
    top, bottom = axes[0][col], axes[1][col]
    for i, family in enumerate(families):
      mine = sorted((r for k, r in best.items() if k[0] == family and k[2] == p),
                    key=lambda r: r["d_model"])
      if not mine:
        continue
      color = f"C{i}"
      top.plot([r["state_floats_per_layer"] for r in mine], [r["accuracy"] for r in mine],
               marker="o", color=color, label=LABELS.get(family, family))
      for r in mine:
        top.annotate(str(r["d_model"]), (r["state_floats_per_layer"], r["accuracy"]),
                     fontsize=7)
        bottom.plot([c["step"] for c in r["curve"]], [c["val_accuracy"] for c in r["curve"]],
                    color=color, linestyle="-" if r["d_model"] == min(settings["widths"])
                    else "--", label=f"{LABELS.get(family, family)} d={r['d_model']}")
    for ax in (top, bottom):
      ax.axhline(1 / p, color="gray", linestyle=":")
      ax.set_ylim(0, 1.02)
    top.set_xscale("log")
    top.set_title(f"P={p} pairs, T={ZOOLOGY_TOKENS_PER_PAIR * p}")
    top.set_xlabel("state floats per layer")
    bottom.set_xlabel("training step (batch %d)" % settings["batch_size"])
  axes[0][0].set_ylabel("MQAR test accuracy (best lr)")
  axes[1][0].set_ylabel("validation accuracy")
  for row, size in ((axes[0], 7), (axes[1], 6)):  # one legend per row, of every panel's lines
    labelled = {}
    for ax in row:
      for handle, label in zip(*ax.get_legend_handles_labels()):
        labelled.setdefault(label, handle)
    if labelled:
      row[-1].legend(list(labelled.values()), list(labelled), fontsize=size)
  fig.tight_layout()
  return fig


def sweep_order(families: tuple, widths: tuple) -> list:
  """``[(family, width)]`` in the order run: the sanity families (Transformer++, RetNet)
  width by width first, then the others width by width (the narrowest first), so that a run cut
  short by the time budget has as many sanity rows as it could."""
  first = [(f, w) for w in widths for f in families if f in SANITY_FAMILIES]
  return first + [(f, w) for w in widths for f in families if f not in SANITY_FAMILIES]


def main_zoology(args, argv, families: tuple, settings: dict) -> dict:
  """``--scale cpu``: for each family, width and level (in that order) a learning-rate sweep
  (``sweep_level``). Writes the outputs after every sweep."""
  levels = zoology_levels(settings)
  for level in levels:  # fails early, naming the field, if a level does not fit
    zoology_example(0, 0, num_pairs=level["pairs"], seq_len=level["seq_len"],
                    vocab_size=settings["vocab_size"], power_a=settings["power_a"])
  start, runs = time.time(), []
  order = sweep_order(families, tuple(settings["widths"]))
  total, done, budget = len(order) * len(levels), 0, settings.get("budget_minutes")
  settings["skipped_for_time"] = []
  for family, width in order:
    for level in levels:
      if budget and time.time() - start > 60 * budget:
        settings["skipped_for_time"].append([family, width, level["pairs"]])
        continue
      deadline = start + 60 * budget if budget else None
      checkpoints = (None if settings.get("checkpoint_minutes") is None else os.path.join(
          args.out, "checkpoints", f"{family}_d{width}_P{level['pairs']}"))
      for run in sweep_level(family, width, level, settings, args.seed, deadline, checkpoints):
        runs.append(run)
        print(f"{family} d={width} P={level['pairs']} T={level['seq_len']} lr={run['lr']:g}: "
              f"test acc {run['accuracy']:.3f} after {run['steps']} steps "
              f"({run['train_seconds']:.0f} s; {time.time() - start:.0f} s so far)", flush=True)
      done += 1
      write_zoology(args, settings, runs, time.time() - start, False, argv)
  return write_zoology(args, settings, runs, time.time() - start, done == total, argv)


# Settings every run of a combined table shares (``combine_runs``).
PROTOCOL_KEYS = ("layout", "vocab_size", "power_a", "batch_size", "steps", "weight_decay",
                 "eval_every", "val_sequences", "eval_sequences", "early_stop", "n_layers",
                 "n_heads")


def read_saved(flag: str, directory: str) -> dict:
  """The ``mqar.json`` of an output directory (a ValueError naming ``flag`` if it has none)."""
  path = os.path.join(directory, f"{STUDY}.json")
  if not os.path.exists(path):
    raise ValueError(f"{flag}: {directory} holds no {STUDY}.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def command_fields(settings: dict, family: str) -> dict:
  """The ModelConfig fields a run's command set for ``family`` (the preset's, then --model)."""
  return {**settings.get("family_model", {}).get(family, {}), **settings.get("model", {})}


def combine_runs(directories, pairs, widths) -> tuple[dict, list, float]:
  """``(settings, runs, seconds)`` of the ``mqar.json`` of each ``--scale cpu`` output directory:
  the runs of all, the first's settings with the levels ``pairs`` and widths ``widths`` of the
  grid the table and the sanity check read (``--pairs``, ``--widths``: the preset's by
  default, so a level or width no command ran is "not run"), the summed wall time. Each run
  gets ``model_fields``, the ModelConfig fields its command set for its family. A directory
  without ``mqar.json``, or whose protocol (``PROTOCOL_KEYS``) or a family's model
  fields differ from another's, is a ValueError naming it."""
  settings, runs, seconds, fields = None, [], 0.0, {}
  for directory in directories:
    saved = read_saved("--combine", directory)
    mine = saved["settings"]
    if settings is None:
      settings = dict(mine, pairs=[], widths=[], skipped_for_time=[])
    for key in PROTOCOL_KEYS:
      if mine.get(key) != settings.get(key):
        raise ValueError(f"--combine: {directory} ran with {key}={mine.get(key)!r}, "
                         f"{directories[0]} with {settings.get(key)!r}")
    for run in saved["runs"]:
      family = run["family"]
      model = command_fields(mine, family)
      if fields.setdefault(family, (model, directory))[0] != model:
        raise ValueError(f"--combine: {LABELS.get(family, family)} ran with model fields "
                         f"{model} in {directory} and {fields[family][0]} in "
                         f"{fields[family][1]}")
      runs.append(dict(run, model_fields=model, source=directory))
    settings["skipped_for_time"] += mine.get("skipped_for_time") or []
    seconds += saved.get("wall_seconds", 0.0)
  settings["pairs"], settings["widths"] = list(pairs), list(widths)
  settings["combined_from"] = list(directories)
  return settings, runs, seconds


def curve_runs(directories) -> list:
  """Every run of each ``--scale cpu`` output directory's ``mqar.json``, with ``config`` (the
  ModelConfig it trained), ``model_fields`` (its values of every field some run's command set),
  ``seed`` and ``source``; the label of each names its family, width, level, seed, and the
  learning rate and fields in which the runs of its family differ."""
  runs = []
  for directory in directories:
    saved = read_saved("--curves", directory)
    mine = saved["settings"]
    if mine.get("layout") != "zoology":
      raise ValueError(f"--curves: {directory} is not a --scale cpu run")
    for run in saved["runs"]:
      model = command_fields(mine, run["family"])
      runs.append(dict(run, model_fields=model, config=dataclasses.asdict(run_config(mine, run)),
                       seed=saved.get("seed", 0), source=directory))
  keys = sorted({k for r in runs for k in r["model_fields"]})
  for r in runs:  # a field a command did not set: the value the study gave it
    r["model_fields"] = {k: r["config"][k] for k in keys}
  for r in runs:  # the fields in which runs of its family differ (not another family's fields)
    same = [s for s in runs if s["family"] == r["family"]]
    differ = [k for k in keys if len({repr(s["model_fields"][k]) for s in same}) > 1]
    fields = ", ".join(f"{k}={r['model_fields'][k]}" for k in differ)
    lr = f" lr {r['lr']:g}" if len({s["lr"] for s in same}) > 1 else ""
    r["label"] = (f"{LABELS.get(r['family'], r['family'])} d={r['d_model']} P={r['pairs']} "
                  f"seed {r['seed']}{lr}" + (f": {fields}" if fields else ""))
  return runs


def write_curves(out: str, directories, argv) -> dict:
  """``--curves``: ``mqar_curves.{json,md,png}``, a table of the runs (the fields all share, then
  one row per run) and their loss and validation-accuracy curves on shared axes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = curve_runs(directories)
  shared = {k: v for k, v in runs[0]["model_fields"].items()
            if all(r["model_fields"][k] == v for r in runs)}
  md = ("Fields of every run: " + (", ".join(f"`{k}={v}`" for k, v in shared.items()) or "none")
        + "\n\n| run | lr | steps | loss (last) | val acc (last) | test acc | train s | out |\n"
        + "|---|---:|---:|---:|---:|---:|---:|---|\n")
  for r in runs:
    last = r["curve"][-1] if r["curve"] else {}
    md += (f"| {r['label']} | {r['lr']:g} | {r['steps']} | {last.get('loss', float('nan')):.3f} "
           f"| {last.get('val_accuracy', float('nan')):.3f} | {r['accuracy']:.3f} "
           f"| {r['train_seconds']:.0f} | {r['source']} |\n")
  print(md)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, r in enumerate(runs):
    steps = [c["step"] for c in r["curve"]]
    left.plot(steps, [c["loss"] for c in r["curve"]], color=f"C{i}", label=r["label"])
    right.plot(steps, [c["val_accuracy"] for c in r["curve"]], color=f"C{i}", label=r["label"])
  for p in sorted({r["pairs"] for r in runs}):
    right.axhline(1 / p, color="gray", linestyle=":")
  firsts = [r["curve"][0]["loss"] for r in runs if r["curve"]]
  if firsts:  # a run that starts far above the others (a larger init) does not squash them
    left.set_ylim(top=1.1 * float(np.median(firsts)))
  left.set_ylabel("training loss (query tokens)")
  right.set_ylabel("validation accuracy")
  right.set_ylim(0, 1.02)
  for ax in (left, right):
    ax.set_xlabel("training step")
  fig.tight_layout()
  fig.legend(*left.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
             fontsize=7)
  paths = study.write_outputs(out, f"{STUDY}_curves", {"runs": runs, "shared_fields": shared},
                              md, fig, command=study.command_line(STUDY, argv))
  plt.close(fig)
  return {"paths": paths, "runs": runs}


def write_zoology(args, settings, runs, seconds, complete, argv) -> dict:
  """Writes ``mqar.{json,md,png}`` of the runs so far (``complete``: every sweep is in)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  checks = sanity(runs, tuple(settings["pairs"]), tuple(settings["widths"]),
                  settings["early_stop"])
  md = zoology_table(runs, settings)
  if settings.get("skipped_for_time"):
    md += ("\nNot run (the %s-minute budget was spent): %s\n"
           % (settings["budget_minutes"], ", ".join(f"{LABELS.get(f, f)} d={w} P={p}"
                                                     for f, w, p in settings["skipped_for_time"])))
  md += sanity_line(checks, settings["early_stop"])
  if complete:
    print(md)
  results = {"scale": args.scale, "seed": args.seed, "settings": settings, "runs": runs,
             "sanity": checks, "complete": complete, "wall_seconds": seconds}
  fig = zoology_plot(runs, settings)
  paths = study.write_outputs(args.out, STUDY, results, md, fig,
                              command=study.command_line(STUDY, argv))
  plt.close(fig)
  return {"paths": paths, **results}


if __name__ == "__main__":
  main()
