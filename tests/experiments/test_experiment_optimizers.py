"""experiments.optimizers: PTB found under the datasets directory (--data, else $NLX_DATA; one
error line when it is missing), and part (b)'s training on nlx's one train step
(``apply_gradients``) on a small PTB-like corpus."""

import argparse
import json
import os

import numpy as np
import pytest

from experiments import optimizers, study


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A datasets directory holding ptb/ptb.{train,valid}.txt (a few KB of PTB-like text)."""
  root = tmp_path_factory.mktemp("data")
  (root / "ptb").mkdir()
  rng = np.random.default_rng(1)
  words = ["the", "stock", "fell", "<unk>", "N", "in", "trading", "a", "share", "said"]
  for split, n in (("train", 400), ("valid", 80)):
    text = "\n".join(" " + " ".join(rng.choice(words, 10)) + " " for _ in range(n))
    (root / "ptb" / f"ptb.{split}.txt").write_text(text, encoding="utf-8")
  return str(root)


def test_ptb_is_found_under_the_datasets_directory(data_dir, tmp_path, monkeypatch):
  ptb = os.path.join(data_dir, "ptb")
  assert optimizers.ptb_dir(data_dir) == ptb
  assert optimizers.ptb_dir(ptb) == ptb  # the PTB folder itself, as --data
  monkeypatch.setenv("NLX_DATA", data_dir)
  assert optimizers.ptb_dir(None) == ptb
  with pytest.raises(study.DataNotFound) as err:
    optimizers.ptb_dir(str(tmp_path))
  message = str(err.value)
  assert "\n" not in message and "--data" in message and "$NLX_DATA" in message
  assert os.path.join(str(tmp_path), "ptb", "ptb.train.txt") in message
  assert "Penn Treebank" in message
  monkeypatch.delenv("NLX_DATA")
  with pytest.raises(study.DataNotFound, match=r"give --data DIR or set \$NLX_DATA"):
    optimizers.main(["--part", "lm", "--out", str(tmp_path / "out")])  # before any work
  assert not os.path.exists(tmp_path / "out" / "optimizers.json")


def test_a_tiny_lm_trains_on_the_shared_step(data_dir):
  train = optimizers.load_bytes(os.path.join(data_dir, "ptb", "ptb.train.txt"))
  valid = optimizers.load_bytes(os.path.join(data_dir, "ptb", "ptb.valid.txt"))
  args = argparse.Namespace(steps=4, batch=2, seq=16, eval_batches=1)
  loss_fn, params, labels = optimizers.tiny_lm(0)
  tx = optimizers.lm_optimizers(args.steps, labels)["AdamW"]
  run = optimizers.run_lm_once("AdamW", tx, 0, train, valid, args, (loss_fn, params))
  assert len(run["losses"]) == 4 and all(np.isfinite(run["losses"]))
  assert run["skipped"] == 0 and np.isfinite(run["valid"])
  assert run["losses"][0] == pytest.approx(float(loss_fn(params, optimizers.batch_at(
      train, 0, 2, 16, 0))), rel=1e-5)  # the first loss is that of the initial parameters


@pytest.mark.slow  # four optimizers compile the tiny transformer (~1 min on 2 cores)
def test_main_lm_part_writes_outputs(data_dir, tmp_path):
  out = str(tmp_path / "out")
  optimizers.main(["--part", "lm", "--data", data_dir, "--steps", "2", "--seeds", "1",
                   "--batch", "2", "--seq", "16", "--eval_batches", "1", "--out", out])
  with open(os.path.join(out, "optimizers.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert sorted(saved["lm"]) == ["AdamW", "DMGD", "M3", "Muon"]
  assert all(len(r["losses"]) == 2 and r["skipped"] == 0 for runs in saved["lm"].values()
             for r in runs)
  assert os.path.getsize(os.path.join(out, "lm_loss_curves.png")) > 0
