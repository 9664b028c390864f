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
