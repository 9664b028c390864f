"""Synthetic task generators.

Multi-query associative recall (MQAR, as in Zoology): a context of key-value pairs followed by
queries, each a key seen in the context whose next token must be the value paired with it.

Every example is a pure function of ``(seed, index)``: the generator is seeded with
``np.random.default_rng([seed, index])``, so the data a run sees never depends on the number of
hosts, the batch split or restarts (as for training data: docs/TRAINING.md, "Data"). A batch is the
stack of consecutive global indices.

Vocabulary layout (``vocab_size = V``)::

  0                    pad (positions after the queries)
  1 .. K               keys,   K = (V - 1) // 2
  K + 1 .. V - 1       values, V - 1 - K of them

Sequence layout (``P = num_pairs``, ``Q = num_queries``)::

  k_1 v_1 k_2 v_2 ... k_P v_P   q_1 a_1 q_2 a_2 ... q_Q a_Q   0 0 ... 0
  \\_______ context ________/   \\________ queries ________/   \\ pad /

Keys in the context are distinct; values are drawn with replacement; the queries are distinct keys
of the context in random order, and ``a_i`` is the value paired with ``q_i``. ``targets[t]`` is the
next token the model must predict at position t, and ``mask`` is True only at the query positions
(where ``targets`` holds the answer); elsewhere ``targets`` is 0 and ignored.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

PAD = 0


class MQARVocab(NamedTuple):
  """Token ranges of MQAR: keys in ``[key_lo, key_hi)``, values in ``[value_lo, value_hi)``."""

  key_lo: int
  key_hi: int
  value_lo: int
  value_hi: int

  @property
  def num_keys(self) -> int:
    return self.key_hi - self.key_lo

  @property
  def num_values(self) -> int:
    return self.value_hi - self.value_lo


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
  return int(value)


def mqar_vocab(vocab_size: int) -> MQARVocab:
  """The disjoint key and value ranges of an MQAR vocabulary of ``vocab_size`` tokens."""
  vocab_size = _check_int("vocab_size", vocab_size, 3)
  num_keys = (vocab_size - 1) // 2
  return MQARVocab(1, 1 + num_keys, 1 + num_keys, vocab_size)


def check_mqar_args(*, num_pairs: int, seq_len: int, vocab_size: int, num_queries: int) -> None:
  """Raises ValueError naming the field if the MQAR arguments are inconsistent."""
  num_pairs = _check_int("num_pairs", num_pairs, 1)
  num_queries = _check_int("num_queries", num_queries, 1)
  seq_len = _check_int("seq_len", seq_len, 2)
  vocab_size = _check_int("vocab_size", vocab_size, 3)
  if num_queries > num_pairs:
    raise ValueError(f"num_queries must be <= num_pairs = {num_pairs} (each query is a distinct "
                     f"key of the context); got {num_queries}")
  need = 2 * (num_pairs + num_queries)
  if seq_len < need:
    raise ValueError(f"seq_len must be >= 2 * (num_pairs + num_queries) = {need} to hold "
                     f"{num_pairs} key-value pairs and {num_queries} query-answer pairs; "
                     f"got {seq_len}")
  vocab = mqar_vocab(vocab_size)
  if vocab.num_keys < num_pairs:
    raise ValueError(f"vocab_size must be >= 2 * num_pairs + 1 = {2 * num_pairs + 1} (pad token 0, "
                     f"then disjoint key and value ranges with at least num_pairs = {num_pairs} "
                     f"distinct keys); got {vocab_size}, which leaves {vocab.num_keys} keys")


def mqar(seed: int, index: int, *, num_pairs: int, seq_len: int, vocab_size: int,
         num_queries: int) -> dict[str, np.ndarray]:
  """One MQAR example, a pure function of ``(seed, index)``.

  Returns:
    ``{"tokens": int32 [seq_len], "targets": int32 [seq_len], "mask": bool [seq_len]}``.
  """
  check_mqar_args(num_pairs=num_pairs, seq_len=seq_len, vocab_size=vocab_size,
                  num_queries=num_queries)
  seed = _check_int("seed", seed, 0)
  index = _check_int("index", index, 0)
  return _mqar(seed, index, num_pairs, seq_len, mqar_vocab(vocab_size), num_queries)


def _mqar(seed, index, num_pairs, seq_len, vocab: MQARVocab, num_queries):
  rng = np.random.default_rng([seed, index])
  keys = vocab.key_lo + rng.choice(vocab.num_keys, size=num_pairs, replace=False)
  values = rng.integers(vocab.value_lo, vocab.value_hi, size=num_pairs)
  asked = rng.choice(num_pairs, size=num_queries, replace=False)

  tokens = np.full(seq_len, PAD, np.int32)
  targets = np.zeros(seq_len, np.int32)
  mask = np.zeros(seq_len, bool)
  ctx = 2 * num_pairs
  tokens[0:ctx:2] = keys
  tokens[1:ctx:2] = values
  end = ctx + 2 * num_queries
  tokens[ctx:end:2] = keys[asked]
  tokens[ctx + 1:end:2] = values[asked]
  targets[ctx:end:2] = values[asked]
  mask[ctx:end:2] = True
  return {"tokens": tokens, "targets": targets, "mask": mask}


def mqar_batch(seed: int, start_index: int, batch_size: int, *, num_pairs: int, seq_len: int,
               vocab_size: int, num_queries: int) -> dict[str, np.ndarray]:
  """Examples ``start_index`` .. ``start_index + batch_size - 1``, stacked: ``[batch, seq]``."""
  check_mqar_args(num_pairs=num_pairs, seq_len=seq_len, vocab_size=vocab_size,
                  num_queries=num_queries)
  seed = _check_int("seed", seed, 0)
  start_index = _check_int("start_index", start_index, 0)
  batch_size = _check_int("batch_size", batch_size, 1)
  vocab = mqar_vocab(vocab_size)
  examples = [_mqar(seed, start_index + i, num_pairs, seq_len, vocab, num_queries)
              for i in range(batch_size)]
  return {name: np.stack([ex[name] for ex in examples]) for name in examples[0]}
