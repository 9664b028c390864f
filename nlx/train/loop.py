"""The training loop of ``nlx train``: data, state, steps, evaluation, metrics, checkpoints, plots.

``train(config, workdir)`` validates the config for this run's devices, saves the resolved config
(``DIR/config.json``), restores the latest checkpoint of ``DIR/checkpoints`` or initializes, and
runs ``train.steps`` steps. Every ``log_every`` steps it logs loss, tokens/s and norms (progress
bar, ``metrics.jsonl``, TensorBoard); every ``eval_every`` steps (and at the end) the validation
loss and perplexity; every ``checkpoint_every`` steps (at the end, and on SIGTERM) a checkpoint.
A non-finite loss or gradient norm stops the run without saving.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np

from nlx.data import pipeline
from nlx.train import checkpoint as checkpoint_lib
from nlx.train import config as run_config
from nlx.train import metrics as metrics_lib
from nlx.train import optimizer as optimizer_lib
from nlx.train import sharding
from nlx.train import step as step_lib

CONFIG_FILE = "config.json"


def prepare(cfg, workdir: str):
  """``(run, tokenizer, train windows, val windows)``: the data, then the validated config."""
  draft = run_config.validate(cfg)
  tokenizer, train_windows, val_windows = pipeline.load_splits(draft.data, draft.train.seq_len,
                                                               workdir)
  run = run_config.validate(cfg, n_devices=jax.device_count(), n_processes=jax.process_count(),
                            tokenizer_vocab=tokenizer.vocab_size)
  return run, tokenizer, train_windows, val_windows


def save_config(cfg, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2) + "\n")


def evaluate(eval_step, params, batches: list, batch_sharding) -> float:
  """Mean loss over ``batches`` (each this host's rows of one global batch)."""
  losses = [eval_step(params, sharding.global_batch(b, batch_sharding)) for b in batches]
  return float(np.mean(jax.device_get(losses)))


def _check_finite(step: int, metrics: dict) -> None:
  for name in ("loss", "grad_norm"):
    if not math.isfinite(metrics[name]):
      raise FloatingPointError(f"step {step}: {name}={metrics[name]} is not finite; stopping "
                               "without saving (lower optimizer.learning_rate or check the data)")


def train(cfg, workdir: str, *, checkpoint_dir: Optional[str] = None, progress: bool = True,
          async_checkpoints: bool = True, stop_at: Optional[int] = None) -> dict:
  """Trains ``cfg`` (a run ConfigDict) in ``workdir``; returns the last logged record.

  Args:
    cfg: the run config.
    workdir: metrics, TensorBoard, plots, the resolved config (a local directory).
    checkpoint_dir: checkpoints (default ``workdir/checkpoints``; may be ``gs://...``).
    progress: show a tqdm progress bar (process 0).
    async_checkpoints: write checkpoints in the background.
    stop_at: stop after this step with a checkpoint, as a preemption does (a job time limit);
      running again resumes.
  """
  os.makedirs(workdir, exist_ok=True)
  run, _, train_windows, val_windows = prepare(cfg, workdir)
  save_config(cfg, workdir)
  t = run.train
  mesh = sharding.make_mesh(run.mesh)
  trainer = step_lib.build(run, mesh)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir or os.path.join(workdir, "checkpoints"),
                                     t.keep_checkpoints, async_checkpoints)
  data_iter = pipeline.train_iterator(
      train_windows, batch_size=t.batch_size, steps=t.steps, seed=t.seed,
      shuffle=run.data.shuffle, process_index=jax.process_index(),
      process_count=jax.process_count(), threads=run.data.prefetch_threads)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(trainer.abstract_state)
    data_iter.set_state(data_state)
  else:
    state = step_lib.init_state(trainer, run.model, t.seed)
  start = int(jax.device_get(state["step"]))
  val = pipeline.eval_batches(val_windows, batch_size=t.batch_size, n_batches=t.eval_batches,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  train_step, eval_step = step_lib.jit_train_step(trainer), step_lib.jit_eval_step(trainer)
  writer = metrics_lib.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
  lr = optimizer_lib.schedule(run.optimizer, t.steps)
  ckpt.watch_sigterm()
  record, bar = {}, _progress_bar(start, t.steps, progress)
  tokens_per_step = t.batch_size * t.seq_len
  last_time, last_step = None, start
  try:
    for step in range(start, t.steps):
      batch = sharding.global_batch(next(data_iter), trainer.batch_sharding)
      state, metrics = train_step(state, batch)
      done = step + 1
      if last_time is None:  # time from the end of the first (compiling) step
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), done
      if done % t.log_every == 0 or done == t.steps:
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(done, record)
        now = time.perf_counter()
        if done > last_step:
          record["tokens_per_s"] = (done - last_step) * tokens_per_step / (now - last_time)
        last_time, last_step = now, done
        record["learning_rate"] = float(lr(done - 1))
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
          record["eval_loss"] = evaluate(eval_step, state["params"], val,
                                         trainer.batch_sharding)
          record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
        writer.write(done, record)
        last_time = time.perf_counter()  # evaluation is not training time
        if bar is not None:
          bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "tokens_per_s", "eval_ppl")
                           if k in record})
      if bar is not None:
        bar.update(1)
      stop = ckpt.should_stop() or done == stop_at
      if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps or stop:
        ckpt.save(done, state, data_iter.get_state())
        last_time = time.perf_counter()
      if stop:
        break
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
  if t.plots and jax.process_index() == 0:
    metrics_lib.plot(workdir, f"{run.model.family} ({os.path.basename(workdir.rstrip('/'))})")
  return {"step": int(jax.device_get(state["step"])), **record}


def _progress_bar(start: int, total: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)


def load_workdir_config(workdir: str):
  """The resolved run ConfigDict saved by ``train`` in ``workdir``."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"--workdir {workdir!r} has no {CONFIG_FILE}; is it the workdir of "
                     "'nlx train'?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))
