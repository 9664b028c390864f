"""experiments/zero_shot.py: chance levels, the paper's average, bad flags, and the main path on an
untrained tiny model (4 examples per task)."""

import importlib.util
import json
import os

import pytest
from flax import nnx

import nlx
from nlx.eval.multiple_choice import Example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="module")
def zs():
  spec = importlib.util.spec_from_file_location(
      "experiments_zero_shot", os.path.join(REPO, "experiments", "zero_shot.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
  with pytest.raises(FileNotFoundError, match="experiments/lm.py --scale tiny"):
    zs.main(data + ["--models", str(tmp_path / "none"), "--out", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="holds no saved model"):
    zs.main(data + ["--models", str(tmp_path), "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--tasks: unknown 'copa'"):
    zs.main(data + ["--tasks", "copa", "--models", str(tmp_path), "--out", str(tmp_path)])


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "piqa")), reason="no shared data")
def test_untrained_model_on_four_examples_per_task(zs, tmp_path):
  import study  # experiments/ is on sys.path once zero_shot is imported
  cfg = study.model_config("transformer", mlp_dim=32)
  study.save_model(nlx.build_model(cfg, rngs=nnx.Rngs(0)), cfg,
                   str(tmp_path / "models" / "transformer"))
  out = str(tmp_path / "zs")
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
