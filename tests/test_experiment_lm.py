"""experiments/lm.py: data windows, bad flags, and the main path on a 2-step run (Transformer++
for both parts, so that no HOPE compiles here)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="module")
def lm():
  spec = importlib.util.spec_from_file_location(
      "experiments_lm", os.path.join(REPO, "experiments", "lm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_batches_are_a_pure_function_of_seed_and_step(lm):
  stream = np.arange(1000, dtype=np.uint8) % 251
  a, b = lm.train_batch(stream, 0, 3, 4, 8), lm.train_batch(stream, 0, 3, 4, 8)
  assert np.array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, lm.train_batch(stream, 0, 4, 4, 8).inputs)
  assert a.inputs.shape == (4, 8) and np.array_equal(a.inputs[:, 1:], a.targets[:, :-1])
  windows = lm.eval_windows(np.arange(100, dtype=np.uint8), 3, 9)
  assert windows[:, 0].tolist() == [0, 45, 90] and windows.shape == (3, 10)


def test_perplexity_and_bits_per_byte(lm):
  m = lm.metrics(math.log(4.0))
  assert m["val_ppl"] == pytest.approx(4.0) and m["val_bpb"] == pytest.approx(2.0)


def test_bad_flags_name_the_flag_and_value(lm, tmp_path):
  with pytest.raises(ValueError, match="--families: unknown 'gpt'"):
    lm.main(["--families", "gpt", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--ablations: unknown 'w/o q'"):
    lm.main(["--ablations", "w/o q", "--out", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="--data='/nope'"):
    lm.main(["--data", "/nope", "--out", str(tmp_path)])


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "ptb")), reason="no shared PTB")
def test_two_step_run_writes_tables_plot_and_models(lm, tmp_path, monkeypatch):
  monkeypatch.setattr(lm, "ABLATION_FAMILY", "transformer")
  out = str(tmp_path / "lm")
  lm.main(["--out", out, "--families", "transformer", "--ablations", "w/o momentum",
           "--steps", "2", "--abl_steps", "2", "--batch", "2", "--seq_len", "16",
           "--abl_batch", "2", "--abl_seq_len", "16", "--eval_every", "1", "--eval_rows", "2",
           "--final_eval_rows", "4", "--target_params", "60000"])
  with open(os.path.join(out, "lm.json"), encoding="utf-8") as f:
    results = json.load(f)
  row = results["main"]["transformer"]
  assert 1.0 < row["val_ppl"] < 400 and row["val_bpb"] == pytest.approx(math.log2(row["val_ppl"]))
  assert abs(row["params"] - 60000) < 3000 and row["tokens"] == 2 * 2 * 16
  assert [t for t, _ in row["curve"]] == [32, 64]
  assert list(results["ablations"]) == ["w/o momentum"]
  md = open(os.path.join(out, "lm.md"), encoding="utf-8").read()
  assert "Transformer++" in md and "w/o momentum" in md
  assert os.path.getsize(os.path.join(out, "lm.png")) > 0
  assert os.path.isfile(os.path.join(out, "models", "transformer", "params.msgpack"))
