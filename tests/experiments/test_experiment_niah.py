"""experiments.niah: S-NIAH examples of an exact length, answer rows and scoring, and a smoke
run of the study (2 training steps, 2 examples at 512 tokens)."""

import json
import os

import numpy as np
import pytest

from experiments import answer_scoring, niah


def test_answer_row_masks_the_answer_and_weights_the_context():
  inputs, targets, mask = answer_scoring.answer_row("ab ", "xy", 6, context_weight=0.5)
  np.testing.assert_array_equal(inputs, [97, 98, 32, 120, 0, 0])  # "ab x", padding
  np.testing.assert_array_equal(targets, [98, 32, 120, 121, 0, 0])  # "b xy"
  np.testing.assert_array_equal(mask, [0.5, 0.5, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="do not fit"):
    answer_scoring.answer_row("abcdef", "xy", 4)


def test_scores_on_hand_made_predictions():
  assert answer_scoring.exact_match(["123", "124"], ["123", "123"]) == 0.5
  assert answer_scoring.char_accuracy(["123", "124"], ["123", "123"]) == pytest.approx(5 / 6)
  assert answer_scoring.char_accuracy(["1"], ["123"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("task", ["s_niah_1", "s_niah_2", "s_niah_3"])
def test_needle_fills_the_length_exactly_and_is_a_function_of_seed_and_index(task):
  text = "It was a dark night. The wind blew. " * 400
  prompt, answer = niah.needle(task, text, 1025, seed=3, index=7)
  assert len(prompt) + len(answer) == 1025
  assert f"is: {answer}." in prompt and prompt.endswith("mentioned in the provided text is ")
  assert (prompt, answer) == niah.needle(task, text, 1025, seed=3, index=7)
  assert answer != niah.needle(task, text, 1025, seed=3, index=8)[1]


def test_training_rows_are_full_no_padding():
  text = "It was a dark night. The wind blew. " * 400
  settings = dict(niah.SCALES["tiny"], batch=3, train_len=400)
  batch = niah.train_batch(5, text, settings, seed=0)
  assert batch.inputs.shape == (3, 400) and (batch.inputs > 0).all()
  assert (batch.mask[:, -1] == 1).all()  # the answer ends each row


def test_bad_flags_are_named():
  with pytest.raises(FileNotFoundError, match="--haystack"):
    niah.essay_text("/no/such/file.txt")
  with pytest.raises(ValueError, match="--models nosuch"):
    niah.check_families(["transformer", "nosuch"])


def test_smoke_run_writes_json_markdown_and_png(tmp_path):
  out = str(tmp_path / "out")
  niah.main(["--models", "transformer", "--steps", "2", "--n_eval", "2", "--lengths", "512",
             "--batch", "2", "--out", out])
  for ext in ("json", "md", "png"):
    assert os.path.getsize(os.path.join(out, f"niah.{ext}")) > 0
  with open(os.path.join(out, "niah.json"), encoding="utf-8") as f:
    results = json.load(f)
  scores = results["models"]["transformer"]["scores"]
  assert set(scores) == set(niah.niah.TASKS)
  for by_len in scores.values():
    assert 0.0 <= by_len["512"]["exact"] <= by_len["512"]["char"] <= 1.0
    assert by_len["512"]["n"] == 2
  assert "s_niah_3" in open(os.path.join(out, "niah.md"), encoding="utf-8").read()


def test_cpu_preset_examples_fit_hold_their_answer_and_keep_test_apart():
  """The cpu scale's generator invariants (seconds): every task's example fills the trained
  length exactly with the needle's value in the context; the training curve's and the test's
  examples come from the test seed (training: 2 * seed), at indices apart from each other."""
  settings = niah.SCALES["cpu"]
  assert settings["lengths"][0] == settings["train_len"]  # the sanity row is at the trained length
  text = "It was a dark night. The wind blew. " * 400
  assert settings["tasks"] == ("s_niah_1",)  # the pass-key task, the paper's claim
  for task in settings["tasks"]:
    prompt, answer = niah.needle(task, text, settings["train_len"] + 1, seed=0, index=3)
    assert len(prompt) + len(answer) == settings["train_len"] + 1
    assert f"is: {answer}." in prompt
  batch = niah.train_batch(0, text, dict(settings, batch=3), seed=0)
  assert batch.inputs.shape == (3, settings["train_len"]) and (batch.inputs > 0).all()
  np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # labels align
  assert set(np.unique(batch.mask)) == {0.0, 1.0}  # answer-only loss at cpu
  curve = niah.curve_examples(settings, seed=1)
  assert len(curve) == settings["curve_n"]
  assert all(f"is: {a}." in p for p, a in curve)
  test = niah.eval_pairs("s_niah_1", niah.niah.NOISE * 2, settings["train_len"], 8, seed=1)
  train = [niah.needle("s_niah_1", niah.niah.NOISE * 2, settings["train_len"] + 1, 0, i)
           for i in range(0, 300, 3)]
  answers = lambda pairs: {a for _, a in pairs}
  assert not answers(curve) & answers(test) and not answers(train) & (answers(test) |
                                                                       answers(curve))


def test_sanity_row_on_hand_made_scores():
  settings = niah.SCALES["cpu"]
  n = settings["train_len"]
  good = niah.sanity({"s_niah_1": {n: {"exact": 0.95}}}, settings)
  bad = niah.sanity({"s_niah_1": {n: {"exact": 0.5}}}, settings)
  assert good["holds"] and not bad["holds"] and str(n) in good["metric"]


def test_cpu_scale_is_accepted_and_bad_scale_named(capsys):
  with pytest.raises(SystemExit):
    niah.main(["--scale", "huge"])
  assert "--scale" in capsys.readouterr().err
