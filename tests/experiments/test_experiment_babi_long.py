"""experiments.babi_long: the bAbI parser on a hand-written story, facts hidden in filler at
an exact length, the flags named in errors, and a smoke run on a hand-written qa1 (2 steps)."""

import collections
import json
import os

import numpy as np
import pytest

from experiments import babi_long, study

STORY = ("1 Mary moved to the bathroom.\n"
         "2 John went to the hallway.\n"
         "3 Where is Mary? \tbathroom\t1\n"
         "4 Daniel went back to the office.\n"
         "5 Where is Daniel? \toffice\t4\n")


def test_parse_babi_hand_written_story():
  first, second = babi_long.parse_babi(STORY + STORY.replace("Mary", "Sandra"))[:2]
  assert first == babi_long.BabiQuestion(
      ("Mary moved to the bathroom.", "John went to the hallway."), "Where is Mary?",
      "bathroom", (0,))
  assert second.facts[-1] == "Daniel went back to the office."
  assert (second.question, second.answer, second.supporting) == ("Where is Daniel?", "office",
                                                                 (2,))
  questions = babi_long.parse_babi(STORY + STORY.replace("Mary", "Sandra"))
  assert len(questions) == 4 and questions[2].facts == ("Sandra moved to the bathroom.",
                                                        "John went to the hallway.")
  with pytest.raises(ValueError, match="line number"):
    babi_long.parse_babi("Mary moved.\n")


def test_hide_facts_keeps_order_at_line_starts_and_fills_the_length():
  q = babi_long.parse_babi(STORY)[1]
  filler = "".join(f"Line {i} of the play, spoken aloud.\n" for i in range(300))
  prompt, answer = babi_long.hide_facts(q, filler, 1000, seed=1, index=2)
  assert answer == "office" and len(prompt) + len(answer) == 1000
  assert prompt.endswith("\nQuestion: Where is Daniel?\nAnswer: ")
  positions = [prompt.index(f + "\n") for f in q.facts]
  assert positions == sorted(positions)
  assert all(p == 0 or prompt[p - 1] == "\n" for p in positions)
  assert (prompt, answer) == babi_long.hide_facts(q, filler, 1000, seed=1, index=2)


def test_training_rows_are_full_no_padding():
  questions = babi_long.parse_babi(STORY)
  filler = "".join(f"Line {i} of the play, spoken aloud.\n" for i in range(300))
  settings = dict(babi_long.SCALES["tiny"], batch=3, train_len=300)
  batch = babi_long.train_batch(2, questions, filler, settings, seed=0)
  assert batch.inputs.shape == (3, 300) and (batch.inputs > 0).all()
  assert (batch.mask[:, -1] == 1).all()


def test_bad_flags_are_named(tmp_path, monkeypatch):
  missing = str(tmp_path / "missing")
  with pytest.raises(study.DataNotFound) as err:
    babi_long.babi_dir(missing)
  message = str(err.value)
  assert "\n" not in message and "--data" in message and "$NLX_DATA" in message
  assert os.path.join(missing, "babi", "en", "qa1_*_train.txt") in message and "bAbI" in message
  monkeypatch.delenv("NLX_DATA", raising=False)
  with pytest.raises(study.DataNotFound, match=r"give --data DIR or set \$NLX_DATA"):
    babi_long.babi_dir(None)
  with pytest.raises(ValueError, match="--tasks 21"):
    babi_long.load_task(str(tmp_path), 21, "train")


def test_babi_files_are_found_through_nlx_data(tmp_path, monkeypatch):
  data = tmp_path / "babi" / "en"
  data.mkdir(parents=True)
  (data / "qa1_single-supporting-fact_train.txt").write_text(STORY)
  monkeypatch.setenv("NLX_DATA", str(tmp_path))
  assert babi_long.babi_dir(None) == str(data)
  assert babi_long.babi_dir(str(data)) == str(data)  # the bAbI folder itself, as --data


def test_smoke_run_writes_json_markdown_and_png(tmp_path):
  data = tmp_path / "babi" / "en"
  data.mkdir(parents=True)
  for split in ("train", "test"):
    (data / f"qa1_single-supporting-fact_{split}.txt").write_text(STORY * 3)
  out = str(tmp_path / "out")
  babi_long.main(["--data", str(tmp_path), "--models", "transformer", "--steps", "2",
                  "--n_eval", "2", "--lengths", "512", "--batch", "2", "--out", out])
  for ext in ("json", "md", "png"):
    assert os.path.getsize(os.path.join(out, f"babi_long.{ext}")) > 0
  with open(os.path.join(out, "babi_long.json"), encoding="utf-8") as f:
    results = json.load(f)
  cell = results["models"]["transformer"]["scores"]["1"]["512"]
  assert 0.0 <= cell["exact"] <= 1.0 and cell["n"] == 2
  assert 0.0 <= results["majority"]["1"]["512"] <= 1.0
  assert results["majority"]["1"]["512"] <= results["constant"]["1"]["512"] <= 1.0
  md = open(os.path.join(out, "babi_long.md"), encoding="utf-8").read()
  assert "majority answer" in md and "best constant answer" in md
  answers = cell["answers"]
  assert len(answers) == 2 and all(answers)
  # --rescore rebuilds a saved run's baselines and answers (here: a run without them) and
  # trains nothing.
  del results["constant"], cell["answers"]
  old_run = os.path.join(tmp_path, "old.json")
  with open(old_run, "w", encoding="utf-8") as f:
    json.dump(results, f)
  again = babi_long.main(["--rescore", old_run, "--data", str(tmp_path), "--out",
                          str(tmp_path / "rescored")])
  redo = again["models"]["transformer"]["scores"][1][512]
  assert redo["predictions"] == cell["predictions"] and redo["answers"] == answers
  assert again["constant"][1][512] >= again["majority"][1][512]
  assert "commonest first letter" in open(os.path.join(tmp_path, "rescored", "babi_long.md"),
                                          encoding="utf-8").read()


def test_commonest_first_letter():
  assert babi_long.commonest(["hallway", "hffice", "bedroom"]) == "h (0.67)"
  assert babi_long.commonest([]) == "-"


def test_cpu_preset_invariants_and_sanity_row():
  """The cpu scale's generator invariants (seconds): its lengths have their n_eval, the curve's
  questions are test questions at the trained length with every fact (and so the answer) in the
  context, labels align with inputs; the sanity row compares with the majority answer."""
  settings = babi_long.SCALES["cpu"]
  assert set(settings["n_eval"]) == set(settings["lengths"])
  assert min(settings["lengths"]) == settings["train_len"]
  questions = babi_long.parse_babi(STORY * 4)
  filler = "".join(f"Line {i} of the play, spoken aloud.\n" for i in range(300))
  pairs = babi_long.curve_pairs({1: questions}, filler, dict(settings, curve_n=3), seed=1)
  assert len(pairs) == 3
  for prompt, answer in pairs:
    assert len(prompt) + len(answer) == settings["train_len"] + 1
    assert answer in prompt and prompt.endswith("\nAnswer: ")
  batch = babi_long.train_batch(0, questions, filler, dict(settings, batch=2), seed=0)
  np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
  assert set(np.unique(batch.mask)) == {0.0, 1.0}  # answer-only loss at cpu
  n = settings["train_len"]
  floor = {1: {n: 0.2}}
  assert babi_long.sanity({1: {n: {"exact": 0.5}}}, floor, settings)["holds"]
  assert not babi_long.sanity({1: {n: {"exact": 0.2}}}, floor, settings)["holds"]
  # The best constant answer: the largest share one answer word has among the evaluated
  # questions, never below the training majority's share.
  evaluated = babi_long.eval_questions(questions, settings["n_eval"][n], 1)
  counts = collections.Counter(q.answer for q in evaluated)
  best = babi_long.constant({1: questions}, settings, 1)[1][n]
  assert best == max(counts.values()) / len(evaluated)
  share = babi_long.majority({1: questions}, {1: questions}, settings, 1)[1][n]
  assert share <= best
