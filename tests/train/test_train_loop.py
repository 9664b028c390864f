"""End-to-end training on CPU: `nlx train` writes metrics, TensorBoard events, the config,
checkpoints and plots; a resumed run continues with the losses of an uninterrupted one;
`nlx generate` samples from the workdir."""

import json
import os

import pytest

from nlx import cli
from nlx.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [f"--config={os.path.join(ROOT, 'configs', 'transformer.py')}:tiny",
        "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.log_every=1",
        "--config.train.eval_every=2", "--config.train.eval_batches=1", "--no_progress",
        "--config.train.plots=False"]


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_records(workdir)]


def test_train_writes_metrics_events_config_checkpoints_and_plots(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  args = ["train", "--workdir", workdir, "--config.train.steps=4",
          "--config.train.checkpoint_every=2"] + [a for a in TINY if "plots" not in a]
  assert cli.main(args) == 0
  records = metrics_lib.read_records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all({"step", "loss", "learning_rate", "grad_norm"} <= set(r) for r in records)
  assert all("tokens_per_s" in r for r in records[1:])
  assert "eval_ppl" in records[1] and "eval_loss" in records[3] and "eval_ppl" not in records[2]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4
  assert os.path.isfile(os.path.join(workdir, "plots", "loss.png"))
  assert "eval_ppl" in capsys.readouterr().out
  assert cli.main(["generate", "--workdir", workdir, "--prompt", "KING:",
                   "--max_new_tokens", "5"]) == 0
  assert capsys.readouterr().out.startswith("KING:")


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  assert cli.main(["train", "--workdir", full, "--config.train.steps=6"] + TINY) == 0
  # The same run stopped after step 3 (with a checkpoint, as on SIGTERM), then resumed.
  assert cli.main(["train", "--workdir", cut, "--config.train.steps=6", "--stop_at_step=3"]
                  + TINY) == 0
  assert [r["step"] for r in metrics_lib.read_records(cut)] == [1, 2, 3]
  assert cli.main(["train", "--workdir", cut, "--config.train.steps=6"] + TINY) == 0
  assert _losses(cut) == _losses(full)


def test_bad_flags_are_refused_by_name(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path), "--config.train.stepz=3"] + TINY) == 2
  assert "no field 'stepz'" in capsys.readouterr().err
