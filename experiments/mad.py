"""The MAD synthetic suite (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid
Architectures") for HOPE, Transformer++, Gated DeltaNet, Titans (LMM) and Mamba2.

MAD trains a small model (width 128, two blocks of a sequence mixer and a SwiGLU) on six synthetic
tasks and reports the test accuracy of the best run of a learning-rate x weight-decay grid. The
Nested Learning paper reports HOPE on five of them (compression 51.2, in-context recall 100, fuzzy
in-context recall 52.1, selective copying 99.7, memorisation 85.2); the table prints that row
beside the measured ones. The generators re-implement those of the MAD reference code
(``athms/mad-lab``: ``mad/data/instances.py``, settings from ``configs/tasks/*.yml`` and
``mad/configs.py``), with their defaults the MAD baselines:

* In-context recall (vocabulary 16, T 128, multi-query): 63 key-value pairs (keys 0-7, values
  8-15; a key keeps its value within a sequence), then a final pair whose key is one of the
  context. Scored: the value of every key seen before (the next token after that key), and the
  final value.
* Fuzzy in-context recall (vocabulary 16, T 128): keys and values are motifs of 1-3 distinct
  tokens (keys from 0-6, values from 7-14; test keys always 3 tokens), left-padded with token 15.
  Scored: every token of the value of a key seen before, and of the final value.
* Noisy in-context recall (vocabulary 32 of which 16 noise tokens, T 128): in-context recall
  where each context pair is, with probability 0.2, two noise tokens (16-31), never scored.
* Selective copying (vocabulary 16, T 256): 16 tokens (0-13) scattered among 223 blanks (14),
  a copy token (15), 16 blanks; scored: the 16 tokens, in order, at the last 16 positions.
* Compression (vocabulary 16, T 32): 31 random tokens and a compression token; MAD's autoencoder
  backbone (the mixer stack reads the sequence; its last position, plus a sinusoidal position
  code, goes through an MLP decoder, ``AutoEncoder``) reconstructs every token; all scored.
* Memorisation (vocabulary 256, T 32): 16 (key, insert token) pairs; at each insert token the
  model must output the key's value, from a fixed key -> value table (127 facts: keys 0-126,
  values from 127-254, drawn once with MAD's seed 12345), the same in the training and test sets.

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
* Generators: the distributions of mad-lab's, not its random streams (a data set is a pure
  function of the seed, the task and the split). Two corrections: fuzzy recall's probe pair is put in
  the context even when mad-lab's probe position falls after the context's end (mad-lab then
  scores a final value whose key may never have appeared), and selective copying draws its
  blank positions from the seeded generator (mad-lab uses numpy's global one).

Scales (``--scale``):

* ``tiny``: every task shrunk to T 32 and vocabulary 16 (fuzzy, selective copying, memorisation,
  noisy recall with their parameters scaled down) and padded to 32 tokens, 32 training and 32
  test sequences, batch 16, 2 epochs (4 steps), one grid point (lr 1e-3, weight decay 0). The
  numbers say nothing about the models; the scale checks the pipeline end to end (all six tasks
  and five models in a few minutes on 2 CPU cores).
* ``cpu``: MAD's task settings and batch, one grid point (lr 1e-3, weight decay 0), 1,280 training
  sequences (memorisation 256), 256 test sequences, 2 epochs: 20 optimizer steps per (task,
  model) (memorisation 4), about 65 minutes on 2 busy CPU cores (load ~7; per-step times
  measured at these shapes: 15 s HOPE, 8-9 s Titans, 4 s Mamba2, 3.5 s Gated DeltaNet, 1.5 s
  Transformer++ per batch of 128 x 128 tokens; HOPE takes half the time). One epoch of MAD's
  12,800 sequences at one grid point would take some 4.8 hours there; MAD's 200 epochs x 6
  grid points are far beyond a CPU. MAD's own difficulty variants go down to 800 training
  sequences.
* ``paper``: MAD's settings: 12,800 / 1,280 sequences, 200 epochs, the 6-point grid.

Commands::

  python experiments/mad.py --scale tiny              # writes runs/mad/mad.{json,md,png}
  python experiments/mad.py --scale paper --out runs/mad_paper   # GPU/TPU
  python experiments/mad.py --tasks in_context_recall,compression --models transformer,hope \\
      --epochs 2

Run as a script, the study keeps a JAX compilation cache for the run in a temporary directory:
runs that compile the same program (the grid's learning rates and weight decays are optimizer
state, not constants, and at the tiny scale every task but compression has the same shapes)
compile once. ``--data`` is accepted for uniformity with the other studies and unused (the data
are generated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # pylint: disable=g-import-not-at-top,wrong-import-position

import nlx  # pylint: disable=g-import-not-at-top,wrong-import-position

STUDY = "mad"
MODELS = ("hope", "transformer", "gated_deltanet", "titans_lmm", "mamba2")
LABELS = {"hope": "HOPE", "transformer": "Transformer++", "gated_deltanet": "Gated DeltaNet",
          "titans_lmm": "Titans (LMM)", "mamba2": "Mamba2"}
IGNORE = -100  # MAD's target_ignore_index: a position that is not scored
TEST_SEED_OFFSET = 1_000_003  # test data: seed + offset (disjoint from every training seed)
FACTS_SEED = 12345  # MAD's seed of the memorisation table (MADConfig.seed)
SCALES = ("tiny", "cpu", "paper")
D_MODEL = 128
SWIGLU_WIDTH = 352  # MAD's SwiGLU: int(2 * 128 * 4 / 3) = 341, rounded up to a multiple of 16
MIN_LR = 1e-6  # MAD's cosine schedule ends at min_lr
# The Nested Learning paper's HOPE row on MAD (accuracy %; noisy recall not reported).
PAPER_HOPE = {"compression": 51.2, "in_context_recall": 100.0, "fuzzy_in_context_recall": 52.1,
              "noisy_in_context_recall": None, "selective_copying": 99.7, "memorization": 85.2}


# ---------------------------------------------------------------------------------------------
# Generators: one example, numpy, ``(inputs [L], targets [L])`` with IGNORE where not scored
# ---------------------------------------------------------------------------------------------

def in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0,
                      is_training: bool = False) -> tuple:
  """Multi-query associative recall (MAD's in-context recall; with noise, its noisy variant).

  ``seq_len / 2 - 1`` context pairs ``(key, value)`` (keys ``[0, C/2)``, values ``[C/2, C)``,
  ``C = vocab_size - noise_vocab_size``; a key keeps one value), each replaced with probability
  ``frac_noise`` by two noise tokens ``[C, vocab_size)`` (at least one pair stays), then a final
  pair whose key is a key of the context. Returns the shifted sequence: ``inputs`` its first
  ``seq_len - 1`` tokens; ``targets`` the next token where scored (the value after a key seen
  before, and the final value), IGNORE elsewhere; with ``is_training`` every next token (MAD
  trains on all of them).
  """
  clean = vocab_size - noise_vocab_size
  if seq_len % 2 or seq_len < 4:
    raise ValueError(f"seq_len={seq_len} must be even and >= 4")
  if not 0 <= frac_noise < 1 or (frac_noise > 0 and noise_vocab_size < 1) or clean < 2:
    raise ValueError(f"need 0 <= frac_noise < 1, noise tokens if frac_noise > 0 and 2 clean "
                     f"tokens; got frac_noise={frac_noise}, noise_vocab_size={noise_vocab_size}, "
                     f"vocab_size={vocab_size}")
  n_keys, n = clean // 2, seq_len // 2 - 1
  keys = rng.integers(0, n_keys, n)
  value_of = rng.integers(n_keys, clean, n_keys)  # a key's value (MAD draws it when first seen)
  pairs = np.stack([keys, value_of[keys]], 1)
  noise = np.zeros(n, bool)
  if frac_noise > 0:
    noise = rng.random(n) < frac_noise
    noise[rng.integers(n)] = False
    pairs[noise] = rng.integers(clean, vocab_size, (int(noise.sum()), 2))
  seen, scored = np.zeros(n_keys, bool), np.zeros(n, bool)
  for i in np.flatnonzero(~noise):
    scored[i] = seen[keys[i]]
    seen[keys[i]] = True
  probe = rng.choice(np.flatnonzero(seen))
  tokens = np.concatenate([pairs.reshape(-1), [probe, value_of[probe]]])
  targets = np.full(seq_len, IGNORE)
  targets[1:2 * n:2][scored] = pairs[scored, 1]
  targets[-1] = value_of[probe]
  return tokens[:-1], (tokens if is_training else targets)[1:]


def noisy_in_context_recall(rng: np.random.Generator, vocab_size: int = 32, seq_len: int = 128,
                            noise_vocab_size: int = 16, frac_noise: float = 0.2,
                            is_training: bool = False) -> tuple:
  """``in_context_recall`` with MAD's noisy-recall defaults (16 of 32 tokens noise, 20%)."""
  return in_context_recall(rng, vocab_size, seq_len, noise_vocab_size, frac_noise, is_training)


def fuzzy_in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                            k_motif_size: int = 3, v_motif_size: int = 3,
                            is_training: bool = False) -> tuple:
  """Recall of multi-token keys and values (MAD's fuzzy in-context recall, multi-query).

  Keys are motifs of 1..``k_motif_size`` distinct tokens of ``[0, C/2)`` (test keys: exactly
  ``k_motif_size``), values of 1..``v_motif_size`` distinct tokens of ``[C/2, C)``, ``C =
  vocab_size - 1``; ``vocab_size - 1`` pads the sequence on the left to ``seq_len + 1`` tokens.
  A probe pair is put in the context at a random place and repeated at the end. Returns
  ``(inputs [seq_len], targets [seq_len])`` shifted like ``in_context_recall``: scored are the
  tokens of the value of a key seen before, and of the final value.
  """
  pad, clean = vocab_size - 1, vocab_size - 1
  key_vocab, value_vocab = np.arange(clean // 2), np.arange(clean // 2, clean)
  if len(key_vocab) < k_motif_size or len(value_vocab) < v_motif_size:
    raise ValueError(f"vocab_size={vocab_size} has too few tokens for motifs of "
                     f"{k_motif_size} / {v_motif_size} distinct tokens")
  longest = k_motif_size + v_motif_size
  if seq_len < 3 * longest:
    raise ValueError(f"seq_len={seq_len} must be >= 3 * (k_motif_size + v_motif_size)")
  key_sizes = np.arange(1, k_motif_size + 1) if is_training else np.array([k_motif_size])

  def motif(vocab, size):  # uniform over ordered tuples of distinct tokens
    return tuple(int(t) for t in rng.permutation(vocab)[:size])

  new_key = lambda: motif(key_vocab, rng.choice(key_sizes))
  new_value = lambda: motif(value_vocab, rng.integers(1, v_motif_size + 1))
  probe_key, probe_value = new_key(), new_value()
  probe_len = len(probe_key) + len(probe_value)
  probe_at = rng.integers(seq_len - 2 * probe_len)  # MAD's position of the probe pair
  end = seq_len - probe_len - longest  # the context stops growing at this length
  value_of, presented, tokens, targets = {probe_key: probe_value}, set(), [], []
  while len(tokens) < end:
    # MAD inserts the probe pair at probe_at; here also at the last chance before the end.
    if probe_key not in presented and (len(tokens) >= probe_at or len(tokens) + longest >= end):
      key = probe_key
    else:
      key = new_key()
    if key not in value_of:
      value_of[key] = new_value()
    value = value_of[key]
    tokens += key + value
    targets += [IGNORE] * len(key) + (list(value) if key in presented else [IGNORE] * len(value))
    presented.add(key)
  tokens += probe_key + probe_value
  targets += [IGNORE] * len(probe_key) + list(probe_value)
  n_pad = seq_len + 1 - len(tokens)
  tokens = np.array([pad] * n_pad + tokens)
  targets = np.array([IGNORE] * n_pad + targets)
  return tokens[:-1], (tokens if is_training else targets)[1:]


def selective_copying(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 256,
                      num_tokens_to_copy: int = 16) -> tuple:
  """MAD's selective copying: ``num_tokens_to_copy`` tokens of ``[0, vocab_size - 2)`` with
  ``seq_len - 2 n - 1`` blanks (``vocab_size - 2``) before them (as in mad-lab, each blank goes
  before a uniformly chosen token to copy, so the last one is next to the copy token), the copy
  token ``vocab_size - 1``, then ``n`` blanks; targets: IGNORE, then the tokens in order at the
  last ``n`` positions (no shift: the model outputs them while reading the blanks)."""
  n = num_tokens_to_copy
  blanks = seq_len - 2 * n - 1
  if blanks < 1 or vocab_size < 3:
    raise ValueError(f"need seq_len > 2 * num_tokens_to_copy + 1 and vocab_size >= 3; got "
                     f"seq_len={seq_len}, num_tokens_to_copy={n}, vocab_size={vocab_size}")
  blank, copy = vocab_size - 2, vocab_size - 1
  to_copy = rng.integers(0, vocab_size - 2, n)
  before = rng.multinomial(blanks, np.full(n, 1 / n))  # blanks before each token to copy
  inputs = np.full(seq_len, blank)
  inputs[np.cumsum(before) + np.arange(n)] = to_copy
  inputs[blanks + n] = copy
  targets = np.full(seq_len, IGNORE)
  targets[-n:] = to_copy
  return inputs, targets


def compression(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 32) -> tuple:
  """MAD's compression: ``seq_len - 1`` tokens of ``[0, vocab_size - 1)`` and the compression
  token ``vocab_size - 1``; the targets are the inputs (every position scored)."""
  inputs = np.concatenate([rng.integers(0, vocab_size - 1, seq_len - 1), [vocab_size - 1]])
  return inputs, inputs.copy()


@functools.lru_cache(maxsize=None)
def memorization_facts(vocab_size: int = 256, seed: int = FACTS_SEED) -> np.ndarray:
  """The fixed table of memorisation: ``value_of[key]`` for keys ``[0, C/2)``, distinct values
  of ``[C/2, C)``, ``C = vocab_size - 1`` (MAD's ``generate_kv_map`` pairs shuffled keys with
  shuffled values: ``C // 2`` facts, 127 for vocabulary 256). Read-only."""
  clean = vocab_size - 1
  rng = np.random.default_rng(seed)
  keys = rng.permutation(clean // 2)
  values = rng.permutation(np.arange(clean // 2, clean))[:len(keys)]
  value_of = np.empty(len(keys), np.int64)
  value_of[keys] = values
  value_of.flags.writeable = False
  return value_of


def memorization(rng: np.random.Generator, vocab_size: int = 256, seq_len: int = 32,
                 facts_seed: int = FACTS_SEED) -> tuple:
  """MAD's memorisation: ``seq_len / 2`` pairs (key, insert token ``vocab_size - 1``); the
  target at each insert token is the key's value in ``memorization_facts`` (no shift)."""
  value_of = memorization_facts(vocab_size, facts_seed)
  keys = rng.integers(0, len(value_of), seq_len // 2)
  inputs = np.stack([keys, np.full_like(keys, vocab_size - 1)], 1).reshape(-1)
  targets = np.stack([np.full_like(keys, IGNORE), value_of[keys]], 1).reshape(-1)
  return inputs, targets


# ---------------------------------------------------------------------------------------------
# Tasks and datasets
# ---------------------------------------------------------------------------------------------

class Task(NamedTuple):
  """A task of the suite: its generator (MAD's baseline settings as defaults), how tables name it,
  MAD's number of training sequences, and whether it trains on every next token (recall)."""

  generate: Callable[..., tuple]
  title: str
  train_examples: int
  lm_training: bool


TASKS = {
    "in_context_recall": Task(in_context_recall, "In-context recall", 12_800, True),
    "fuzzy_in_context_recall": Task(fuzzy_in_context_recall, "Fuzzy in-context recall", 12_800,
                                    True),
    "noisy_in_context_recall": Task(noisy_in_context_recall, "Noisy in-context recall", 12_800,
                                    True),
    "selective_copying": Task(selective_copying, "Selective copying", 12_800, False),
    "compression": Task(compression, "Compression", 12_800, False),
    "memorization": Task(memorization, "Memorisation", 256, False),
}
TASK_IDS = {name: i for i, name in enumerate(TASKS)}

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
# memorisation); pad_to: batches padded on the right to this length (None: the task's own).
PRESETS = {
    "tiny": dict(epochs=2, batch_size=16, train_examples=32, test_examples=32, lrs=(1e-3,),
                 weight_decays=(0.0,), task_settings=TINY_TASKS, pad_to=32),
    "cpu": dict(epochs=2, batch_size=128, train_examples=1280, test_examples=256, lrs=(1e-3,),
                weight_decays=(0.0,), task_settings={}, pad_to=None),
    "paper": dict(epochs=200, batch_size=128, train_examples=None, test_examples=1280,
                  lrs=(1e-4, 5e-4, 1e-3), weight_decays=(0.0, 0.1), task_settings={},
                  pad_to=None),
}


def task_kwargs(name: str, settings: Optional[dict] = None) -> dict:
  """The generator arguments of task ``name`` at a scale: MAD's defaults with the scale's changes
  (``settings["task_settings"][name]``)."""
  import inspect  # pylint: disable=g-import-not-at-top
  params = inspect.signature(TASKS[name].generate).parameters
  kwargs = {k: p.default for k, p in params.items() if k not in ("rng", "is_training")}
  kwargs.update(((settings or {}).get("task_settings") or {}).get(name, {}))
  return kwargs


def generate(name: str, n: int, seed: int, is_training: bool, **kwargs) -> tuple:
  """``n`` examples of task ``name``: ``(inputs [n, L], targets [n, L])`` int32, targets IGNORE
  where not scored. A pure function of the arguments; the test set is drawn with ``seed +
  TEST_SEED_OFFSET`` (``dataset``)."""
  task = TASKS[name]
  rng = np.random.default_rng([seed, TASK_IDS[name], int(is_training)])
  extra = dict(is_training=is_training) if task.lm_training else {}
  rows = [task.generate(rng, **kwargs, **extra) for _ in range(n)]
  return (np.stack([r[0] for r in rows]).astype(np.int32),
          np.stack([r[1] for r in rows]).astype(np.int32))


def dataset(name: str, settings: dict, seed: int) -> dict:
  """The training and test sets of task ``name`` at a scale: ``{"train": (inputs, targets),
  "test": (inputs, targets), "kwargs": generator arguments, "vocab_size", "length"}``."""
  kwargs = task_kwargs(name, settings)
  n_train = TASKS[name].train_examples
  if settings.get("train_examples"):
    n_train = min(n_train, settings["train_examples"])
  if n_train < settings["batch_size"]:
    raise ValueError(f"{name}: {n_train} training sequences are fewer than a batch "
                     f"(batch_size={settings['batch_size']})")
  train = generate(name, n_train, seed, True, **kwargs)
  test = generate(name, settings["test_examples"], seed + TEST_SEED_OFFSET, False, **kwargs)
  return {"train": train, "test": test, "kwargs": kwargs, "vocab_size": kwargs["vocab_size"],
          "length": train[0].shape[1]}


def to_batch(inputs: np.ndarray, targets: np.ndarray, width: Optional[int] = None) -> study.Batch:
  """``study.Batch``: mask 1 where the target is scored, IGNORE targets set to 0; rows padded on
  the right to ``width`` tokens (token 0, not scored; the models are causal)."""
  mask = targets != IGNORE
  targets = np.where(mask, targets, 0)
  if width is not None and width > inputs.shape[1]:
    pad = ((0, 0), (0, width - inputs.shape[1]))
    inputs, targets, mask = np.pad(inputs, pad), np.pad(targets, pad), np.pad(mask, pad)
  return study.Batch(inputs.astype(np.int32), targets.astype(np.int32), mask.astype(np.float32))


def train_batch_fn(data: tuple, batch_size: int, seed: int, width: Optional[int]):
  """step -> the training ``Batch`` of that step: the training set reshuffled every epoch (a
  permutation drawn from ``(seed, epoch)``), ``len // batch_size`` batches an epoch."""
  inputs, targets = data
  per_epoch = len(inputs) // batch_size

  @functools.lru_cache(maxsize=2)
  def order(epoch):
    return np.random.default_rng([seed, epoch]).permutation(len(inputs))

  def batch_fn(step):
    rows = order(step // per_epoch)[(step % per_epoch) * batch_size:][:batch_size]
    return to_batch(inputs[rows], targets[rows], width)
  return batch_fn


def test_batches(data: tuple, batch_size: int, width: Optional[int]) -> list:
  """The test set in batches of ``batch_size`` rows (the last one padded with unscored rows)."""
  inputs, targets = data
  out = []
  for start in range(0, len(inputs), batch_size):
    x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
    if len(x) < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - len(x), x.shape[1]), x.dtype)])
      y = np.concatenate([y, np.full((batch_size - len(y), y.shape[1]), IGNORE, y.dtype)])
    out.append(to_batch(x, y, width))
  return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def known_families() -> list:
  """The families of ``configs/*.py``."""
  return sorted(f[:-3] for f in os.listdir(os.path.join(study.REPO, "configs"))
                if f.endswith(".py"))


def model_config(family: str, vocab_size: int, seq_len: int, d_model: int = D_MODEL):
  """MAD's model in ``family``: ``configs/<family>.py:tiny`` at width ``d_model``, 2 blocks, an
  untied head, SwiGLU width 352 (HOPE: two CMS levels of 176).
  """
  mlp_dim = SWIGLU_WIDTH // 2 if family == "hope" else SWIGLU_WIDTH
  return study.model_config(family, vocab_size=vocab_size, d_model=d_model, n_layers=2,
                            mlp_dim=mlp_dim, max_seq_len=seq_len, tie_embeddings=False)


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
  tests = test_batches(data["test"], batch, width)
  result = study.train(model, train_batch_fn(data["train"], batch, seed, width), per_epoch * epochs,
                       seed=seed, tx=mad_optimizer(lr, weight_decay, epochs, per_epoch),
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
          "diverged_at_step": diverged, "train_seconds": result.seconds,
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


def parse_list(flag: str, value: Optional[str], known: Sequence[str]) -> list:
  """Comma-separated ``value`` of ``flag`` (all of ``known`` when None); unknown names raise."""
  if value is None:
    return list(known)
  names = [v.strip() for v in value.split(",") if v.strip()]
  if not names:
    raise ValueError(f"{flag}: empty list")
  for n in names:
    if n not in known:
      raise ValueError(f"{flag}: unknown value {n!r}; allowed: {', '.join(known)}")
  return names


def parse_floats(flag: str, value: Optional[str]) -> Optional[tuple]:
  """``"1e-4,1e-3"`` -> ``(1e-4, 1e-3)``; None stays None; ValueError names the flag."""
  if value is None:
    return None
  try:
    values = tuple(float(x) for x in value.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{flag}: expected comma-separated numbers, got {value!r}") from None
  if not values or min(values) < 0:
    raise ValueError(f"{flag}: expected non-negative numbers, got {value!r}")
  return values


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = study.arg_parser(__doc__, STUDY, scales=SCALES, scale_help=(
      "tiny: every task and model in minutes on 2 CPU cores (a pipeline check); cpu: about 65 "
      "min on 2 CPU cores (2 epochs of 1,280 sequences, one grid point); paper: MAD's settings"))
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
  args = parser.parse_args(argv)
  tasks = parse_list("--tasks", args.tasks, tuple(TASKS))
  models = parse_list("--models", args.models, known_families()) if args.models else list(MODELS)
  for flag in ("epochs", "batch_size", "train_examples", "test_examples"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise ValueError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
  settings = study.scale_settings(
      PRESETS, args.scale, epochs=args.epochs, batch_size=args.batch_size,
      train_examples=args.train_examples, test_examples=args.test_examples,
      lrs=parse_floats("--lrs", args.lrs),
      weight_decays=parse_floats("--weight_decays", args.weight_decays))
  command = None if argv is None else "python experiments/mad.py " + " ".join(argv)
  start, runs, info = time.time(), [], {}
  total = len(tasks) * len(models) * len(settings["lrs"]) * len(settings["weight_decays"])
  out = None
  for name in tasks:
    data = dataset(name, settings, args.seed)
    info[name] = {"title": TASKS[name].title, "generator": data["kwargs"],
                  "train_examples": len(data["train"][0]), "test_examples": len(data["test"][0]),
                  "length": data["length"],
                  "scored_per_test_sequence": float((data["test"][1] != IGNORE).sum(1).mean()),
                  "paper_hope": PAPER_HOPE[name]}
    for family in models:
      for lr in settings["lrs"]:
        for wd in settings["weight_decays"]:
          runs.append(run_one(name, family, data, lr, wd, settings, args.seed))
          r = runs[-1]
          print(f"[{len(runs)}/{total}] {name:24s} {family:15s} lr={lr:g} wd={wd:g}: accuracy "
                f"{100 * r['accuracy']:.1f} (token {100 * r['token_accuracy']:.1f}) "
                f"({r['train_seconds']:.0f} s)", flush=True)
      out = write(args, settings, tasks, models, info, runs, time.time() - start,
                  complete=len(runs) == total, command=command)
  return out


def write(args, settings: dict, tasks, models, info: dict, runs: list, seconds: float,
          complete: bool, command: Optional[str] = None) -> dict:
  """Writes the outputs of the runs so far (after every task and model, so that a cut-short run
  leaves its finished runs on disk); the figure when ``complete``."""
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
  fig = plot(runs, [t for t in tasks if t in info], models) if complete else None
  if complete:
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
