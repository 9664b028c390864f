"""experiments.mad and experiments.mad_tasks: the invariants of the six MAD generators (answers in
the context, motifs, noise, copying, reconstruction, the fixed memorisation table, target
positions, disjoint seeds), MAD's accuracy and optimizer, bad flags, and the main path at the
smallest size (1 task, 1 model, 2 steps)."""

import json
import os

import numpy as np
import optax
import pytest

from experiments import mad, mad_tasks

IGNORE = mad_tasks.IGNORE


def examples(fn, n, seed=0, **kwargs):
  rng = np.random.default_rng(seed)
  return [fn(rng, **kwargs) for _ in range(n)]


def test_recall_answers_are_pairs_of_the_context_and_targets_are_next_tokens():
  for fn in (mad_tasks.in_context_recall, mad_tasks.noisy_in_context_recall):
    for inputs, targets in examples(fn, 50):
      assert inputs.shape == targets.shape == (127,)
      scored = np.flatnonzero(targets != IGNORE)
      assert scored[-1] == 126  # the final query
      for i in scored:
        key, value = inputs[i], targets[i]
        if i + 1 < len(inputs):
          assert inputs[i + 1] == value  # the target is the next token
        earlier = [j for j in range(i - 1) if inputs[j] == key and inputs[j + 1] == value]
        assert earlier and all(j % 2 == 0 for j in earlier)  # a context pair (key, value)
      # keys sit at even positions and keep one value within the sequence
      pairs = {}
      for k, v in inputs[:-1].reshape(-1, 2):
        if k < 8:
          assert pairs.setdefault(k, v) == v and 8 <= v < 16
    # training targets are every next token of the same sequence (MAD trains on all of them)
    test = fn(np.random.default_rng(3))
    train = fn(np.random.default_rng(3), is_training=True)
    np.testing.assert_array_equal(test[0], train[0])
    np.testing.assert_array_equal(train[1][:-1], train[0][1:])
    scored = test[1] != IGNORE
    np.testing.assert_array_equal(test[1][scored], train[1][scored])


def test_noise_tokens_are_context_only_and_about_a_fifth_of_the_pairs():
  noise_pairs = total_pairs = 0
  for inputs, targets in examples(mad_tasks.noisy_in_context_recall, 100):
    is_noise = inputs >= 16  # tokens 16-31
    scored = targets != IGNORE
    assert not (is_noise & scored).any() and (targets[scored] < 16).all()
    pairs = is_noise[:-1].reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all()  # noise comes as whole pairs
    assert not is_noise[-1]  # the final query's key
    noise_pairs += pairs[:, 0].sum()
    total_pairs += len(pairs)
  assert 0.15 < noise_pairs / total_pairs < 0.25  # frac_noise 0.2
  plain = np.concatenate([x for x, _ in examples(mad_tasks.in_context_recall, 20)])
  assert plain.max() < 16 and plain.min() >= 0


def parse_fuzzy(tokens, pad=15):
  """[(key motif, value motif, first position of the value)] of a full fuzzy sequence."""
  i = 0
  while tokens[i] == pad:
    i += 1
  out = []
  while i < len(tokens):
    k0 = i
    while i < len(tokens) and tokens[i] < 7:
      i += 1
    v0 = i
    while i < len(tokens) and 7 <= tokens[i] < 15:
      i += 1
    out.append((tuple(tokens[k0:v0]), tuple(tokens[v0:i]), v0))
  return out


def test_fuzzy_keys_and_values_are_motifs_and_answers_are_in_the_context():
  key_sizes, value_sizes = set(), set()
  for inputs, targets in examples(mad_tasks.fuzzy_in_context_recall, 40):
    assert inputs.shape == targets.shape == (128,)
    tokens = np.concatenate([inputs, targets[-1:]])  # the full sequence
    scored = np.zeros(len(tokens), bool)
    scored[1:] = targets != IGNORE  # scored[j]: token j is a scored target
    motifs = parse_fuzzy(tokens)
    seen = {}
    for key, value, at in motifs:
      assert len(key) == 3 and 1 <= len(value) <= 3  # test keys: 3 tokens
      assert len(set(key)) == len(key) and len(set(value)) == len(value)
      value_sizes.add(len(value))
      span = scored[at:at + len(value)]
      assert span.all() == span.any()  # a value is scored whole or not at all
      assert span.all() == (key in seen)  # scored iff its key came before ...
      if key in seen:
        assert seen[key] == value  # ... with this value
      seen.setdefault(key, value)
    assert scored[-len(motifs[-1][1]):].all()  # the final value
    repeated = [len(v) for i, (k, v, _) in enumerate(motifs) if k in [m[0] for m in motifs[:i]]]
    assert scored.sum() == sum(repeated)  # nothing else is scored
  for inputs, _ in examples(mad_tasks.fuzzy_in_context_recall, 40, is_training=True):
    for key, value, _ in parse_fuzzy(inputs):
      key_sizes.add(len(key))
  assert key_sizes == {1, 2, 3} and value_sizes == {1, 2, 3}


def test_selective_copying_targets_are_the_tokens_in_order():
  for inputs, targets in examples(mad_tasks.selective_copying, 30):
    assert inputs.shape == targets.shape == (256,)
    copy_at = int(np.flatnonzero(inputs == 15)[0])
    assert (inputs == 15).sum() == 1 and copy_at == 256 - 16 - 1
    context = inputs[:copy_at]
    to_copy = context[context != 14]  # the non-blank tokens, in order
    assert len(to_copy) == 16 and (inputs[copy_at + 1:] == 14).all()
    np.testing.assert_array_equal(targets[-16:], to_copy)
    assert (targets[:-16] == IGNORE).all()


def test_compression_target_is_the_input():
  for inputs, targets in examples(mad_tasks.compression, 20):
    np.testing.assert_array_equal(inputs, targets)
    assert inputs.shape == (32,) and inputs[-1] == 15 and (inputs[:-1] < 15).all()


def test_memorization_facts_are_fixed_and_shared_by_train_and_test():
  value_of = mad_tasks.memorization_facts(256)
  assert len(value_of) == 127 and len(set(value_of.tolist())) == 127
  assert value_of.min() >= 127 and value_of.max() <= 254
  settings = dict(mad.PRESETS["tiny"], task_settings={}, train_examples=32, test_examples=32)
  a = mad_tasks.dataset("memorization", settings, seed=0)
  b = mad_tasks.dataset("memorization", settings, 7)
  for data in (a["train"], a["test"], b["train"]):
    inputs, targets = data
    assert (inputs[:, 1::2] == 255).all() and (targets[:, ::2] == IGNORE).all()
    np.testing.assert_array_equal(targets[:, 1::2], value_of[inputs[:, ::2]])


def test_scored_targets_sit_where_each_task_scores():
  # recall: at a key (the next token is its value); memorisation: at the insert token; selective
  # copying: after the copy token; compression: everywhere
  for inputs, targets in examples(mad_tasks.in_context_recall, 10):
    assert (inputs[targets != IGNORE] < 8).all() and (targets[targets != IGNORE] >= 8).all()
  for inputs, targets in examples(mad_tasks.memorization, 10):
    np.testing.assert_array_equal(targets != IGNORE, inputs == 255)
  for inputs, targets in examples(mad_tasks.selective_copying, 10):
    np.testing.assert_array_equal(targets != IGNORE, np.arange(256) >= 240)
  batch = mad_tasks.to_batch(*mad_tasks.generate("in_context_recall", 4, 0, False, seq_len=16),
                             width=20)
  assert batch.inputs.shape == (4, 20) and batch.mask[:, 15:].sum() == 0
  assert (batch.targets[batch.mask == 0] == 0).all() and batch.mask[:, 14].all()


def test_data_is_deterministic_and_train_and_test_are_disjoint():
  settings = dict(mad.PRESETS["cpu"], train_examples=128, test_examples=64)
  for name in mad_tasks.TASKS:
    data = mad_tasks.dataset(name, settings, seed=5)
    again = mad_tasks.dataset(name, settings, seed=5)
    np.testing.assert_array_equal(data["train"][0], again["train"][0])
    np.testing.assert_array_equal(data["test"][1], again["test"][1])
    assert not np.array_equal(data["train"][0], mad_tasks.dataset(name, settings, 6)["train"][0])
    train = {row.tobytes() for row in data["train"][0]}
    assert not any(row.tobytes() in train for row in data["test"][0]), name
  assert len(mad_tasks.dataset("memorization", settings, 0)["train"][0]) == 128  # MAD: 256 at most


def test_mad_accuracy_is_macro_over_classes():
  predicted = np.array([[1, 1, 2, 3, 0]])
  targets = np.array([[1, 1, 1, 2, 0]])
  mask = np.array([[1, 1, 1, 1, 0]])
  s = mad.score(predicted, targets, mask)
  # class 1: 2/3 right, class 2: 0/1, class 3: predicted only (0); class 0 unscored
  assert s["accuracy"] == pytest.approx((2 / 3 + 0 + 0) / 3)
  assert s["token_accuracy"] == pytest.approx(2 / 4) and s["scored"] == 4


def test_optimizer_follows_mads_per_epoch_cosine():
  tx = mad.mad_optimizer(1e-2, 0.5, epochs=4, steps_per_epoch=2)
  params = {"w": np.ones(3, np.float32)}
  state, rates = tx.init(params), []
  for _ in range(8):  # zero gradients: the update is the weight decay, -lr_t * 0.5 * w
    updates, state = tx.update({"w": np.zeros(3, np.float32)}, state, params)
    rates.append(-float(updates["w"][0]) / 0.5 / float(params["w"][0]))
    params = optax.apply_updates(params, updates)
  expected = [mad.MIN_LR + (1e-2 - mad.MIN_LR) * (1 + np.cos(np.pi * e / 4)) / 2
              for e in (0, 0, 1, 1, 2, 2, 3, 3)]
  np.testing.assert_allclose(rates, expected, rtol=1e-4)


def test_time_budget_stops_between_runs_and_keeps_what_ran(tmp_path):
  out = mad.main(["--scale", "tiny", "--tasks", "compression", "--models", "transformer",
                  "--lrs", "1e-3,5e-4", "--time_budget", "1e-9", "--out", str(tmp_path)])
  assert len(out["runs"]) == 1 and not out["complete"] and out["runs"][0]["lr"] == 1e-3
  md = open(out["paths"]["md"]).read()
  assert "runs: 1 of 2 (the rest did not run)" in md and os.path.exists(out["paths"]["png"])
  with pytest.raises(ValueError, match="--time_budget must be >= 0"):
    mad.main(["--time_budget", "-1", "--out", str(tmp_path)])


def test_bad_flags_name_themselves(tmp_path):
  with pytest.raises(ValueError, match="--tasks.*'nope'"):
    mad.main(["--tasks", "nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--models.*'nope'"):
    mad.main(["--models", "nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--lrs"):
    mad.main(["--lrs", "1e-3,x", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="fewer than a batch"):
    mad.main(["--tasks", "compression", "--models", "transformer", "--train_examples", "8",
              "--out", str(tmp_path)])


def test_main_writes_json_and_table(tmp_path):
  out = mad.main(["--tasks", "in_context_recall", "--models", "transformer", "--epochs", "2",
                  "--train_examples", "16", "--test_examples", "16", "--out", str(tmp_path)])
  for kind in ("json", "md", "png"):
    assert os.path.getsize(tmp_path / f"mad.{kind}") > 0
  with open(tmp_path / "mad.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["complete"] and saved["scale"] == "tiny" and saved["models"] == ["transformer"]
  (run,) = saved["runs"]
  assert run["task"] == "in_context_recall" and run["steps"] == 2 and run["steps_per_epoch"] == 1
  assert [c["epoch"] for c in run["curve"]] == [1, 2]
  assert all(0 <= c["accuracy"] <= 1 and np.isfinite(c["train_loss"]) for c in run["curve"])
  assert run["accuracy"] == run["curve"][-1]["accuracy"] and run["params"] > 0
  assert saved["best"]["in_context_recall"]["transformer"]["lr"] == 1e-3
  assert saved["tasks"]["in_context_recall"]["length"] == 31  # tiny: T 32, shifted
  md = (tmp_path / "mad.md").read_text(encoding="utf-8")
  assert "| task | Transformer++ | HOPE (paper) |" in md
  assert f"| In-context recall | {100 * run['accuracy']:.1f} | 100.0 |" in md
  assert out["table"] in md


def test_runs_as_a_script_path_too():
  """``python experiments/mad.py`` (the script's folder on the path, not the checkout's root)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, os.path.join("experiments", "mad.py"), "--help"],
                        cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--scale" in proc.stdout
