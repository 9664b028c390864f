"""Metrics of a run: ``DIR/metrics.jsonl``, TensorBoard event files, and PNG plots at the end.

Each logged step is one JSON object ``{"step", "loss", "tokens_per_s", "grad_norm",
"param_norm", "update_norm", "learning_rate", ...}`` plus ``eval_loss`` and ``eval_ppl`` when the
step evaluated, and ``scored_fraction`` (the fraction of targets the loss kept) when the run packs
documents (``train.pack_documents``). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

METRICS_FILE = "metrics.jsonl"


def read_records(workdir: str) -> list[dict]:
  """The records of ``DIR/metrics.jsonl``, without a last line cut short by a killed process."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  # Each record is written with its newline: text after the last newline is a partial write.
  return [json.loads(line) for line in lines[:-1] if line.strip()]


class MetricsWriter:
  """Appends records to metrics.jsonl and TensorBoard scalars to ``DIR/tensorboard``."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
    # A resumed run drops what was logged after its checkpoint, then logs those steps again.
    kept = [r for r in read_records(workdir) if r["step"] <= resume_step]
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._jsonl = open(path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      if name != "step" and math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


PLOTS = (("loss", ("loss", "eval_loss"), "cross-entropy (nats/token)"),
         ("eval_ppl", ("eval_ppl",), "validation perplexity"),
         ("tokens_per_s", ("tokens_per_s",), "tokens / s"),
         ("norms", ("grad_norm", "update_norm"), "global norm"))


def plot(workdir: str, title: Optional[str] = None) -> list[str]:
  """Writes ``DIR/plots/<name>.png`` for each curve present in metrics.jsonl; returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_records(workdir)
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
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
    ax.set_title(title or os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
