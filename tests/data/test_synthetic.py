"""MQAR generator: determinism in (seed, index), correct answers, layout, argument validation."""

import numpy as np
import pytest

from nlx.data import mqar, mqar_batch, mqar_vocab
from nlx.data.synthetic import PAD

TASK = dict(num_pairs=8, seq_len=40, vocab_size=64, num_queries=6)


def test_same_seed_and_index_give_the_same_example():
  a = mqar(3, 17, **TASK)
  b = mqar(3, 17, **TASK)
  for name in ("tokens", "targets", "mask"):
    np.testing.assert_array_equal(a[name], b[name])


def test_different_indices_and_seeds_differ():
  tokens = {tuple(mqar(0, i, **TASK)["tokens"]) for i in range(50)}
  assert len(tokens) == 50
  assert not np.array_equal(mqar(0, 5, **TASK)["tokens"], mqar(1, 5, **TASK)["tokens"])


def test_dtypes_and_shapes():
  ex = mqar(0, 0, **TASK)
  assert ex["tokens"].shape == ex["targets"].shape == ex["mask"].shape == (TASK["seq_len"],)
  assert ex["tokens"].dtype == np.int32 and ex["targets"].dtype == np.int32
  assert ex["mask"].dtype == bool
  assert ex["mask"].sum() == TASK["num_queries"]


def test_batch_is_the_stack_of_examples():
  batch = mqar_batch(7, 100, 5, **TASK)
  for name in ("tokens", "targets", "mask"):
    assert batch[name].shape == (5, TASK["seq_len"])
    expected = np.stack([mqar(7, 100 + i, **TASK)[name] for i in range(5)])
    np.testing.assert_array_equal(batch[name], expected)
  # Splitting a global batch across "hosts" gives the same examples.
  whole = mqar_batch(7, 0, 8, **TASK)["tokens"]
  halves = np.concatenate([mqar_batch(7, 0, 4, **TASK)["tokens"],
                           mqar_batch(7, 4, 4, **TASK)["tokens"]])
  np.testing.assert_array_equal(whole, halves)


@pytest.mark.parametrize("task", [
    TASK,
    dict(num_pairs=1, seq_len=4, vocab_size=3, num_queries=1),
    dict(num_pairs=16, seq_len=64, vocab_size=128, num_queries=16),
    dict(num_pairs=5, seq_len=33, vocab_size=200, num_queries=2),
])
def test_answers_are_the_values_paired_with_the_queried_keys(task):
  vocab = mqar_vocab(task["vocab_size"])
  p, q = task["num_pairs"], task["num_queries"]
  for index in range(20):
    ex = mqar(11, index, **task)
    tokens, targets, mask = ex["tokens"], ex["targets"], ex["mask"]
    keys, values = tokens[0:2 * p:2], tokens[1:2 * p:2]
    assert len(set(keys.tolist())) == p  # distinct keys
    assert np.all((keys >= vocab.key_lo) & (keys < vocab.key_hi))
    assert np.all((values >= vocab.value_lo) & (values < vocab.value_hi))
    pairs = dict(zip(keys.tolist(), values.tolist()))
    positions = np.flatnonzero(mask)
    assert len(positions) == q
    queried = tokens[positions]
    assert len(set(queried.tolist())) == q  # distinct queries
    for t in positions:
      assert t >= 2 * p  # queries come after the context
      assert targets[t] == pairs[int(tokens[t])]
      assert tokens[t + 1] == targets[t]  # the answer follows its query (teacher forcing)
    assert np.all(targets[~mask] == 0)
    assert np.all(tokens[2 * (p + q):] == PAD)


def test_vocab_ranges_are_disjoint():
  v = mqar_vocab(64)
  assert v.key_lo == 1 and v.key_hi == v.value_lo and v.value_hi == 64
  assert v.num_keys == 31 and v.num_values == 32


@pytest.mark.parametrize("override, field, pattern", [
    (dict(seq_len=20), "seq_len", r"seq_len must be >= 2 \* \(num_pairs \+ num_queries\) = 28"),
    (dict(vocab_size=16), "vocab_size", r"vocab_size must be >= 2 \* num_pairs \+ 1 = 17.*got 16"),
    (dict(num_queries=9), "num_queries", r"num_queries must be <= num_pairs = 8.*got 9"),
    (dict(num_pairs=0), "num_pairs", r"num_pairs must be an int >= 1; got 0"),
    (dict(num_queries=0), "num_queries", r"num_queries must be an int >= 1"),
    (dict(num_pairs=2.5), "num_pairs", r"num_pairs must be an int >= 1; got 2.5"),
    (dict(vocab_size=2), "vocab_size", r"vocab_size must be an int >= 3; got 2"),
])
def test_bad_arguments_are_refused_with_the_field_named(override, field, pattern):
  task = dict(TASK, **override)
  with pytest.raises(ValueError, match=pattern):
    mqar(0, 0, **task)
  with pytest.raises(ValueError, match=field):
    mqar_batch(0, 0, 2, **task)


def test_bad_seed_index_and_batch_size_are_refused():
  with pytest.raises(ValueError, match="seed must be an int >= 0; got -1"):
    mqar(-1, 0, **TASK)
  with pytest.raises(ValueError, match="index must be an int >= 0"):
    mqar(0, -3, **TASK)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
    mqar_batch(0, 0, 0, **TASK)
  with pytest.raises(ValueError, match="start_index must be an int >= 0"):
    mqar_batch(0, -1, 2, **TASK)
