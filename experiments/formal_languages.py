"""Formal languages: parity, (aa)*, (abab)*, aⁿbⁿ, aⁿbⁿcⁿ and Shuffle-2 for HOPE, Transformer++
and DeltaNet, in-distribution (bin 0) and on longer strings (bin 1).

The paper (docs/EQUATIONS.md §6) reports, on the languages of Irie et al. (2023, "Practical
Computational Power of Linear Transformers and Their Recurrent and Self-Referential Extensions"),
HOPE 100% on all six, Transformer parity 46.4 / 0.0 and DeltaNet 98.2 / 10.1 (bin 0 / bin 1). Irie
et al. use the datasets and the protocol of Bhattamishra et al. (2020, "On the Ability and
Limitations of Transformers to Recognize Formal Languages"), which this study re-implements:

* Character prediction: the model reads a string and at every position outputs a multi-hot
  vector, one sigmoid per label, trained with binary cross-entropy. A string counts as right only
  if every label at every position is right (sigmoid > 0.5 iff the label is 1); the score is the
  percentage of right strings.
* Labels. aⁿbⁿ, aⁿbⁿcⁿ: the set of characters that may come next, over {a, b, T} / {a, b, c, T}
  (T: the string may end). Shuffle-2 (shuffles of two Dyck-1 languages, ``()`` and ``[]``): the
  next-character set over ``( ) [ ]`` (an opening bracket is always allowed, a closing one while
  its kind is open). Parity (bit strings with an even number of 1s), (aa)*, (abab)*: here every
  prefix allows the whole alphabet, so the label is whether the prefix is in the language
  (one-hot over {out, in}).
* Lengths. Training and bin 0: 1-50 (aⁿbⁿcⁿ up to 48, (abab)* up to 48); bin 1: 51-100 (the
  lengths each language admits). Bin sets are de-duplicated; for (aa)*, (abab)*, aⁿbⁿ, aⁿbⁿcⁿ they
  are every string of the range.

Training. ``--scale cpu`` (and ``small``, ``paper``) follow the papers: a fixed training set
drawn once (10K draws of lengths 1-50, de-duplicated: ~8.5K parity strings; the 25 strings of
aⁿbⁿ), read in shuffled epochs (batches of strings of one padded length), a validation split of
strings not in the training set scored every ``eval_every`` steps, and early stopping (training
stops when every validation string is right or after ``patience`` evaluations without a better
score; the bins are scored with the best checkpoint). Bin 0 holds no training or validation
string (where the language has such strings: (aa)*, (abab)*, aⁿbⁿ, aⁿbⁿcⁿ have one string per
length, so their training set, validation split and bin 0 are the same strings, as in
Bhattamishra et al.). The JSON and the figure hold the training and validation curves.
``--scale tiny`` keeps the quick protocol: fresh strings at every step (a pure function of
(seed, index)) for a fixed number of steps, no validation.

Differences from the papers, by design of a small run: a step budget (``steps``) instead of 300
epochs; the nlx models as configured (RoPE for Transformer++, the tiny HOPE chunk sizes;
DeltaNet's β = sigmoid ∈ (0, 1), no negative eigenvalues, as in Irie et al.) with an
untied output head whose first logits are the label logits; HOPE's CMS periods 8 / 32 instead of
the tiny preset's 16 / 64 (``study.cms_periods_within``: training strings have at most 50 tokens,
and a level of period 64 never updates where training reads it) and their summed gradients
clipped to norm 100 (``CMS_GRAD_CLIP``: docs/RESULTS.md found the untrained in-context updates
of longer strings diverging with the plain step); one setting for every model and
language (``cpu``'s width, learning rate and embedding std come from a search for DeltaNet on
parity, docs/RESULTS.md); one seed. ``--scale cpu`` runs parity only unless ``--languages`` says
otherwise: its three models fill the 90 minutes.

Resuming (fixed training set): each run saves its state every 10 minutes
(``--checkpoint_minutes``) and when it stops, under ``OUT/checkpoints/<family>_<language>``
(``experiments/resume.py``). Rerunning the same command continues a run that its wall-time cap
(``run_seconds``) or a kill stopped, from its newest save, on the batches the first process would
have read, and returns the runs that had ended as they ended; so HOPE's 10,000 steps (hours on 2
cores) can be trained over several sittings. Other training settings for the same ``--out`` are
refused, naming what differs.

Commands, from the repository root (``--scale tiny`` takes minutes on a 2-core CPU, ``cpu`` up
to 90 minutes; ``small`` and ``paper`` are GPU/TPU settings)::

  python -m experiments.formal_languages --scale tiny
  python -m experiments.formal_languages --scale cpu --out runs/formal_languages_cpu
  python -m experiments.formal_languages --scale small --out runs/formal_languages_small
  python -m experiments.formal_languages --families deltanet --languages parity,anbn --steps 50

Writes ``<out>/formal_languages.{json,md,png}`` (default ``runs/formal_languages``). ``--data``
is accepted for uniformity with the other studies and unused (the data are generated).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx
from experiments import resume
from experiments import study
from nlx.train import fitting
from nlx.train.fitting import fit

STUDY = "formal_languages"
FAMILIES = ("hope", "transformer", "deltanet")
CPU_FAMILIES = ("deltanet", "transformer", "hope")  # --scale cpu: the sanity rows first
# Bin 1's strings (up to 100 tokens) ask a CMS level for more in-context updates than any training
# string (up to 50) did; with the plain step those diverge (docs/RESULTS.md). The clip bounds each
# update (model.cms_grad_clip); trained updates here had summed-gradient norms of 8-60.
CMS_GRAD_CLIP = 100.0
CPU_LANGUAGES = ("parity",)  # --scale cpu's default: the sanity rows' language
LABELS_MAX = 4  # the widest label set (aⁿbⁿcⁿ, Shuffle-2)
VOCAB = 8  # input ids: 0 padding, 1.. the alphabet; the first LABELS_MAX logits are the labels
TRAIN, BIN0, BIN1, VAL = 0, 1, 2, 3  # data streams
SCALES = ("tiny", "cpu", "small", "paper")

# ``train_size`` 0: fresh training strings at every step for ``steps`` steps (tiny). Otherwise
# (Irie et al. / Bhattamishra et al.): a fixed training set of ``train_size`` draws (lengths
# 1..train_max, de-duplicated), at most ``steps`` steps over it in shuffled epochs, the validation
# split (``val_size`` draws, strings not in the training set) scored every ``eval_every`` steps;
# training stops when validation is perfect or has not improved for ``patience`` evaluations,
# and the bins are scored with the best validation checkpoint.
_FRESH = dict(train_size=0, val_size=0, eval_every=0, patience=0, run_seconds=0,
              time_budget=0)
# Settings that do not change what a run trains (a resumed run may differ in them).
_NOT_TRAINING = ("run_seconds", "time_budget", "eval_size", "test_max", "checkpoint_minutes")
PRESETS = {
    "tiny": dict(d_model=32, n_layers=1, batch=16, steps=200, lr=1e-2, eval_size=128,
                 train_max=50, test_max=100, pad_multiple=16, **_FRESH),
    # Sized for ~90 minutes on 2 CPU cores, parity only by default (the language of both sanity
    # rows; ``--languages`` adds others): DeltaNet (the sanity row, ~3 steps/s beside other
    # jobs), Transformer++, then HOPE, each run stopped at 40 minutes. Width 128 and embeddings
    # drawn with std 1.0 are what DeltaNet needs to fit parity here (docs/RESULTS.md: at width 64
    # it levels off near 70%).
    "cpu": dict(d_model=128, n_layers=2, batch=32, steps=10_000, lr=3e-3, eval_size=1000,
                train_max=50, test_max=100, pad_multiple=16, train_size=10_000, val_size=500,
                eval_every=200, patience=25, run_seconds=2400, time_budget=5400,
                checkpoint_minutes=10, model=dict(init_std=1.0)),
    "small": dict(d_model=64, n_layers=2, batch=32, steps=3000, lr=1e-3, eval_size=500,
                  train_max=50, test_max=100, pad_multiple=16, train_size=10_000, val_size=1000,
                  eval_every=200, patience=10, run_seconds=0, time_budget=0),
    "paper": dict(d_model=128, n_layers=2, batch=32, steps=30000, lr=3e-4, eval_size=2000,
                  train_max=50, test_max=100, pad_multiple=16, train_size=10_000,
                  val_size=1000, eval_every=500, patience=10, run_seconds=0, time_budget=0),
}


# ---------------------------------------------------------------------------------------------
# Languages: strings of a given length and their per-position labels
# ---------------------------------------------------------------------------------------------

class Language(NamedTuple):
  """A language of the study.

  Attributes:
    name: short name (a ``--languages`` value).
    title: how tables print it.
    alphabet: the input characters (id = index + 1).
    labels: names of the label dimensions (``K <= LABELS_MAX``).
    step: the lengths of its strings are the multiples of ``step`` (>= ``step``).
    string: (rng, length) -> a string of the language of that length.
    targets: string -> float32 ``[len, K]``, the labels after each prefix.
  """

  name: str
  title: str
  alphabet: str
  labels: tuple
  step: int
  string: Callable[[np.random.Generator, int], str]
  targets: Callable[[str], np.ndarray]


def membership_targets(in_language: Callable[[int, str], bool]) -> Callable[[str], np.ndarray]:
  """Labels ``[len, 2]``: one-hot (out, in) of ``in_language(i, s)`` for each prefix ``s[:i]``."""
  def targets(s: str) -> np.ndarray:
    member = np.array([in_language(i, s) for i in range(1, len(s) + 1)], bool)
    return np.stack([~member, member], -1).astype(np.float32)
  return targets


def parity_string(rng: np.random.Generator, length: int) -> str:
  """Uniform bits with the last one set so that the number of 1s is even."""
  bits = rng.integers(0, 2, length)
  bits[-1] = bits[:-1].sum() % 2
  return "".join(map(str, bits))


def parity_targets(s: str) -> np.ndarray:
  """``[len, 2]``: is each prefix's number of 1s even (one-hot out / in)."""
  even = (np.cumsum([c == "1" for c in s]) % 2) == 0
  return np.stack([~even, even], -1).astype(np.float32)


def counter_targets(n_letters: int) -> Callable[[str], np.ndarray]:
  """Next-character sets of ``a^n b^n (c^n)`` over ``letters + T``: ``[len, n_letters + 1]``."""
  def targets(s: str) -> np.ndarray:
    n = len(s) // n_letters
    out = np.zeros((len(s), n_letters + 1), np.float32)
    for i in range(len(s)):
      read = i + 1
      if read <= n:  # only a's so far: another a or the first b
        out[i, :2] = 1
      elif read == len(s):
        out[i, n_letters] = 1  # the string may end
      else:  # n is known: the next character is forced (letter read // n)
        out[i, read // n] = 1
    return out
  return targets


def dyck1(rng: np.random.Generator, length: int) -> list:
  """A random Dyck-1 word of even ``length`` as +1 (open) / -1 (close) steps."""
  steps, depth = [], 0
  for remaining in range(length, 0, -1):
    can_open, can_close = depth + 1 <= remaining - 1, depth > 0
    opening = can_open and (not can_close or rng.random() < 0.5)
    depth += 1 if opening else -1
    steps.append(1 if opening else -1)
  return steps


def shuffle2_string(rng: np.random.Generator, length: int) -> str:
  """A random interleaving of a Dyck-1 word over ``()`` and one over ``[]`` (total ``length``)."""
  half = int(rng.integers(0, length // 2 + 1))
  words = [dyck1(rng, 2 * half), dyck1(rng, length - 2 * half)]
  which = np.zeros(length, int)
  which[rng.permutation(length)[:length - 2 * half]] = 1
  pos, chars = [0, 0], []
  for w in which:
    chars.append("()[]"[2 * w + (words[w][pos[w]] < 0)])
    pos[w] += 1
  return "".join(chars)


def shuffle2_targets(s: str) -> np.ndarray:
  """``[len, 4]`` over ``( ) [ ]``: openings always allowed, a closing one while its depth > 0."""
  depth, out = [0, 0], np.zeros((len(s), 4), np.float32)
  for i, c in enumerate(s):
    kind = "()[]".index(c) // 2
    depth[kind] += 1 if c in "([" else -1
    out[i] = [1, depth[0] > 0, 1, depth[1] > 0]
  return out


LANGUAGES = {lang.name: lang for lang in (
    Language("parity", "Parity", "01", ("out", "in"), 1, parity_string, parity_targets),
    Language("aa", "(aa)*", "a", ("out", "in"), 2, lambda rng, n: "a" * n,
             membership_targets(lambda i, s: i % 2 == 0)),
    Language("abab", "(abab)*", "ab", ("out", "in"), 4, lambda rng, n: "ab" * (n // 2),
             membership_targets(lambda i, s: i % 4 == 0)),
    Language("anbn", "aⁿbⁿ", "ab", ("a", "b", "T"), 2,
             lambda rng, n: "a" * (n // 2) + "b" * (n // 2), counter_targets(2)),
    Language("anbncn", "aⁿbⁿcⁿ", "abc", ("a", "b", "c", "T"), 3,
             lambda rng, n: "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3),
             counter_targets(3)),
    Language("shuffle2", "Shuffle-2", "()[]", ("(", ")", "[", "]"), 2, shuffle2_string,
             shuffle2_targets),
)}


def lengths(lang: Language, lo: int, hi: int) -> list:
  """The string lengths of ``lang`` in ``[lo, hi]``."""
  return [n for n in range(max(lo, 1), hi + 1) if n % lang.step == 0]


def example(lang: Language, seed: int, stream: int, index: int, lo: int, hi: int) -> str:
  """String ``index`` of ``stream`` (TRAIN, BIN0, BIN1), lengths in ``[lo, hi]``: a pure function
  of its arguments. Training draws the length at random; the bins cycle through the lengths."""
  rng = np.random.default_rng([seed, stream, index, sum(map(ord, lang.name))])
  valid = lengths(lang, lo, hi)
  length = valid[rng.integers(len(valid))] if stream == TRAIN else valid[index % len(valid)]
  return lang.string(rng, length)


def bin_strings(lang: Language, seed: int, stream: int, size: int, lo: int, hi: int) -> list:
  """The de-duplicated strings ``0..size-1`` of a test bin, in order of first appearance."""
  return list(dict.fromkeys(example(lang, seed, stream, i, lo, hi) for i in range(size)))


def training_set(lang: Language, seed: int, size: int, hi: int) -> list:
  """The fixed training set: the de-duplicated strings of draws ``0..size-1`` of the TRAIN stream
  (lengths 1..``hi`` at random), drawn once, in order of first appearance."""
  return list(dict.fromkeys(example(lang, seed, TRAIN, i, 1, hi) for i in range(size)))


def held_out(lang: Language, seed: int, stream: int, size: int, lo: int, hi: int,
             exclude: Sequence[str]) -> list:
  """``bin_strings`` of ``stream`` less the strings of ``exclude`` (the training set, ...).

  A language with one string per length (``(aa)*``, ``(abab)*``, aⁿbⁿ, aⁿbⁿcⁿ) has no string of
  lengths ``lo..hi`` outside a training set that holds them all: there the split is every string
  of the range (the training strings themselves, as in Bhattamishra et al.)."""
  strings = bin_strings(lang, seed, stream, size, lo, hi)
  excluded = set(exclude)
  return [s for s in strings if s not in excluded] or strings


def batch_schedule(lengths: Sequence[int], batch: int, seed: int,
                   multiple: int) -> Callable[[int], tuple]:
  """``step -> (rows, width)``: the batches of a fixed set of strings of ``lengths``.

  Strings are grouped by their length padded to ``multiple`` (``width``), so that a batch of
  short strings is not padded to the longest. Each epoch shuffles every group, cuts it into
  batches of ``batch`` rows (the last one wraps around to the group's first rows), and shuffles
  the order of all the batches; every row is read at least once per epoch. A pure function of its
  arguments and the step."""
  widths = np.array([pad_to(n, multiple) for n in lengths])
  groups = [(int(w), np.flatnonzero(widths == w)) for w in np.unique(widths)]
  per_epoch = sum(-(-len(rows) // batch) for _, rows in groups)

  @functools.lru_cache(maxsize=2)
  def epoch(e: int) -> list:
    rng = np.random.default_rng([seed, 7919, e])
    batches = []
    for width, rows in groups:
      rows = np.resize(rng.permutation(rows), -(-len(rows) // batch) * batch)
      batches += [(part, width) for part in rows.reshape(-1, batch)]
    return [batches[i] for i in rng.permutation(len(batches))]

  return lambda step: epoch(step // per_epoch)[step % per_epoch]


def encode(lang: Language, strings: Sequence[str], width: int):
  """``(inputs int32 [B, width], targets float32 [B, width, LABELS_MAX], mask float32 [B,
  width])``: ids ``alphabet.index + 1``, padding 0; ``mask`` is 1 on the strings' positions."""
  inputs = np.zeros((len(strings), width), np.int32)
  targets = np.zeros((len(strings), width, LABELS_MAX), np.float32)
  mask = np.zeros((len(strings), width), np.float32)
  for row, s in enumerate(strings):
    inputs[row, :len(s)] = [lang.alphabet.index(c) + 1 for c in s]
    labels = lang.targets(s)
    targets[row, :len(s), :labels.shape[1]] = labels
    mask[row, :len(s)] = 1
  return inputs, targets, mask


def label_mask(lang: Language) -> np.ndarray:
  """float32 ``[LABELS_MAX]``: 1 on the language's label dimensions."""
  return (np.arange(LABELS_MAX) < len(lang.labels)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Model, loss, training, scoring
# ---------------------------------------------------------------------------------------------

def known_families() -> list:
  """The families of ``configs/*.py``."""
  return sorted(f[:-3] for f in os.listdir(os.path.join(study.REPO, "configs"))
                if f.endswith(".py"))


def family_config(family: str, settings: dict):
  """The ``ModelConfig`` of ``family`` at the study's width and depth (a CMS's periods from
  ``study.cms_periods_within`` the longest training string)."""
  if family not in known_families():
    raise ValueError(f"--families: unknown family {family!r}; known: "
                     f"{', '.join(known_families())}")
  fields = dict(d_model=settings["d_model"], n_layers=settings["n_layers"], tie_embeddings=False)
  if nlx.nn.registry.get(family).mlp is not None:  # every CMS level updates inside a string
    fields["cms_periods"] = study.cms_periods_within(settings["train_max"])
    fields["cms_grad_clip"] = CMS_GRAD_CLIP
  fields.update(settings.get("model", {}))  # --model FIELD=VALUE wins over the scale's
  fields.setdefault("mlp_dim", 2 * fields["d_model"])
  return study.model_config(family, vocab_size=VOCAB, **fields)


def bce_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
             labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy over counted positions and labels.

  Args:
    logits: ``[B, T, V]`` (the first ``LABELS_MAX`` are the label logits).
    targets: ``[B, T, LABELS_MAX]`` multi-hot.
    mask: ``[B, T]`` (1: a position of a string).
    labels: ``[LABELS_MAX]`` (1: a label of the language).
  """
  loss = optax.sigmoid_binary_cross_entropy(logits[..., :LABELS_MAX].astype(jnp.float32),
                                            targets)
  weight = mask[..., None] * labels
  # ``where``, not a product: a non-finite logit at a padded position must not reach the mean.
  return jnp.sum(jnp.where(weight > 0, loss * weight, 0.0)) / jnp.maximum(jnp.sum(weight), 1.0)


def language_loss(model, batch) -> jax.Array:
  """``bce_loss`` of ``model`` on ``batch = (inputs, targets, mask, labels)`` (see ``encode``,
  ``label_mask``): the loss ``fit`` trains with."""
  inputs, targets, mask, labels = batch
  return bce_loss(model(inputs), targets, mask, labels)


@functools.lru_cache(maxsize=None)
def _optimizer(steps: int, lr: float) -> optax.GradientTransformation:
  # One object per (steps, lr): with the one graphdef per config (``build``) and the one loss
  # function, ``fit``'s compiled step is reused, a compile per model config.
  return study.optimizer(steps, lr, warmup=steps // 10, weight_decay=0.1, clip=1.0)


@functools.partial(jax.jit, static_argnums=0)
def _label_logits(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(inputs)[..., :LABELS_MAX].astype(jnp.float32)


def pad_to(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


_GRAPHDEFS: dict = {}


def build(cfg, seed: int):
  """A fresh model of ``cfg``, merged from the first graphdef of that config.

  HOPE's CMS keeps a spec object (compared by identity) in the graph definition, so two builds of
  one config would not share jitted functions; reusing the first graphdef compiles once.
  """
  graphdef, params, rest = nnx.split(nlx.build_model(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
  return nnx.merge(_GRAPHDEFS.setdefault(cfg, graphdef), params, rest)


def train_language(cfg, lang: Language, settings: dict, seed: int, desc: str = ""):
  """Trains a fresh model on fresh strings of ``lang`` at every step (``nlx.train.fit``; the
  ``train_size`` 0 protocol); returns ``(model, losses, seconds, tokens_per_second)``."""
  steps, batch, width = settings["steps"], settings["batch"], pad_to(settings["train_max"],
                                                                     settings["pad_multiple"])
  labels = label_mask(lang)

  def batches(step):
    strings = [example(lang, seed, TRAIN, step * batch + i, 1, settings["train_max"])
               for i in range(batch)]
    return (*encode(lang, strings, width), labels)

  result = fit(build(cfg, seed), batches, steps, tx=_optimizer(steps, settings["lr"]),
               loss=language_loss, desc=desc)
  return result.model, result.losses, result.seconds, result.tokens_per_second


def train_fixed_set(cfg, lang: Language, settings: dict, seed: int, train: Sequence[str],
                    val: Sequence[str], desc: str = "", progress: bool = True,
                    checkpoint_dir: Optional[str] = None) -> dict:
  """Trains a fresh model on the fixed set ``train`` with early stopping on ``val``.

  At most ``settings["steps"]`` steps of ``batch`` strings (``batch_schedule``: shuffled epochs,
  batches of strings of one padded length);
  every ``eval_every`` steps (and after the last) the validation strings are scored. The best
  checkpoint (highest validation string accuracy, then lowest validation loss) is kept; training
  stops once validation is perfect (every string right), after ``patience`` evaluations without
  a better one, or at the first evaluation after ``run_seconds`` (if set) of wall time. The step is ``fit``'s compiled step (``nlx.train.step.apply_gradients``).

  Returns:
    ``{"model": the best checkpoint, "losses": the loss of every step, "curve": [{"step",
    "train_loss" (mean since the previous evaluation), "val_loss", "val_string",
    "val_position"}], "best_step", "steps" (run), "stopped" ("perfect" | "patience" |
    "time" | "max_steps"), "seconds", "tokens_per_second"}``.

  ``checkpoint_dir``: the run saves its state there (``resume.SweepCheckpoint``: parameters,
  optimizer state, best checkpoint, losses and curve) every ``settings["checkpoint_minutes"]``
  minutes at an evaluation, and when it stops; called again, it continues from the newest save
  (a run stopped by ``run_seconds`` trains on; one stopped otherwise returns as it ended).
  ``seconds`` and ``tokens_per_second`` then count every process's training.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  steps, batch = settings["steps"], settings["batch"]
  width = pad_to(settings["train_max"], settings["pad_multiple"])
  labels = jnp.asarray(label_mask(lang))
  inputs, targets, mask = encode(lang, train, width)
  graphdef, params, rest = nnx.split(build(cfg, seed), nnx.Param, ...)
  tx = _optimizer(steps, settings["lr"])
  opt_state = tx.init(params)
  step_fn = fitting.compiled_step(graphdef, tx, language_loss)
  losses, curve, since = [], [], 0
  best, best_params, best_step, bad, stopped = None, params, 0, 0, "max_steps"
  eval_seconds, start, compiled = 0.0, time.time(), None
  tokens, before = 0, {"seconds": 0.0, "timed": 0.0}  # before: earlier processes' (resumed)
  saver = None
  if checkpoint_dir is not None:
    minutes = settings.get("checkpoint_minutes") or 0
    keep = {k: v for k, v in settings.items() if k not in _NOT_TRAINING}
    fingerprint = {"language": lang.name, "seed": seed, "settings": keep,
                   "model": resume.model_fingerprint(cfg)}
    saver = resume.SweepCheckpoint(checkpoint_dir, fingerprint, every_seconds=60 * minutes)
    restored = saver.restore({"params": params, "opt_state": opt_state, "best": params})
    if restored is not None:
      arrays, p = restored
      params, opt_state, best_params = arrays["params"], arrays["opt_state"], arrays["best"]
      losses, curve, best_step, bad, tokens = (p["losses"], p["curve"], p["best_step"], p["bad"],
                                               p["tokens"])
      best, before, since = (None if p["best"] is None else tuple(p["best"])), p["before"], len(
          losses)
      print(f"{desc}: resuming from step {len(losses)} ({checkpoint_dir})", flush=True)
      if p["stopped"] not in (None, "time"):  # it had ended: as it ended
        stopped = p["stopped"]
        return {"model": nnx.merge(graphdef, best_params, rest), "losses": losses, "curve": curve,
                "best_step": best_step, "steps": len(losses), "stopped": stopped,
                "seconds": before["seconds"],
                "tokens_per_second": tokens / max(before["timed"], 1e-9)}

  def save(ended: Optional[str], force: bool = False):
    if saver is None:
      return
    now = time.time()
    seconds = before["seconds"] + now - start
    timed = before["timed"] + max(now - (compiled or start) - eval_seconds, 0.0)
    saver.maybe_save({"params": params, "opt_state": opt_state, "best": best_params},
                     lambda: {"losses": [float(x) for x in jax.device_get(losses)],
                              "curve": curve, "best": best, "best_step": best_step, "bad": bad,
                              "tokens": tokens, "stopped": ended,
                              "before": {"seconds": seconds, "timed": timed}},
                     force=force)

  bar = tqdm(range(len(losses), steps), desc=desc, unit="step", dynamic_ncols=True,
             disable=not progress, leave=False)
  schedule = batch_schedule([len(s) for s in train], batch, seed, settings["pad_multiple"])
  first = len(losses)
  for step in bar:
    rows, w = schedule(step)
    up = step_fn(params, rest, opt_state, (jnp.asarray(inputs[rows, :w]),
                                           jnp.asarray(targets[rows, :w]),
                                           jnp.asarray(mask[rows, :w]), labels))
    tokens += batch * w if step != first else 0  # a process's first step compiles
    params, opt_state = up.params, up.opt_state
    losses.append(up.loss)
    if step == first:
      jax.block_until_ready(up.loss)
      compiled = time.time()
    if (step + 1) % settings["eval_every"] and step != steps - 1:
      continue
    tic = time.time()
    recent = [float(x) for x in jax.device_get(losses[since:])]
    since = len(losses)
    got = evaluate(nnx.merge(graphdef, params, rest), lang, val, width)
    curve.append({"step": step + 1, "train_loss": float(np.mean(recent)),
                  "val_loss": got["loss"], "val_string": got["string"],
                  "val_position": got["position"]})
    key = (got["string"], -got["loss"] if np.isfinite(got["loss"]) else -np.inf)  # NaN: worst
    if best is None or key > best:
      best, best_params, best_step, bad = key, params, step + 1, 0
    else:
      bad += 1
    eval_seconds += time.time() - tic
    bar.set_postfix(loss=f"{curve[-1]['train_loss']:.3f}", val=f"{got['string']:.3f}")
    if got["string"] >= 1.0:
      stopped = "perfect"
      break
    if bad >= settings["patience"]:
      stopped = "patience"
      break
    if settings.get("run_seconds") and time.time() - start > settings["run_seconds"]:
      stopped = "time"
      break
    save(None)
  end = time.time()
  save(stopped, force=True)
  losses = [float(x) for x in jax.device_get(losses)]
  timed = max(before["timed"] + end - (compiled or start) - eval_seconds, 1e-9)
  return {"model": nnx.merge(graphdef, best_params, rest), "losses": losses, "curve": curve,
          "best_step": best_step, "steps": len(losses), "stopped": stopped,
          "seconds": before["seconds"] + end - start,
          "tokens_per_second": tokens / timed}


def score(predicted: np.ndarray, targets: np.ndarray, mask: np.ndarray,
          labels: np.ndarray) -> dict:
  """Accuracies of thresholded predictions.

  Args:
    predicted: bool ``[B, T, LABELS_MAX]`` (sigmoid > 0.5).
    targets: ``[B, T, LABELS_MAX]`` multi-hot.
    mask: ``[B, T]`` (1: a position of a string; rows without one are skipped).
    labels: ``[LABELS_MAX]`` (1: a label of the language).

  Returns:
    ``{"string": fraction of strings right at every position and label, "position": fraction
    of positions with every label right, "strings": number of strings}``.
  """
  right = np.all((predicted == (targets > 0.5)) | (labels[None, None] == 0), -1)  # [B, T]
  counted = mask > 0
  rows = counted.any(-1)
  strings_right = np.all(right | ~counted, -1) & rows
  return {"string": float(strings_right.sum() / max(rows.sum(), 1)),
          "position": float((right & counted).sum() / max(counted.sum(), 1)),
          "strings": int(rows.sum())}


def evaluate(model, lang: Language, strings: Sequence[str], width: int, rows: int = 64) -> dict:
  """``score`` of ``model`` on ``strings`` (padded to ``width``, in batches of ``rows``), and
  ``"loss"``: their ``bce_loss``."""
  graphdef, state = nnx.split(model)
  parts = []
  for start in range(0, len(strings), rows):
    chunk = list(strings[start:start + rows])
    inputs, targets, mask = encode(lang, chunk + [""] * (rows - len(chunk)), width)
    parts.append((np.asarray(_label_logits(graphdef, state, jnp.asarray(inputs))), targets,
                  mask))
  logits, targets, mask = (np.concatenate(x) for x in zip(*parts))
  labels = label_mask(lang)
  return {**score(logits > 0, targets, mask, labels),
          "loss": float(bce_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                 jnp.asarray(labels)))}


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def splits(lang: Language, settings: dict, seed: int) -> dict:
  """The strings of each split: ``train`` (the fixed set; empty for fresh strings), ``val`` (not
  in ``train``), ``bin0`` (lengths 1..train_max, in neither), ``bin1`` (train_max+1..test_max).
  Where a language has no such strings (one string per length), ``held_out`` keeps them all."""
  hi, size = settings["train_max"], settings["train_size"]
  train = training_set(lang, seed, size, hi) if size else []
  val = held_out(lang, seed, VAL, settings["val_size"], 1, hi, train) if size else []
  return {"train": train, "val": val,
          "bin0": held_out(lang, seed, BIN0, settings["eval_size"], 1, hi, train + val),
          "bin1": bin_strings(lang, seed, BIN1, settings["eval_size"], hi + 1,
                              settings["test_max"])}


def run(settings: dict, families: Sequence[str], languages: Sequence[str], seed: int,
        progress: bool = True, on_result: Optional[Callable[[dict], None]] = None,
        checkpoints: Optional[str] = None) -> dict:
  """Trains and scores every (family, language), language by language; returns the JSON results
  (``"languages_run"``: the languages run, all of them unless ``settings["time_budget"]``
  seconds were spent before one started; no run trains past that budget, ``run_seconds`` caps
  each run). ``on_result(results)`` after every run. ``checkpoints``: a directory where each
  fixed-set run saves its state (``<family>_<language>``) and from which a rerun continues."""
  width = pad_to(settings["test_max"], settings["pad_multiple"])
  configs = {family: family_config(family, settings) for family in families}
  results = {"settings": settings, "families": {}, "languages": {}}
  data = {}
  for name in languages:
    lang = LANGUAGES[name]
    data[name] = splits(lang, settings, seed)
    info = results["languages"][name] = {"title": lang.title, "labels": list(lang.labels)}
    for part, strings in data[name].items():
      info[f"{part}_strings"] = len(strings)
      if strings:
        info[f"{part}_lengths"] = [min(map(len, strings)), max(map(len, strings))]
    if data[name]["train"]:
      train = set(data[name]["train"])
      info["val_in_train"] = sum(s in train for s in data[name]["val"])
      info["bin0_in_train"] = sum(s in train for s in data[name]["bin0"])
  for family in families:
    results["families"][family] = {"params": study.param_count(configs[family]), "languages": {}}
  start, results["languages_run"] = time.time(), []
  for name in languages:  # every model on a language, then the next: complete rows first
    if settings.get("time_budget") and time.time() - start > settings["time_budget"]:
      print(f"time budget of {settings['time_budget']} s spent: languages not run: "
            f"{', '.join(languages[len(results['languages_run']):])}", flush=True)
      break
    lang, split = LANGUAGES[name], data[name]
    for family in families:
      if split["train"]:
        capped = dict(settings)
        if settings.get("time_budget"):  # no run goes on past the budget
          left = max(settings["time_budget"] - (time.time() - start), 1.0)
          capped["run_seconds"] = min(settings.get("run_seconds") or left, left)
        got = train_fixed_set(configs[family], lang, capped, seed, split["train"],
                              split["val"], desc=f"{family} {name}", progress=progress,
                              checkpoint_dir=checkpoints and os.path.join(
                                  checkpoints, f"{family}_{name}"))
        model, losses, seconds, tps = (got.pop(k) for k in ("model", "losses", "seconds",
                                                            "tokens_per_second"))
        extra = got
      else:
        model, losses, seconds, tps = train_language(configs[family], lang, settings, seed,
                                                     desc=f"{family} {name}")
        extra = {}
      scores = {b: evaluate(model, lang, split[b], width) for b in ("bin0", "bin1")}
      results["families"][family]["languages"][name] = {
          "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])), "losses": losses,
          "train_seconds": seconds, "tokens_per_second": tps, **extra, **scores}
      stop = (f"  val {extra['curve'][-1]['val_string']:.3f} best step {extra['best_step']}"
              f"/{extra['steps']} ({extra['stopped']})" if extra else "")
      print(f"{family:12s} {name:9s} loss {losses[-1]:.4f}  bin0 {scores['bin0']['string']:.3f}"
            f"  bin1 {scores['bin1']['string']:.3f}{stop}  ({seconds:.0f} s)", flush=True)
      if on_result is not None:
        on_result(results)
    results["languages_run"].append(name)
  return results


def tables(results: dict, families: Sequence[str], languages: Sequence[str]) -> str:
  """Markdown: string accuracy (%) per language and model, bin 0 / bin 1; the training runs
  (fixed training set: steps, best step, why they stopped, validation); then the models."""
  columns = ["language", "bin 0 / bin 1 lengths"] + [f"{f} bin 0 / bin 1" for f in families]
  rows = []
  for name in languages:
    info = results["languages"][name]
    cells = [info["title"], "{}-{} / {}-{}".format(*info["bin0_lengths"], *info["bin1_lengths"])]
    for family in families:
      r = results["families"][family]["languages"][name]
      cells.append(f"{100 * r['bin0']['string']:.1f} / {100 * r['bin1']['string']:.1f}")
    rows.append(cells)
  out = study.markdown_table(columns, rows) + "\n"
  runs = [(f, n, results["families"][f]["languages"][n]) for f in families for n in languages]
  if any("curve" in r for _, _, r in runs):
    out += study.markdown_table(
        ["model", "language", "train / val / bin 0 strings", "steps run", "best step", "stopped",
         "val strings right (best)", "train loss (first / at best)", "val loss (at best)"],
        [[f, results["languages"][n]["title"],
          "{} / {} / {}".format(*(results["languages"][n][f"{p}_strings"]
                                  for p in ("train", "val", "bin0"))),
          r["steps"], r["best_step"], r["stopped"],
          f"{max(c['val_string'] for c in r['curve']):.3f}",
          "{:.3f} / {:.3f}".format(r["loss_first"], *(c["train_loss"] for c in r["curve"]
                                                      if c["step"] == r["best_step"])),
          next(c["val_loss"] for c in r["curve"] if c["step"] == r["best_step"])]
         for f, n, r in runs if "curve" in r]) + "\n"
  models = [[f, results["families"][f]["params"],
             float(sum(r["train_seconds"] for r in results["families"][f]["languages"].values())),
             float(np.mean([r["tokens_per_second"]
                            for r in results["families"][f]["languages"].values()]))]
            for f in families]
  return out + study.markdown_table(["model", "params", "train s (all languages)", "tokens/s"],
                                    models, digits=0)


def plot(results: dict, families: Sequence[str], languages: Sequence[str]):
  """Panels bin 0, bin 1: grouped bars of string accuracy per language and model; with a fixed
  training set also the curves: validation strings right and training loss against the step
  (one colour per model, one line style per language)."""
  curves = any("curve" in r for f in families
               for r in results["families"][f]["languages"].values())
  fig, axes = study.figure(4 if curves else 2, width=5.0 if curves else 6.0)
  x = np.arange(len(languages))
  bar = 0.8 / len(families)
  for ax, b, title in zip(axes, ("bin0", "bin1"), ("bin 0 (training lengths)",
                                                   "bin 1 (longer strings)")):
    for i, family in enumerate(families):
      acc = [100 * results["families"][family]["languages"][n][b]["string"] for n in languages]
      ax.bar(x + (i - (len(families) - 1) / 2) * bar, acc, bar, label=family)
    ax.set_xticks(x, [results["languages"][n]["title"] for n in languages], rotation=20)
    ax.set_ylim(0, 105)
    ax.set_ylabel("strings right (%)")
    ax.set_title(title)
  axes[0].legend(fontsize=8)
  if curves:
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for i, family in enumerate(families):
      for j, name in enumerate(languages):
        curve = results["families"][family]["languages"][name].get("curve")
        if not curve:
          continue
        steps = [c["step"] for c in curve]
        label = f"{family} {results['languages'][name]['title']}"
        axes[2].plot(steps, [100 * c["val_string"] for c in curve], color=f"C{i}",
                     linestyle=styles[j % len(styles)], label=label)
        axes[3].plot(steps, [c["train_loss"] for c in curve], color=f"C{i}",
                     linestyle=styles[j % len(styles)])
        axes[3].plot(steps, [c["val_loss"] for c in curve], color=f"C{i}", alpha=0.35,
                     linestyle=styles[j % len(styles)])
    axes[2].set(xlabel="step", ylabel="validation strings right (%)", ylim=(0, 105),
                title="validation (early stopping)")
    axes[3].set(xlabel="step", ylabel="BCE", yscale="log",
                title="training loss (dark), validation loss (light)")
    axes[2].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = study.arg_parser(__doc__, STUDY, scales=SCALES,
                            scale_help="tiny: minutes on 2 CPU cores (fresh strings, fixed steps); "
                                       "cpu: the papers' protocol (fixed training set, early "
                                       "stopping), <= 90 min on 2 CPU cores; small, paper: GPU/TPU")
  parser.add_argument("--families", default=None, help="comma-separated (default: all three)")
  parser.add_argument("--languages", default=None,
                      help=f"comma-separated of {', '.join(LANGUAGES)} (default: all)")
  parser.add_argument("--steps", type=int, default=None, help="override the scale's steps")
  parser.add_argument("--eval_size", type=int, default=None,
                      help="override the strings drawn per bin (before de-duplication)")
  parser.add_argument("--lr", type=float, default=None, help="override the scale's peak lr")
  parser.add_argument("--train_size", type=int, default=None,
                      help="override the training set's draws (0: fresh strings every step)")
  parser.add_argument("--val_size", type=int, default=None,
                      help="override the validation split's draws")
  parser.add_argument("--patience", type=int, default=None,
                      help="override the evaluations without a better validation score "
                           "before stopping")
  parser.add_argument("--eval_every", type=int, default=None,
                      help="override the steps between validations")
  parser.add_argument("--run_seconds", type=float, default=None,
                      help="override the wall-time cap of one run (0: none)")
  parser.add_argument("--time_budget", type=float, default=None,
                      help="override the wall-time budget of the study (0: none)")
  parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                      help="a ModelConfig field of every model, e.g. init_std=1.0 (repeatable)")
  resume.add_flag(parser, PRESETS["cpu"]["checkpoint_minutes"], "validation",
                  "fixed training set (cpu): each run")
  args = parser.parse_args(argv)
  settings = study.scale_settings(PRESETS, args.scale, steps=args.steps, lr=args.lr,
                                  eval_size=args.eval_size, train_size=args.train_size,
                                  val_size=args.val_size,
                                  patience=args.patience, eval_every=args.eval_every,
                                  run_seconds=args.run_seconds, time_budget=args.time_budget)
  resume.apply_flag(args, settings)
  settings["model"] = {**settings.get("model", {}), **study.parse_fields("--model", args.model)}
  # The width and depth a --model field sets are the study's (its records and tables say so).
  settings.update({k: settings["model"][k] for k in ("d_model", "n_layers")
                   if k in settings["model"]})
  if settings["train_size"] and (settings["eval_every"] < 1 or settings["patience"] < 1
                                 or settings["val_size"] < 1):
    raise ValueError(f"--scale {args.scale}: a fixed training set (train_size="
                     f"{settings['train_size']}) needs eval_every, patience and val_size >= 1; "
                     f"got {settings['eval_every']}, {settings['patience']}, "
                     f"{settings['val_size']}")
  families = study.parse_list("--families", args.families, known=known_families(),
                              default=list(CPU_FAMILIES if args.scale == "cpu" else FAMILIES))
  languages = study.parse_list("--languages", args.languages, known=tuple(LANGUAGES),
                               default=list(CPU_LANGUAGES if args.scale == "cpu" else LANGUAGES))
  command = study.command_line(STUDY, argv)

  def partial(results):  # the runs so far, in case the process is stopped
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{STUDY}.partial.json"), "w", encoding="utf-8") as f:
      json.dump({"study": STUDY, "command": command, **results}, f, default=study._jsonable)  # pylint: disable=protected-access

  start = time.time()
  checkpoints = (os.path.join(args.out, "checkpoints")
                 if settings.get("checkpoint_minutes") is not None else None)
  results = run(settings, families, languages, args.seed, on_result=partial,
                checkpoints=checkpoints)
  results["seconds"] = time.time() - start
  results["seed"] = args.seed
  ran = results["languages_run"]
  table = tables(results, families, ran)
  print(table)
  results["paths"] = study.write_outputs(args.out, STUDY, results, table,
                                         plot(results, families, ran), command=command)
  return results


if __name__ == "__main__":
  main()
