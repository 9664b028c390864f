"""experiments.formal_languages: the language generators and labels, the string accuracy, bad
flags, one compile per model config, and the main path at the smallest settings (2 steps,
Transformer++, two languages)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import formal_languages as fl
from experiments import resume
from nlx.train.checkpoint import Checkpointer
from nlx.train import fitting

LANG = fl.LANGUAGES


def test_anbn_next_character_sets():
  # labels a, b, T: a's allow a or b; once a b is read, n is known and the rest is forced.
  np.testing.assert_array_equal(LANG["anbn"].targets("aabb"),
                                [[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(LANG["anbn"].targets("ab"), [[1, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(LANG["anbncn"].targets("aabbcc"),
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                 [0, 0, 1, 0], [0, 0, 0, 1]])


def test_membership_labels():
  # one-hot (out, in) of each prefix
  np.testing.assert_array_equal(LANG["parity"].targets("0110")[:, 1], [1, 0, 1, 1])
  np.testing.assert_array_equal(LANG["aa"].targets("aaaa")[:, 1], [0, 1, 0, 1])
  np.testing.assert_array_equal(LANG["abab"].targets("abababab")[:, 1], [0, 0, 0, 1] * 2)
  assert (LANG["parity"].targets("0110").sum(1) == 1).all()


def test_strings_belong_to_their_languages():
  for i in range(40):
    s = fl.example(LANG["parity"], 0, fl.TRAIN, i, 1, 50)
    assert 1 <= len(s) <= 50 and set(s) <= {"0", "1"} and s.count("1") % 2 == 0
    n = len(fl.example(LANG["anbncn"], 0, fl.TRAIN, i, 1, 50)) // 3
    assert fl.example(LANG["anbncn"], 0, fl.TRAIN, i, 1, 50) == "a" * n + "b" * n + "c" * n
    assert fl.example(LANG["abab"], 0, fl.BIN1, i, 51, 100) in {"abab" * k for k in range(13, 26)}


def is_dyck2(s):
  stack = []
  for c in s:
    if c in "([":
      stack.append(c)
    elif not stack or stack.pop() != "([)]"["([)]".index(c) - 2]:
      return False
  return not stack


def test_shuffle2_is_a_shuffle_of_two_dyck1_words():
  both = crossing = 0
  for i in range(60):
    s = fl.example(LANG["shuffle2"], 3, fl.TRAIN, i, 1, 50)
    assert len(s) % 2 == 0 and 2 <= len(s) <= 50
    for pair in ("()", "[]"):
      depth = np.cumsum([{pair[0]: 1, pair[1]: -1}.get(c, 0) for c in s])
      assert depth.min() >= 0 and depth[-1] == 0
    both += ("(" in s and "[" in s)
    crossing += not is_dyck2(s)  # e.g. "([)]": in Shuffle-2, not well nested
  assert both > 30 and crossing > 10
  assert is_dyck2("([])[]") and not is_dyck2("([)]")
  # labels over ( ) [ ]: openings always allowed, a closing bracket while its kind is open
  np.testing.assert_array_equal(LANG["shuffle2"].targets("([)]"),
                                [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 0]])


def test_examples_are_a_pure_function_of_seed_stream_index():
  lang = LANG["shuffle2"]
  assert fl.example(lang, 1, fl.TRAIN, 7, 1, 50) == fl.example(lang, 1, fl.TRAIN, 7, 1, 50)
  assert len({fl.example(lang, 1, fl.TRAIN, i, 1, 50) for i in range(20)}) > 15
  assert fl.example(lang, 1, fl.TRAIN, 7, 1, 50) != fl.example(lang, 2, fl.TRAIN, 7, 1, 50)
  bin1 = fl.bin_strings(LANG["anbn"], 0, fl.BIN1, 200, 51, 100)
  assert sorted(map(len, bin1)) == list(range(52, 101, 2))  # every aⁿbⁿ of the bin, once


def test_score_counts_a_string_right_only_if_every_position_is():
  targets = np.zeros((2, 3, 4), np.float32)
  targets[:, :, 0] = 1
  predicted = targets > 0.5
  predicted[1, 1, 0] = False  # one wrong label in row 1
  predicted[0, 2, 3] = True  # a wrong value outside the mask (position) of row 0: ignored
  predicted[:, :, 2] = True  # label 2 is not a label of the language: ignored
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  got = fl.score(predicted, targets, mask, np.array([1, 1, 0, 0], np.float32))
  assert got["string"] == 0.5 and got["strings"] == 2
  assert got["position"] == pytest.approx(4 / 5)


def test_bad_flags_name_the_flag_and_value(tmp_path):
  with pytest.raises(ValueError, match="--families.*'nope'"):
    fl.main(["--families", "nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--languages.*'dyck9'"):
    fl.main(["--languages", "dyck9", "--out", str(tmp_path)])


def test_one_compiled_step_per_model_config():
  """Every language of a family trains through ``fit``'s one compiled step (one graphdef per
  config, one optimizer per (steps, lr), one loss function)."""
  settings = dict(fl.PRESETS["tiny"], steps=2, lr=0.0123)  # an optimizer no other test builds
  cfg = fl.family_config("transformer", settings)
  misses = fitting.compiled_step.cache_info().misses
  models = [fl.train_language(cfg, LANG[name], settings, seed=0)[0] for name in ("parity", "aa")]
  assert fitting.compiled_step.cache_info().misses == misses + 1
  graphdefs = [nnx.split(m, nnx.Param, ...)[0] for m in models]
  assert graphdefs[0] == graphdefs[1]
  step = fitting.compiled_step(graphdefs[0], fl._optimizer(2, 0.0123), fl.language_loss)
  assert step._cache_size() == 1  # pylint: disable=protected-access  (one XLA program)


def test_main_writes_json_markdown_and_png(tmp_path):
  out = str(tmp_path / "fl")
  results = fl.main(["--families", "transformer", "--languages", "anbn,parity", "--steps", "2",
                     "--eval_size", "8", "--out", out, "--model", "init_std=0.5", "--model",
                     "d_model=16"])
  for kind in ("json", "md", "png"):
    assert os.path.getsize(os.path.join(out, f"formal_languages.{kind}")) > 0
  with open(os.path.join(out, "formal_languages.json"), encoding="utf-8") as f:
    saved = json.load(f)
  runs = saved["families"]["transformer"]["languages"]
  assert set(runs) == {"anbn", "parity"} and saved["settings"]["steps"] == 2
  assert saved["settings"]["model"] == {"init_std": 0.5, "d_model": 16}
  assert saved["settings"]["d_model"] == 16  # the recorded width is the one that ran
  for r in runs.values():
    assert len(r["losses"]) == 2 and all(0 < x < 5 for x in r["losses"])
    for b in ("bin0", "bin1"):
      assert 0.0 <= r[b]["string"] <= r[b]["position"] <= 1.0 and r[b]["strings"] > 0
  assert saved["languages"]["parity"]["bin1_lengths"][0] >= 51
  with open(os.path.join(out, "formal_languages.md"), encoding="utf-8") as f:
    assert "| aⁿbⁿ |" in f.read()
  assert results["families"]["transformer"]["params"] > 0


def test_model_fields_reach_every_family_and_bad_ones_are_named():
  settings = dict(fl.PRESETS["tiny"], model={"init_std": 1.0, "conv_size": 0})
  cfg = fl.family_config("deltanet", settings)
  assert cfg.init_std == 1.0 and cfg.conv_size == 0 and cfg.d_model == settings["d_model"]
  assert cfg.mlp_dim == 2 * settings["d_model"]
  wider = fl.family_config("deltanet", dict(settings, model={"d_model": 48, "n_layers": 3}))
  assert (wider.d_model, wider.n_layers, wider.mlp_dim) == (48, 3, 96)  # --model beats the scale
  cpu = fl.family_config("deltanet", fl.PRESETS["cpu"])  # the setting DeltaNet fits parity with
  assert (cpu.d_model, cpu.init_std) == (128, 1.0) and fl.CPU_LANGUAGES == ("parity",)
  with pytest.raises(ValueError, match="--model: expected FIELD=VALUE"):
    fl.main(["--model", "init_std", "--steps", "1"])
  with pytest.raises(ValueError, match="no field 'nosuch'"):
    fl.main(["--families", "deltanet", "--languages", "parity", "--steps", "1", "--model",
             "nosuch=1"])


# ---------------------------------------------------------------------------------------------
# The fixed training set, the validation split and early stopping (--scale cpu, Irie et al.)
# ---------------------------------------------------------------------------------------------

FIXED = dict(fl.PRESETS["cpu"], d_model=16, n_layers=1, batch=8, steps=6, train_size=200,
             val_size=40, eval_size=40, eval_every=2, patience=1, pad_multiple=64)  # one width


def test_training_set_is_fixed_deduplicated_and_read_in_shuffled_epochs():
  train = fl.training_set(LANG["parity"], 0, 200, 50)
  assert train == fl.training_set(LANG["parity"], 0, 200, 50)  # drawn once: same every call
  assert len(set(train)) == len(train) and 150 < len(train) <= 200
  assert all(1 <= len(s) <= 50 and s.count("1") % 2 == 0 for s in train)
  # batches are rows of that set, a pure function of the step, each of strings of one padded
  # width; each epoch reads every row (a group's last batch wraps around to its first rows)
  lengths = [len(s) for s in train]
  schedule = fl.batch_schedule(lengths, 8, 0, 16)
  again = fl.batch_schedule(lengths, 8, 0, 16)
  per_epoch = sum(-(-sum(fl.pad_to(n, 16) == w for n in lengths) // 8) for w in (16, 32, 48, 64))
  seen = []
  for step in range(per_epoch):
    rows, width = schedule(step)
    np.testing.assert_array_equal(rows, again(step)[0])
    assert len(rows) == 8 and all(fl.pad_to(lengths[r], 16) == width for r in rows)
    seen += rows.tolist()
  assert set(seen) == set(range(len(train))) and len(seen) - len(train) < 4 * 8
  assert not np.array_equal(schedule(0)[0], schedule(per_epoch)[0])  # the next epoch reshuffles
  tiny = fl.batch_schedule([3, 5, 4], 6, 0, 16)  # a group smaller than a batch wraps around
  assert sorted(tiny(0)[0].tolist()) == [0, 0, 1, 1, 2, 2] and tiny(0)[1] == 16


def test_splits_are_disjoint_where_the_language_allows_and_labels_are_right():
  for name in ("parity", "shuffle2"):
    split = fl.splits(LANG[name], FIXED, 0)
    train, val, bin0 = map(set, (split["train"], split["val"], split["bin0"]))
    assert val and bin0 and not val & train and not bin0 & (train | val)
    assert all(len(s) <= 50 for s in train | val | bin0)
    assert min(map(len, split["bin1"])) >= 51
  # one string per length: every string of 1..50 is a training string, validation and bin 0
  # are those strings (the training set itself)
  split = fl.splits(LANG["anbn"], dict(FIXED, train_size=2000), 0)
  assert sorted(map(len, split["train"])) == list(range(2, 51, 2))
  assert set(split["val"]) == set(split["bin0"]) == set(split["train"])
  # labels: the encoded parity targets are each prefix's parity, at the string's positions only
  strings = fl.splits(LANG["parity"], FIXED, 0)["val"][:16]
  inputs, targets, mask = fl.encode(LANG["parity"], strings, 64)
  for row, s in enumerate(strings):
    assert mask[row].sum() == len(s) and (inputs[row, len(s):] == 0).all()
    ones = np.cumsum(inputs[row, :len(s)] == 2)  # id 2 is "1"
    np.testing.assert_array_equal(targets[row, :len(s), 1], ones % 2 == 0)
    np.testing.assert_array_equal(targets[row, :len(s), 0], ones % 2 == 1)
    assert targets[row, len(s):].sum() == 0 and targets[row, :, 2:].sum() == 0


def test_early_stopping_stops_and_keeps_the_best_checkpoint(monkeypatch):
  cfg = fl.family_config("transformer", FIXED)
  split = fl.splits(LANG["parity"], FIXED, 0)
  # lr 0: validation never improves after the first evaluation; patience 1 stops at the second
  got = fl.train_fixed_set(cfg, LANG["parity"], dict(FIXED, lr=0.0), 0, split["train"],
                           split["val"], progress=False)
  assert got["stopped"] == "patience" and got["steps"] == 4 and got["best_step"] == 2
  assert [c["step"] for c in got["curve"]] == [2, 4]
  assert got["curve"][0]["val_loss"] == pytest.approx(got["curve"][1]["val_loss"])
  # the wall-time cap stops at the first evaluation after it
  got = fl.train_fixed_set(cfg, LANG["parity"], dict(FIXED, lr=0.0, patience=9, run_seconds=1e-9),
                           0, split["train"], split["val"], progress=False)
  assert got["stopped"] == "time" and got["steps"] == 2
  # a spent study budget starts no language
  assert fl.run(dict(FIXED, time_budget=1e-9), ["transformer"], ["aa"], 0)["languages_run"] == []
  # a perfect validation score stops at once
  real = fl.evaluate
  monkeypatch.setattr(fl, "evaluate", lambda *a, **k: {**real(*a, **k), "string": 1.0})
  got = fl.train_fixed_set(cfg, LANG["parity"], dict(FIXED, lr=0.0), 0, split["train"],
                           split["val"], progress=False)
  assert got["stopped"] == "perfect" and got["steps"] == 2 and len(got["losses"]) == 2


def test_cpu_scale_main_records_the_curves(tmp_path):
  out = str(tmp_path / "fl")
  fl.main(["--scale", "cpu", "--families", "transformer", "--languages", "parity,aa",
           "--steps", "2", "--train_size", "16", "--val_size", "16", "--eval_size", "16",
           "--eval_every", "1", "--out", out])
  with open(os.path.join(out, "formal_languages.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["languages"]["parity"]["val_in_train"] == 0
  assert saved["languages"]["parity"]["bin0_in_train"] == 0
  for r in saved["families"]["transformer"]["languages"].values():
    assert r["curve"][0]["step"] == 1 and r["stopped"] in ("patience", "max_steps", "perfect")
    assert len(r["losses"]) == r["steps"] <= 2 and 0 < r["best_step"] <= r["steps"]
    assert [c["step"] for c in r["curve"]] == list(range(1, r["steps"] + 1))
  with open(os.path.join(out, "formal_languages.md"), encoding="utf-8") as f:
    assert "best step" in f.read()
  assert os.path.getsize(os.path.join(out, "formal_languages.png")) > 0


def test_a_non_finite_logit_at_a_padded_position_does_not_reach_the_loss():
  logits = jnp.zeros((1, 3, fl.VOCAB)).at[0, 2].set(jnp.nan)  # position 2 is padding
  targets = jnp.ones((1, 3, fl.LABELS_MAX))
  mask, labels = jnp.array([[1.0, 1.0, 0.0]]), jnp.array([1.0, 0.0, 0.0, 0.0])
  loss = fl.bce_loss(logits, targets, mask, labels)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # sigmoid(0) on the two real ones


class _NaNAtPadding(nnx.Module):
  """Logits 0 at a string's positions and NaN at padding (id 0): a model gone non-finite there."""

  def __call__(self, inputs):
    return jnp.where((inputs > 0)[..., None], 0.0, jnp.nan) * jnp.ones(fl.VOCAB)


def test_evaluate_scores_a_model_non_finite_at_padding_as_its_strings():
  lang = fl.LANGUAGES["parity"]
  got = fl.evaluate(_NaNAtPadding(), lang, ["01", "1", "001"], width=16, rows=2)
  np.testing.assert_allclose(got["loss"], np.log(2.0), rtol=1e-6)
  assert got["strings"] == 3


def test_a_run_cut_by_its_time_cap_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
  settings = dict(FIXED, steps=6, patience=9, checkpoint_minutes=0)
  cfg = fl.family_config("transformer", settings)
  split = fl.splits(LANG["parity"], settings, 0)
  train = lambda s, **kw: fl.train_fixed_set(cfg, LANG["parity"], s, 0, split["train"],
                                             split["val"], progress=False, **kw)
  keep = lambda got: (got["steps"], got["best_step"], got["stopped"], got["losses"],
                      [(c["step"], c["train_loss"], c["val_loss"]) for c in got["curve"]])
  whole = train(settings)
  where = str(tmp_path / "transformer_parity")
  cut = train(dict(settings, run_seconds=1e-9), checkpoint_dir=where)
  assert cut["stopped"] == "time" and cut["steps"] == 2
  steps = []  # the training batches taken after the restart
  schedule = fl.batch_schedule
  monkeypatch.setattr(fl, "batch_schedule", lambda *a: (lambda f: lambda i: (
      steps.append(i), f(i))[1])(schedule(*a)))
  resumed = train(settings, checkpoint_dir=where)
  assert steps == [2, 3, 4, 5] and "resuming from step 2" in capsys.readouterr().out
  assert keep(resumed) == keep(whole)
  saved = Checkpointer(os.path.join(where, "arrays"), keep=1, read_only=True).manager
  # the last save says how the run ended, though a periodic save came at the same step
  last = saved.restore(saved.latest_step(), args=resume._json_only())  # pylint: disable=protected-access
  assert last["data"]["progress"]["stopped"] == "max_steps"
  np.testing.assert_array_equal(  # the best checkpoint is the same model
      fl.evaluate(resumed["model"], LANG["parity"], split["val"], 64)["loss"],
      fl.evaluate(whole["model"], LANG["parity"], split["val"], 64)["loss"])
  steps.clear()
  again = train(settings, checkpoint_dir=where)  # ended (max_steps): returned as it ended
  assert steps == [] and keep(again) == keep(whole)
  with pytest.raises(ValueError, match="another configuration"):
    train(dict(settings, lr=settings["lr"] / 2), checkpoint_dir=where)
  with pytest.raises(ValueError, match="--checkpoint_minutes must be >= 0"):
    fl.main(["--scale", "cpu", "--checkpoint_minutes", "-3", "--out", str(tmp_path)])
