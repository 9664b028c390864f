"""The multiple-choice loaders on the real evaluation files (docs/TRAINING.md, "Evaluation data"):
example counts, and the first examples read into lm-eval-harness prompts. Skipped only when the data
directory is absent."""

import bz2
import json
import os

import pytest

from nlx.eval import multiple_choice as mc

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "shared",
                    "data")
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"{DATA} is absent")

COUNTS = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
          "arc_challenge": 1172, "boolq": 3270, "siqa": 1954, "lambada": 5153}


def _first_json(*path):
  with open(os.path.join(DATA, *path), encoding="utf-8") as f:
    return json.loads(f.readline())


@pytest.fixture(scope="module")
def tasks():
  return {name: mc.load_task(name, DATA) for name in COUNTS}


def test_every_task_loads_all_its_examples_with_a_valid_gold(tasks):
  for name, examples in tasks.items():
    assert len(examples) == COUNTS[name], name
    for e in examples:
      assert 0 <= e.gold < e.n_choices and all(e.continuations) and all(e.contexts), (name, e)


def test_piqa(tasks):
  e, raw = tasks["piqa"][0], _first_json("piqa", "valid.jsonl")
  assert e.contexts == (f"Question: {raw['goal']}\nAnswer:",)
  assert e.continuations == (" " + raw["sol1"], " " + raw["sol2"]) and e.gold == 0
  assert [x.gold for x in tasks["piqa"][:2]] == [0, 1]  # valid-labels.lst: 0, 1


def test_hellaswag(tasks):
  with bz2.open(os.path.join(DATA, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt") as f:
    lines = [next(f).rstrip("\n") for _ in range(12)]
  e = tasks["hellaswag"][0]
  assert e.contexts == ("Roof shingle removal: A man is sitting on a roof. he",) == (lines[0],)
  assert e.continuations == tuple(" " + x for x in lines[2:6]) and e.gold == 3
  assert e.continuations[3] == " starts pulling up roofing on a roof."
  assert tasks["hellaswag"][1].contexts == (lines[6],)


def test_winogrande_uses_partial_scoring(tasks):
  e = tasks["winogrande"][0]
  assert e.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                        "Sarah was a much better surgeon than Maria so Maria")
  assert e.continuations == (" always got the easier cases.",) and e.gold == 1
  assert tasks["winogrande"][1].gold == 0


def test_arc_easy_reads_the_question_and_native_choices(tasks):
  e = tasks["arc_easy"][0]
  assert e.contexts == ("Question: Which statement best explains why photosynthesis is the "
                        "foundation of most food webs?\nAnswer:",)
  assert e.continuations == (" Sunlight is the source of energy for nearly all ecosystems.",
                             " Most ecosystems are found on land instead of in water.",
                             " Carbon dioxide is more available than other gases.",
                             " The producers in all ecosystems are plants.")
  assert e.gold == 0
  # ARC keeps its native 3/4/5 choices: ARC-Easy has 7, 2365 and 4 questions with 3, 4 and 5.
  sizes = [x.n_choices for x in tasks["arc_easy"]]
  assert (sizes.count(3), sizes.count(4), sizes.count(5)) == (7, 2365, 4)


def test_arc_challenge(tasks):
  with open(os.path.join(DATA, "arc", "arc_challenge_test.llm_adapters.json"),
            encoding="utf-8") as f:
    raw = json.load(f)[0]
  e = tasks["arc_challenge"][0]
  assert e.contexts[0].startswith("Question: ") and e.contexts[0].endswith("\nAnswer:")
  assert e.contexts[0][len("Question: "):-len("\nAnswer:")] in raw["instruction"]
  assert all(c[1:] in raw["instruction"] for c in e.continuations)
  assert e.gold == int(raw["answer"][-1]) - 1
  sizes = [x.n_choices for x in tasks["arc_challenge"]]
  assert (sizes.count(3), sizes.count(4), sizes.count(5)) == (4, 1165, 3)


def test_boolq(tasks):
  e, raw = tasks["boolq"][0], _first_json("boolq", "boolq_dev.llmfoundry.jsonl")
  assert e.contexts == (raw["query"] + "\nAnswer:",)
  assert e.contexts[0].startswith("Passage: All biomass goes through")
  assert e.continuations == (" no", " yes") and e.gold == raw["gold"]


def test_siqa(tasks):
  e = tasks["siqa"][0]
  assert e.contexts == ("Question: Tracy didn't go home that evening and resisted Riley's "
                        "attacks. What does Tracy need to do before this?\nAnswer:",)
  assert e.continuations == (" make a new plan", " Go home and see Riley",
                             " Find somewhere to go")
  assert e.gold == 2


def test_lambada_is_a_single_continuation(tasks):
  e, raw = tasks["lambada"][0], _first_json("lambada", "lambada_openai_test.llmfoundry.jsonl")
  # lm-eval's lambada_openai: the context, then " " + the last word (the file drops the space).
  assert e.contexts == (raw["context"],) and e.continuations == (" " + raw["continuation"],)
  assert not raw["context"][-1].isspace()
  assert e.n_choices == 1 and e.gold == 0


def test_unknown_task_and_missing_directory_are_refused():
  with pytest.raises(ValueError, match="task 'copa' is not known; allowed:"):
    mc.load_task("copa", DATA)
  with pytest.raises(ValueError, match="does not exist"):
    mc.load_task("piqa", os.path.join(DATA, "nope"))
