"""The six tasks of the MAD synthetic suite (Poli et al., 2024, "Mechanistic Design and Scaling of
Hybrid Architectures"): generators, datasets and batches of ``experiments.mad``.

The generators re-implement those of the MAD reference code (``athms/mad-lab``:
``mad/data/instances.py``, settings from ``configs/tasks/*.yml`` and ``mad/configs.py``), with
their defaults the MAD baselines:

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

Generators: the distributions of mad-lab's, not its random streams (a data set is a pure
function of the seed, the task and the split). Two corrections: fuzzy recall's probe pair is put
in the context even when mad-lab's probe position falls after the context's end (mad-lab then
scores a final value whose key may never have appeared), and selective copying draws its blank
positions from the seeded generator (mad-lab uses numpy's global one).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import numpy as np

if __package__:
  from experiments import study
else:  # imported by `python experiments/mad.py`, from this folder
  import study  # pylint: disable=import-error

IGNORE = -100  # MAD's target_ignore_index: a position that is not scored
TEST_SEED_OFFSET = 1_000_003  # test data: seed + offset (disjoint from every training seed)
FACTS_SEED = 12345  # MAD's seed of the memorisation table (MADConfig.seed)


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
