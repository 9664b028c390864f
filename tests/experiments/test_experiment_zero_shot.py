"""experiments.zero_shot: chance levels, the paper's average, bad flags, the missing-dataset error,
and the main path on an untrained tiny model (4 examples per task, from small files in the layout
of docs/TRAINING.md's "Evaluation data")."""

import bz2
import json
import os

import pytest
from flax import nnx

import nlx
from experiments import study
from experiments import zero_shot
from nlx.eval.multiple_choice import Example


@pytest.fixture(scope="module")
def zs():
  return zero_shot


def _write_lines(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _adapters(question: str, choices, gold: int) -> dict:
  """A record of LLM-Adapters' ARC / SIQA files: the question and ``AnswerN:`` choices."""
  answers = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
  return {"instruction": f"Please choose the correct answer to the question: {question}\n\n"
                         f"{answers}\n\nAnswer format: answer1/answer2/answer3",
          "answer": f"answer{gold + 1}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Four examples of every task, in the files and formats ``nlx.eval.multiple_choice`` reads."""
  root = tmp_path_factory.mktemp("data")
  n = range(4)
  _write_lines(root / "piqa" / "valid.jsonl",
               [{"goal": f"open jar {i}", "sol1": "twist the lid", "sol2": "eat the lid"}
                for i in n])
  (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n1\n", encoding="utf-8")
  (root / "hellaswag").mkdir()
  lines = []
  for i in n:
    lines += [f"Cooking: a man cuts onion {i}.", str(i % 4), "he cries.", "he flies.",
              "he sings.", "he swims."]
  (root / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
      bz2.compress("\n".join(lines).encode("utf-8")))
  _write_lines(root / "winogrande" / "winogrande_dev.llmfoundry.jsonl",
               [{"context_options": ["The cup fell because the cup", "The cup fell because the "
                                     "table"], "continuation": f"was loose {i}.", "gold": i % 2}
                for i in n])
  for name, folder in (("arc_easy_test", "arc"), ("arc_challenge_test", "arc"),
                       ("siqa_dev", "siqa")):
    (root / folder).mkdir(exist_ok=True)
    (root / folder / f"{name}.llm_adapters.json").write_text(json.dumps(
        [_adapters(f"What is {i} + 1?", ["one", "two", "three"], i % 3) for i in n]),
        encoding="utf-8")
  _write_lines(root / "boolq" / "boolq_dev.llmfoundry.jsonl",
               [{"query": f"Passage: snow is cold {i}.\nQuestion: is snow cold?",
                 "choices": ["no", "yes"], "gold": 1} for i in n])
  _write_lines(root / "lambada" / "lambada_openai_test.llmfoundry.jsonl",
               [{"context": f"She opened the door {i} and saw the", "continuation": "garden"}
                for i in n])
  return str(root)


def test_chance_is_measured_on_the_examples(zs):
  examples = [Example(("q",), (" a", " b"), 1), Example(("q",), (" a", " b", " c", " d"), 1),
              Example(("q",), (" a", " b"), 0), Example(("q",), (" a", " b", " c", " d"), 1)]
  assert zs.chance(examples) == {"chance": pytest.approx(0.375), "majority": 0.75}
  assert zs.chance([Example(("c",), (" w",), 0)]) == {"chance": 0.0, "majority": 0.0}


def test_average_takes_acc_norm_for_hellaswag_and_arc_challenge(zs):
  row = {"piqa": {"acc": 0.6, "acc_norm": 0.0}, "hellaswag": {"acc": 0.0, "acc_norm": 0.3},
         "arc_challenge": {"acc": 0.0, "acc_norm": 0.3}, "lambada": {"acc": 0.0, "ppl": 9.0}}
  assert zs.average(row) == pytest.approx(0.3)


def test_missing_models_and_unknown_task_are_clear_errors(zs, tmp_path):
  # An existing --data directory, so that these checks run on a checkout without the datasets.
  data = ["--data", str(tmp_path)]
  with pytest.raises(FileNotFoundError, match="python -m experiments.lm --scale tiny"):
    zs.main(data + ["--models", str(tmp_path / "none"), "--out", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="holds no saved model"):
    zs.main(data + ["--models", str(tmp_path), "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--tasks: unknown 'copa'"):
    zs.main(data + ["--tasks", "copa", "--models", str(tmp_path), "--out", str(tmp_path)])


def test_untrained_model_on_four_examples_per_task(zs, tmp_path, data_dir, monkeypatch):
  cfg = study.model_config("transformer", mlp_dim=32)
  study.save_model(nlx.build_model(cfg, rngs=nnx.Rngs(0)), cfg,
                   str(tmp_path / "models" / "transformer"))
  out = str(tmp_path / "zs")
  with pytest.raises(study.DataNotFound) as err:  # the models are there, the datasets are not
    zs.main(["--models", str(tmp_path / "models"), "--out", out, "--data", str(tmp_path)])
  message = str(err.value)
  assert "\n" not in message and "--data" in message and "$NLX_DATA" in message
  assert "docs/TRAINING.md" in message and "piqa/valid-labels.lst" in message
  monkeypatch.setenv("NLX_DATA", data_dir)  # no --data: $NLX_DATA
  zs.main(["--models", str(tmp_path / "models"), "--out", out, "--limit", "4",
           "--max_len", "32"])
  with open(os.path.join(out, "zero_shot.json"), encoding="utf-8") as f:
    results = json.load(f)
  row = results["results"]["transformer"]
  assert set(row) == set(zs.TASKS) and all(r["n"] == 4 for r in row.values())
  assert all(0.0 <= r["acc"] <= 1.0 for r in row.values())
  assert row["lambada"]["ppl"] > 1.0 and row["lambada"]["ppl_continuation"] > 1.0
  assert 0.0 <= results["average"]["transformer"] <= 1.0
  assert results["chance"]["piqa"]["chance"] == 0.5
  md = open(os.path.join(out, "zero_shot.md"), encoding="utf-8").read()
  assert "Transformer++" in md and "chance" in md
  assert os.path.getsize(os.path.join(out, "zero_shot.png")) > 0


def test_cpu_scale_reads_the_lm_cpu_models_and_scores_more_examples(zs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no runs/lm_cpu/models here
  with pytest.raises(FileNotFoundError, match=r"runs/lm_cpu/models"):
    zs.main(["--scale", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
  assert zs.PRESETS["cpu"]["limit"] > zs.PRESETS["tiny"]["limit"]
  assert zs.PRESETS["cpu"]["max_len"] == 128  # lm.py --scale cpu trains on 128-byte windows
  assert zs.find_models.__doc__ and zs.NAMES["transformer_std1"].startswith("Transformer++")


def test_ptb_text_uses_only_ptb_characters_and_keeps_the_separating_space(zs):
  """--text ptb writes the tasks as PTB is written: its characters only (lower case, N for
  numbers, apostrophes, hyphens), contractions split, one space between words, and a
  continuation's leading space (its separation from the context) kept."""
  ptb = set("abcdefghijklmnopqrstuvwxyzN'$&- \n")
  text = zs.ptb_text('Question: Why can\'t Mr. Smith lift 3,500.5 KG? "It\'s heavy!"\nAnswer:')
  assert text == "question why ca n't mr smith lift N kg it 's heavy \n answer"
  assert set(text) <= ptb
  assert zs.ptb_text(" The Lid, twisted (twice).") == " the lid twisted twice"
  assert zs.ptb_text("no") == "no"
  example = Example(("Q: Is it 1?\nAnswer:",), (" Yes.", " No!"), 1)
  (out,) = zs.ptb_examples([example])
  assert out == Example(("q is it N \n answer",), (" yes", " no"), 1)
