"""Metrics of a run: trackers (``metrics.jsonl``, TensorBoard, wandb, log lines) and PNG plots.

Each logged step is one record ``{"step", "loss", "tokens_per_s", "grad_norm", "param_norm",
"update_norm", "learning_rate", ...}`` plus ``eval_loss`` and ``eval_ppl`` when the step evaluated,
``scored_fraction`` (the fraction of targets the loss kept) when the run packs documents
(``train.pack_documents``) and ``skipped_steps`` once a non-finite step was skipped. Only process
0 writes. ``MetricsWriter`` hands each record to the trackers of ``train.trackers``:

* ``jsonl``: ``DIR/metrics.jsonl``, one JSON object per line (``read_records``).
* ``tensorboard``: scalars in ``DIR/tensorboard`` (tensorboardX).
* ``wandb``: a Weights & Biases run (extra ``nlx[wandb]``) whose id is kept in ``DIR/wandb_id``, so
  that a resumed run continues the same wandb run (``resume="allow"``).

and, with ``log_lines`` (``nlx train --no_progress``, what pods run), prints each record as one
``key=value`` line on stdout (``log_line``).

A local workdir is appended to as records come. A remote one (``gs://``; GCS has no append) is
mirrored: the growing files are written in a local staging directory and uploaded whole
(``paths.upload``) at most every ``SYNC_EVERY_S`` seconds, at every checkpoint (``sync``) and at
the end, so the remote ``metrics.jsonl`` holds at least every step up to the newest checkpoint;
a resumed run drops the records after its checkpoint and logs those steps again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import string
import sys
import tempfile
import time
from typing import Optional, Sequence

from nlx.errors import ConfigError
from nlx.train import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"
SYNC_EVERY_S = 30.0  # the most a remote workdir's metrics lag behind (GCS: <= 1 write/s/object)
LINE_FIRST = ("loss", "eval_loss", "eval_ppl", "tokens_per_s", "learning_rate", "grad_norm")


def read_records(workdir: str) -> list[dict]:
  """The records of ``DIR/metrics.jsonl``, without a last line cut short by a killed process."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.isfile(path):
    return []
  with paths.path(path).open("rb") as f:
    lines = f.read().decode("utf-8", errors="replace").split("\n")
  # Each record is written with its newline: text after the last newline is a partial write.
  return [json.loads(line) for line in lines[:-1] if line.strip()]


def log_line(record: dict) -> str:
  """``step=20 loss=2.345 eval_loss=... tokens_per_s=...``: one record on one parseable line
  (``dict(kv.split("=") for kv in line.split())``); the main metrics first."""
  keys = [k for k in LINE_FIRST if k in record]
  keys += [k for k in record if k not in keys and k != "step"]
  return " ".join([f"step={int(record['step'])}"] + [f"{k}={record[k]:.6g}" for k in keys])


class _Staging:
  """A local mirror of a remote workdir's growing files, uploaded when changed (``sync``)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.root = tempfile.mkdtemp(prefix="nlx-metrics-")
    self._uploaded: dict = {}  # relative path -> (size, mtime) at its last upload

  def local(self, name: str) -> str:
    return os.path.join(self.root, name)

  def sync(self) -> None:
    for directory, _, files in os.walk(self.root):
      for name in files:
        local = os.path.join(directory, name)
        rel = os.path.relpath(local, self.root)
        stat = os.stat(local)
        if self._uploaded.get(rel) != (stat.st_size, stat.st_mtime_ns):
          paths.upload(local, paths.join(self.workdir, *rel.split(os.sep)))
          self._uploaded[rel] = (stat.st_size, stat.st_mtime_ns)

  def remove(self) -> None:
    shutil.rmtree(self.root, ignore_errors=True)


class JsonlTracker:
  """``DIR/metrics.jsonl``; a resumed run drops what was logged after its checkpoint."""

  def __init__(self, workdir: str, resume_step: int, staging: Optional[_Staging]):
    kept = [r for r in read_records(workdir) if r["step"] <= resume_step]
    path = staging.local(METRICS_FILE) if staging else paths.join(workdir, METRICS_FILE)
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    self._file = open(path, "a", encoding="utf-8")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self, failed: bool = False) -> None:
    del failed
    self._file.close()


class TensorBoardTracker:
  """Scalars in ``DIR/tensorboard`` (non-finite values left out)."""

  def __init__(self, workdir: str, staging: Optional[_Staging]):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(staging.local(TENSORBOARD_DIR) if staging
                             else paths.join(workdir, TENSORBOARD_DIR))

  def write(self, record: dict) -> None:
    for name, value in record.items():
      if name != "step" and math.isfinite(value):
        self._tb.add_scalar(name, value, record["step"])
    self._tb.flush()

  def close(self, failed: bool = False) -> None:
    del failed
    self._tb.close()


class WandbTracker:
  """A wandb run: its id in ``DIR/wandb_id`` (made by the first run, reused on resume)."""

  def __init__(self, workdir: str, config: Optional[dict], project: str,
               entity: Optional[str]):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("train.trackers includes 'wandb' but wandb is not installed: pip "
                        "install 'nlx[wandb]' (or drop 'wandb' from train.trackers)") from None
    id_file = paths.join(workdir, WANDB_ID_FILE)
    if paths.isfile(id_file):
      run_id = paths.read_text(id_file).strip()
    else:
      run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
      paths.write_text(id_file, run_id + "\n")
    # Its local files: $WANDB_DIR, else the workdir (WORKDIR/wandb) when local, else wandb's
    # default (./wandb): wandb writes them with local file APIs.
    local_dir = os.environ.get("WANDB_DIR") or (None if paths.is_url(workdir) else workdir)
    self.run_id = run_id
    self.run = wandb.init(project=project, entity=entity, id=run_id, resume="allow",
                          config=config, dir=local_dir, name=paths.basename(workdir))

  def write(self, record: dict) -> None:
    self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

  def close(self, failed: bool = False) -> None:
    self.run.finish(exit_code=1 if failed else 0)


class LogLineTracker:
  """Prints each record as one ``log_line`` on stdout (flushed: pod logs show it at once)."""

  def write(self, record: dict) -> None:
    print(log_line(record), flush=True)

  def close(self, failed: bool = False) -> None:
    del failed


class MetricsWriter:
  """Hands each record to the trackers of a run (process 0 only; ``enabled=False`` elsewhere).

  Args:
    workdir: the run directory (local or ``gs://``).
    resume_step: the step of the restored checkpoint (0: a fresh run).
    enabled: False on the processes other than 0: nothing is written.
    trackers: names of ``nlx.train.config.TRACKERS`` (``train.trackers``).
    config: the run config as a dict (wandb's run config).
    wandb_project, wandb_entity: the wandb run's project and entity.
    log_lines: print each record as one line on stdout (``log_line``).
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
               trackers: Sequence[str] = ("jsonl", "tensorboard"), *,
               config: Optional[dict] = None, wandb_project: str = "nlx",
               wandb_entity: Optional[str] = None, log_lines: bool = False):
    self.enabled, self.trackers, self._staging = enabled, [], None
    if not enabled:
      return
    self._staging = _Staging(workdir) if paths.is_url(workdir) else None
    self._last_sync = time.monotonic()
    try:
      for name in trackers:
        if name == "jsonl":
          self.trackers.append(JsonlTracker(workdir, resume_step, self._staging))
        elif name == "tensorboard":
          self.trackers.append(TensorBoardTracker(workdir, self._staging))
        elif name == "wandb":
          self.trackers.append(WandbTracker(workdir, config, wandb_project, wandb_entity))
        else:
          raise ConfigError(f"train.trackers: {name!r} is not a tracker; allowed: "
                            "['jsonl', 'tensorboard', 'wandb']")
      if log_lines:
        self.trackers.append(LogLineTracker())
      self.sync()  # a resumed remote run: its metrics.jsonl trimmed to the checkpoint now
    except BaseException:
      self.close(failed=True)
      raise

  def write(self, step: int, metrics: dict) -> None:
    """Logs ``metrics`` (name -> number) of ``step`` to every tracker."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    for tracker in self.trackers:
      tracker.write(record)
    if self._staging and time.monotonic() - self._last_sync >= SYNC_EVERY_S:
      self.sync()

  def sync(self) -> bool:
    """Uploads what changed in a remote workdir's staged files (nothing to do when local).

    A failed upload (a network error) does not stop the run: it is a warning, and the next sync
    uploads again. Returns whether everything is uploaded.
    """
    if not self._staging:
      return True
    self._last_sync = time.monotonic()
    try:
      self._staging.sync()
    except Exception as e:  # pylint: disable=broad-except  (training goes on; retried)
      print(f"warning: uploading the metrics to {self._staging.workdir} failed: "
            f"{type(e).__name__}: {e}; retried at the next sync (local copy: "
            f"{self._staging.root})", file=sys.stderr)
      return False
    return True

  def close(self, failed: bool = False) -> None:
    """Closes every tracker (``failed``: the run ended with an error), then uploads."""
    if not self.enabled:
      return
    errors = []
    for tracker in self.trackers:
      try:
        tracker.close(failed)
      except Exception as e:  # pylint: disable=broad-except  (close the others, then raise)
        errors.append(e)
    self.trackers = []
    if self._staging:
      if self.sync():
        self._staging.remove()
      else:
        print(f"warning: the metrics of this run are kept in {self._staging.root}: copy them "
              f"to {self._staging.workdir}", file=sys.stderr)
      self._staging = None
    if errors:
      raise errors[0]


PLOTS = (("loss", ("loss", "eval_loss"), "cross-entropy (nats/token)"),
         ("eval_ppl", ("eval_ppl",), "validation perplexity"),
         ("tokens_per_s", ("tokens_per_s",), "tokens / s"),
         ("norms", ("grad_norm", "update_norm"), "global norm"))


def plot(workdir: str, title: Optional[str] = None) -> list[str]:
  """Writes ``DIR/plots/<name>.png`` for each curve present in metrics.jsonl; returns the paths.

  Drawn in a local temporary directory, then copied into a remote workdir (``gs://``).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_records(workdir)
  out_dir = paths.join(workdir, "plots")
  remote = paths.is_url(workdir)
  local_dir = tempfile.mkdtemp(prefix="nlx-plots-") if remote else out_dir
  os.makedirs(local_dir, exist_ok=True)
  written = []
  try:
    for name, keys, ylabel in PLOTS:
      series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
      if not any(series.values()):
        continue
      fig, ax = plt.subplots(figsize=(6, 4))
      for key, points in series.items():
        if points:
          ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
      ax.set_xlabel("step")
      ax.set_ylabel(ylabel)
      ax.set_title(title or paths.basename(workdir))
      ax.grid(alpha=0.3)
      ax.legend()
      local = os.path.join(local_dir, f"{name}.png")
      fig.tight_layout()
      fig.savefig(local, dpi=100)
      plt.close(fig)
      if remote:
        paths.upload(local, paths.join(out_dir, f"{name}.png"))
      written.append(paths.join(out_dir, f"{name}.png"))
  finally:
    if remote:
      shutil.rmtree(local_dir, ignore_errors=True)
  return written

