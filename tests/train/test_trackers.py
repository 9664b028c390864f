"""Trackers of `nlx train` (``nlx.train.metrics``): the wandb run (offline: its ``.wandb`` files
read back) with its id kept in the workdir and reused on resume, the one-line logs of
``--no_progress``, and a clear error when wandb is not installed."""

import json
import struct
import sys

import pytest

from nlx import cli
from nlx.errors import ConfigError
from nlx.train import metrics as metrics_lib

from reliability_cases import TINY

WANDB = "--config.train.trackers=('jsonl', 'tensorboard', 'wandb')"


def wandb_records(path):
  """The records of a ``.wandb`` file (wandb's offline log: a 7-byte header, then LevelDB-style
  log records of at most 32 KiB blocks, each a ``wandb_internal_pb2.Record``)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = path.read_bytes()
  assert data[:4] == b":W&B", data[:8]
  pos, block, chunks = 7, 32768, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(chunks))
      chunks = []
      yield record


def wandb_runs(wandb_dir) -> list[dict]:
  """Each offline run under ``wandb_dir``: its id, config and history ``{step: {key: value}}``."""
  runs = []
  for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
    run = {"id": None, "config": {}, "history": {}}
    for record in wandb_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run["id"] = record.run.run_id
        run["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
      elif kind == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in record.history.item}
        run["history"][items["_step"]] = items
    runs.append(run)
  return runs


def test_wandb_offline_holds_the_metrics_and_a_resumed_run_reuses_its_id(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  workdir = tmp_path / "run"
  flags = ["--workdir", str(workdir), *TINY, WANDB, "--config.train.steps=2"]
  assert cli.main(["train", *flags, "--stop_at_step=1"]) == 0
  run_id = (workdir / "wandb_id").read_text().strip()
  assert len(run_id) >= 8
  assert cli.main(["train", *flags]) == 0
  first, resumed = wandb_runs(tmp_path)
  assert first["id"] == resumed["id"] == run_id
  assert first["config"]["train"]["steps"] == 2 and first["config"]["model"]["family"]
  records = metrics_lib.read_records(str(workdir))
  assert [r["step"] for r in records] == [1, 2]
  for run, record in zip((first, resumed), records):
    logged = run["history"][record["step"]]
    for key, value in record.items():
      if key != "step":
        assert logged[key] == pytest.approx(value, rel=1e-6), key
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step=")]
  assert [dict(kv.split("=") for kv in l.split())["step"] for l in lines] == ["1", "2"]


def test_log_line_is_one_parseable_line_main_metrics_first():
  record = {"step": 40, "grad_norm": 0.5, "loss": 2.345678, "tokens_per_s": 12345.67,
            "learning_rate": 3e-3, "eval_loss": 2.5, "eval_ppl": 12.182, "skipped_steps": 1.0}
  line = metrics_lib.log_line(record)
  assert line.startswith("step=40 loss=2.34568 eval_loss=2.5 eval_ppl=12.182 tokens_per_s=12345.7"
                         " learning_rate=0.003 grad_norm=0.5"), line
  parsed = {k: float(v) for k, v in (kv.split("=") for kv in line.split())}
  assert parsed == pytest.approx(record, rel=1e-5) and "\n" not in line


def test_wandb_missing_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
  with pytest.raises(ConfigError, match=r"train.trackers includes 'wandb' but wandb is not "
                     r"installed: pip install 'nlx\[wandb\]'"):
    metrics_lib.MetricsWriter(str(tmp_path), trackers=("jsonl", "wandb"))


def test_only_the_chosen_trackers_write(tmp_path, capsys):
  writer = metrics_lib.MetricsWriter(str(tmp_path), trackers=("jsonl",), log_lines=False)
  writer.write(1, {"loss": 1.5})
  writer.close()
  assert metrics_lib.read_records(str(tmp_path)) == [{"step": 1, "loss": 1.5}]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
  assert capsys.readouterr().out == ""
