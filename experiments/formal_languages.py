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

Differences from the papers, by design of a small run: training strings are drawn afresh at every
step (a pure function of (seed, index)) rather than from a fixed set of 10K; a fixed number of
optimizer steps instead of 300 epochs with early stopping; the nlx models as configured (RoPE for
Transformer++, the tiny HOPE chunk sizes and CMS periods) with an untied output head whose first
logits are the label logits; bins are scored after training, one seed.

Commands, from the repository root (``--scale tiny`` takes minutes on a 2-core CPU; ``small`` and
``paper`` are GPU/TPU settings)::

  python -m experiments.formal_languages --scale tiny
  python -m experiments.formal_languages --scale small --out runs/formal_languages_small
  python -m experiments.formal_languages --families deltanet --languages parity,anbn --steps 50

Writes ``<out>/formal_languages.{json,md,png}`` (default ``runs/formal_languages``). ``--data``
is accepted for uniformity with the other studies and unused (the data are generated).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx
from experiments import study
from nlx.train.fitting import fit

STUDY = "formal_languages"
FAMILIES = ("hope", "transformer", "deltanet")
LABELS_MAX = 4  # the widest label set (aⁿbⁿcⁿ, Shuffle-2)
VOCAB = 8  # input ids: 0 padding, 1.. the alphabet; the first LABELS_MAX logits are the labels
TRAIN, BIN0, BIN1 = 0, 1, 2  # data streams

PRESETS = {
    "tiny": dict(d_model=32, n_layers=1, batch=16, steps=200, lr=1e-2, eval_size=128,
                 train_max=50, test_max=100, pad_multiple=16),
    "small": dict(d_model=64, n_layers=2, batch=32, steps=3000, lr=1e-3, eval_size=500,
                  train_max=50, test_max=100, pad_multiple=16),
    "paper": dict(d_model=128, n_layers=2, batch=32, steps=30000, lr=3e-4, eval_size=2000,
                  train_max=50, test_max=100, pad_multiple=16),
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
  """The ``ModelConfig`` of ``family`` at the study's width and depth."""
  if family not in known_families():
    raise ValueError(f"--families: unknown family {family!r}; known: "
                     f"{', '.join(known_families())}")
  d = settings["d_model"]
  return study.model_config(family, vocab_size=VOCAB, d_model=d, n_layers=settings["n_layers"],
                            mlp_dim=2 * d, tie_embeddings=False)


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
  return jnp.sum(loss * weight) / jnp.maximum(jnp.sum(weight), 1.0)


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
def _predict(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(inputs)[..., :LABELS_MAX] > 0


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
  """Trains a fresh model on ``lang`` (``nlx.train.fit``); returns ``(model, losses, seconds,
  tokens_per_second)``."""
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
  """``score`` of ``model`` on ``strings`` (padded to ``width``, in batches of ``rows``)."""
  graphdef, state = nnx.split(model)
  parts = []
  for start in range(0, len(strings), rows):
    chunk = list(strings[start:start + rows])
    inputs, targets, mask = encode(lang, chunk + [""] * (rows - len(chunk)), width)
    parts.append((np.asarray(_predict(graphdef, state, jnp.asarray(inputs))), targets, mask))
  predicted, targets, mask = (np.concatenate(x) for x in zip(*parts))
  return score(predicted, targets, mask, label_mask(lang))


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def run(settings: dict, families: Sequence[str], languages: Sequence[str], seed: int) -> dict:
  """Trains and scores every (family, language); returns the JSON results."""
  width = pad_to(settings["test_max"], settings["pad_multiple"])
  configs = {family: family_config(family, settings) for family in families}
  results = {"settings": settings, "families": {}, "languages": {}}
  for name in languages:
    lang = LANGUAGES[name]
    bins = {"bin0": bin_strings(lang, seed, BIN0, settings["eval_size"], 1,
                                settings["train_max"]),
            "bin1": bin_strings(lang, seed, BIN1, settings["eval_size"], settings["train_max"] + 1,
                                settings["test_max"])}
    results["languages"][name] = {
        "title": lang.title, "labels": list(lang.labels),
        **{f"{b}_lengths": [min(map(len, s)), max(map(len, s))] for b, s in bins.items()},
        **{f"{b}_strings": len(s) for b, s in bins.items()}}
  for family in families:
    entry = results["families"][family] = {"params": study.param_count(configs[family]),
                                           "languages": {}}
    for name in languages:
      lang = LANGUAGES[name]
      model, losses, seconds, tps = train_language(configs[family], lang, settings, seed,
                                                   desc=f"{family} {name}")
      bins = {b: bin_strings(lang, seed, stream, settings["eval_size"], lo, hi)
              for b, stream, lo, hi in (("bin0", BIN0, 1, settings["train_max"]),
                                        ("bin1", BIN1, settings["train_max"] + 1,
                                         settings["test_max"]))}
      scores = {b: evaluate(model, lang, s, width) for b, s in bins.items()}
      entry["languages"][name] = {"loss_first": losses[0],
                                  "loss_last": float(np.mean(losses[-10:])), "losses": losses,
                                  "train_seconds": seconds, "tokens_per_second": tps, **scores}
      print(f"{family:12s} {name:9s} loss {losses[-1]:.4f}  bin0 {scores['bin0']['string']:.3f}"
            f"  bin1 {scores['bin1']['string']:.3f}  ({seconds:.0f} s)", flush=True)
  return results


def tables(results: dict, families: Sequence[str], languages: Sequence[str]) -> str:
  """Markdown: string accuracy (%) per language and model, bin 0 / bin 1; then the models."""
  columns = ["language", "bin 0 / bin 1 lengths"] + [f"{f} bin 0 / bin 1" for f in families]
  rows = []
  for name in languages:
    info = results["languages"][name]
    cells = [info["title"], "{}-{} / {}-{}".format(*info["bin0_lengths"], *info["bin1_lengths"])]
    for family in families:
      r = results["families"][family]["languages"][name]
      cells.append(f"{100 * r['bin0']['string']:.1f} / {100 * r['bin1']['string']:.1f}")
    rows.append(cells)
  models = [[f, results["families"][f]["params"],
             float(sum(r["train_seconds"] for r in results["families"][f]["languages"].values())),
             float(np.mean([r["tokens_per_second"]
                            for r in results["families"][f]["languages"].values()]))]
            for f in families]
  return (study.markdown_table(columns, rows) + "\n"
          + study.markdown_table(["model", "params", "train s (all languages)", "tokens/s"],
                                 models, digits=0))


def plot(results: dict, families: Sequence[str], languages: Sequence[str]):
  """Two panels (bin 0, bin 1): grouped bars of string accuracy per language and model."""
  fig, axes = study.figure(2, width=6.0)
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
  fig.tight_layout()
  return fig


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = study.arg_parser(__doc__, STUDY)
  parser.add_argument("--families", default=None, help="comma-separated (default: all three)")
  parser.add_argument("--languages", default=None,
                      help=f"comma-separated of {', '.join(LANGUAGES)} (default: all)")
  parser.add_argument("--steps", type=int, default=None, help="override the scale's steps")
  parser.add_argument("--eval_size", type=int, default=None,
                      help="override the strings drawn per bin (before de-duplication)")
  parser.add_argument("--lr", type=float, default=None, help="override the scale's peak lr")
  args = parser.parse_args(argv)
  settings = study.scale_settings(PRESETS, args.scale, steps=args.steps, lr=args.lr,
                                  eval_size=args.eval_size)
  families = study.parse_list("--families", args.families, known=known_families(),
                              default=list(FAMILIES))
  languages = study.parse_list("--languages", args.languages, known=tuple(LANGUAGES))
  start = time.time()
  results = run(settings, families, languages, args.seed)
  results["seconds"] = time.time() - start
  results["seed"] = args.seed
  table = tables(results, families, languages)
  print(table)
  results["paths"] = study.write_outputs(args.out, STUDY, results, table,
                                         plot(results, families, languages),
                                         command=study.command_line(STUDY, argv))
  return results


if __name__ == "__main__":
  main()
