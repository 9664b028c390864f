"""Remote workdirs (``nlx.train.paths``): `nlx train` into ``gs://``, stopped, resumed, then
`nlx generate`, `nlx eval` and `nlx export` from it, on a local stand-in for GCS (fake_gcs);
schemes no backend handles are refused with one line, never made into local folders."""

import json
import os
import shutil

import pytest

from nlx import cli
from nlx.errors import ConfigError
from nlx.train import metrics as metrics_lib
from nlx.train import paths
from nlx.train import trained

import fake_gcs
from reliability_cases import TINY

RUN = "gs://bucket/runs/tiny"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """``gs://`` in ``tmp_path/gcs``; the current directory is ``tmp_path/cwd`` (so that a URL
  taken for a local path would show up there)."""
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  fake_gcs.install(tmp_path / "gcs", monkeypatch)
  return tmp_path / "gcs"


def _log_lines(out: str) -> list[dict]:
  return [dict(kv.split("=") for kv in line.split()) for line in out.splitlines()
          if line.startswith("step=")]


def test_train_stop_resume_generate_eval_and_export_through_gs(gcs, tmp_path, capsys):
  flags = ["--workdir", RUN, "--config.train.steps=4", "--config.train.checkpoint_every=2",
           "--config.train.eval_every=2", "--config.train.plots=True"]
  assert cli.main(["train", *TINY, *flags, "--stop_at_step=2"]) == 0
  run = gcs / "bucket" / "runs" / "tiny"
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]
  assert (run / "checkpoints" / "2" / "commit_success.txt").is_file()  # orbax's GCS protocol
  assert [r["step"] for r in metrics_lib.read_records(RUN)] == [1, 2]
  out = capsys.readouterr().out
  lines = _log_lines(out)  # --no_progress: one parseable line per logged step
  assert [int(l["step"]) for l in lines] == [1, 2] and "eval_ppl" in lines[1], out
  assert float(lines[0]["loss"]) == pytest.approx(metrics_lib.read_records(RUN)[0]["loss"],
                                                  rel=1e-5)
  assert cli.main(["train", *TINY, *flags]) == 0
  assert "resuming from checkpoint step 2 (gs://bucket/runs/tiny/checkpoints/2)" in (
      capsys.readouterr().err)
  assert [r["step"] for r in metrics_lib.read_records(RUN)] == [1, 2, 3, 4]
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
  events = os.listdir(run / "tensorboard")
  assert len(events) == 2 and all(os.path.getsize(run / "tensorboard" / e) for e in events)
  assert (run / "plots" / "loss.png").stat().st_size > 1000
  assert trained.load(RUN).step == 4
  assert cli.main(["generate", "--workdir", RUN, "--checkpoint_dir", f"{RUN}/checkpoints",
                   "--prompt", "KING:", "--max_new_tokens", "4", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("KING:")
  text = tmp_path / "text.txt"
  text.write_text("ROMEO: what light through yonder window breaks? " * 3)
  assert cli.main(["eval", "--workdir", RUN, "--checkpoint_dir", f"{RUN}/checkpoints",
                   "--task", "ppl", "--path", str(text)]) == 0
  assert json.loads(capsys.readouterr().out)["ppl"] > 1.0
  assert cli.main(["export", RUN, str(tmp_path / "exported")]) == 0
  assert (tmp_path / "exported" / "model.safetensors").is_file()
  assert not os.listdir(tmp_path / "cwd"), "a gs:// path became a local folder"


@pytest.mark.parametrize("argv,message", [
    (["train", "--workdir", "s3://bucket/run"],
     "--workdir 's3://bucket/run': the scheme s3:// is not supported; allowed: a local path or "
     "gs://BUCKET/PATH (Google Cloud Storage)"),
    (["train", "--workdir", "run", "--checkpoint_dir", "memory://ckpt"],
     "--checkpoint_dir 'memory://ckpt': the scheme memory:// is not supported"),
    (["generate", "--workdir", "hdfs://cluster/run", "--prompt", "x"],
     "--workdir 'hdfs://cluster/run': the scheme hdfs:// is not supported"),
    (["eval", "--workdir", "gs://", "--task", "ppl"], "--workdir 'gs://' names no bucket"),
    (["export", "gs://bucket/run", "gs://bucket/out"],
     "OUT 'gs://bucket/out': gs:// is not supported here; allowed: a local path"),
    (["generate", "--workdir", "gs://bucket/run", "--prompt", "x", "--state", "gs://b/s.npz"],
     "--state 'gs://b/s.npz': gs:// is not supported here; allowed: a local path")])
def test_a_path_no_backend_handles_is_one_error_line(gcs, capsys, argv, message):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"nlx {argv[0]}: error: {message}") and err.count("\n") == 1, err
  assert not os.listdir("."), "nothing is written before the refusal"


def test_gs_without_its_packages_is_refused_naming_them(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(paths, "_installed", lambda module: False)
  assert cli.main(["train", "--workdir", "gs://bucket/run", *TINY]) == 2
  err = capsys.readouterr().err
  assert err.startswith("nlx train: error: --workdir 'gs://bucket/run': gs:// needs packages "
                        "that are not installed: gcsfs (or tensorflow)"), err
  assert "google-cloud-storage" in err and not os.listdir(tmp_path)


def test_paths_join_basename_and_whole_writes(gcs, tmp_path):
  assert paths.join("gs://b/run", "checkpoints", "2") == "gs://b/run/checkpoints/2"
  assert paths.basename("gs://b/run/") == "run" and paths.basename(str(tmp_path / "x")) == "x"
  assert paths.check("rel/dir", "--workdir") == os.path.join(str(tmp_path / "cwd"), "rel", "dir")
  paths.write_text("gs://b/x/config.json", "{}\n")
  assert (gcs / "b" / "x" / "config.json").read_text() == "{}\n"
  assert paths.isfile("gs://b/x/config.json") and paths.isdir("gs://b/x")
  local = tmp_path / "local.txt"
  paths.write_text(str(local), "one")
  paths.write_text(str(local), "two")  # replaced whole; no temporary file left beside it
  assert local.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["cwd", "gcs",
                                                                         "local.txt"]
  with pytest.raises(ConfigError, match="train.init_from 'az://c/m': the scheme az://"):
    paths.check("az://c/m", "train.init_from")


def test_a_failed_metrics_upload_warns_is_retried_and_keeps_a_local_copy(gcs, monkeypatch,
                                                                         capsys):
  real_upload = paths.upload

  def network_down(local, target):
    raise OSError("network down")

  writer = metrics_lib.MetricsWriter("gs://bucket/m", trackers=("jsonl",))
  monkeypatch.setattr(paths, "upload", network_down)
  writer.write(1, {"loss": 2.0})
  assert writer.sync() is False
  assert "warning: uploading the metrics to gs://bucket/m failed: OSError: network down" in (
      capsys.readouterr().err)
  monkeypatch.setattr(paths, "upload", real_upload)
  writer.write(2, {"loss": 1.0})
  writer.close()  # the retry uploads both records
  assert [r["step"] for r in metrics_lib.read_records("gs://bucket/m")] == [1, 2]
  writer = metrics_lib.MetricsWriter("gs://bucket/m", resume_step=2, trackers=("jsonl",))
  writer.write(3, {"loss": 0.5})
  monkeypatch.setattr(paths, "upload", network_down)
  writer.close()  # the last upload fails: the records stay on this host, named
  err = capsys.readouterr().err
  kept = err.split("the metrics of this run are kept in ")[1].split(":")[0]
  assert metrics_lib.read_records(kept)[-1] == {"step": 3, "loss": 0.5}, err
  shutil.rmtree(kept)
