"""The training loop of ``nlx train``: data, state, steps, evaluation, metrics, checkpoints, plots.

``train(config, workdir)`` validates the config for this run's devices, saves the resolved config
(``DIR/config.json``), restores the latest checkpoint of ``DIR/checkpoints`` or initializes, and
runs ``train.steps`` steps. Every ``log_every`` steps it logs loss, tokens/s and norms (progress
bar, ``metrics.jsonl``, TensorBoard); every ``eval_every`` steps (and at the end) the validation
loss and perplexity; every ``checkpoint_every`` steps (at the end, and on SIGTERM) a checkpoint.
With ``train.pack_documents`` in force (``RunConfig.pack_documents``) the batches carry segment
ids: the model reads each document apart, and the training and validation losses leave out the
targets that start a document (the validation loss is token-weighted over its batches).

Faults (docs/RELIABILITY.md): a step whose loss, gradients or new parameters hold a NaN/Inf stops
the run without saving (``on_nonfinite="stop"``: a ``NonFiniteError`` naming the step and the first
non-finite tensor) or is skipped (``"skip"``: parameters unchanged, counted in ``skipped_steps``).
A checkpoint that cannot be restored is a ``CheckpointError`` naming its step, unless
``fallback_to_good_checkpoint`` resumes from the newest good one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import jax
import numpy as np

from nlx.data import pipeline
from nlx.errors import ConfigError, NonFiniteError
from nlx.train import checkpoint as checkpoint_lib
from nlx.train import config as run_config
from nlx.train import metrics as metrics_lib
from nlx.train import optimizer as optimizer_lib
from nlx.train import paths as paths_lib
from nlx.train import sharding
from nlx.train import step as step_lib

CONFIG_FILE = "config.json"
ON_NONFINITE = ("stop", "skip")


def prepare(cfg, workdir: str):
  """``(run, tokenizer, train windows, val windows)``: the data, then the validated config.

  The windows are ``nlx.data.pipeline.pack_segments``' dicts when the run packs documents
  (``RunConfig.pack_documents``), arrays of tokens otherwise.
  """
  draft = run_config.validate(cfg)
  tokenizer, train_windows, val_windows = pipeline.load_splits(
      draft.data, draft.train.seq_len, workdir, segment_ids=draft.pack_documents)
  run = run_config.validate(cfg, n_devices=jax.device_count(), n_processes=jax.process_count(),
                            tokenizer_vocab=tokenizer.vocab_size)
  return run, tokenizer, train_windows, val_windows


def save_config(cfg, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2) + "\n")


def to_global(batch, batch_sharding):
  """The global batch of this host's rows: an array, or a dict of arrays (segment ids)."""
  return jax.tree.map(lambda rows: sharding.global_batch(rows, batch_sharding), batch)


def evaluate(eval_step, params, batches: list, batch_sharding) -> float:
  """Mean loss over ``batches`` (each this host's rows of one global batch).

  Batches of tokens all have as many targets: the mean of their means. With segment ids the
  targets each batch kept differ: the mean is weighted by them (every kept target counts once).
  """
  results = jax.device_get([eval_step(params, to_global(b, batch_sharding)) for b in batches])
  losses = [loss for loss, _ in results]
  if not any(isinstance(b, dict) for b in batches):
    return float(np.mean(losses))
  counts = np.asarray([n for _, n in results], np.float64)
  return float(np.dot(np.asarray(losses, np.float64), counts) / max(counts.sum(), 1.0))


def nonfinite_report(step: int, metrics: dict, paths: list) -> Optional[str]:
  """What was not finite in ``step`` (its loss, first gradient, first parameter); None if all was.

  Args:
    step: the step number (1-based, as logged).
    metrics: host values of ``loss`` and ``nlx.train.step.NONFINITE_KEYS``.
    paths: ``nlx.train.step.param_paths`` of the parameters.
  """
  flags = {k: np.asarray(metrics[k]) for k in step_lib.NONFINITE_KEYS}
  loss = float(metrics["loss"])
  if math.isfinite(loss) and not any(f.any() for f in flags.values()):
    return None
  parts = [f"loss={loss}"]
  for key, what in zip(step_lib.NONFINITE_KEYS, ("gradient", "updated parameter")):
    bad = np.flatnonzero(flags[key])
    if bad.size:
      parts.append(f"first non-finite {what}: {paths[bad[0]]} ({bad.size} of {len(paths)} "
                   "tensors non-finite)")
  return f"step {step}: non-finite values: " + "; ".join(parts)


def _handle_nonfinite(report: str, policy: str, ckpt) -> None:
  if policy == "stop":
    raise NonFiniteError(
        f"{report}. Stopped without saving; the newest checkpoint (step {ckpt.latest_step()}) is "
        "intact. Lower optimizer.learning_rate, check the data, or pass --on_nonfinite=skip")
  print(f"warning: {report}; step skipped (parameters unchanged)", file=sys.stderr)


def train(cfg, workdir: str, *, checkpoint_dir: Optional[str] = None, progress: bool = True,
          async_checkpoints: bool = True, stop_at: Optional[int] = None,
          on_nonfinite: str = "stop", fallback_to_good_checkpoint: bool = False) -> dict:
  """Trains ``cfg`` (a run ConfigDict) in ``workdir``; returns the last logged record.

  Args:
    cfg: the run config.
    workdir: metrics, TensorBoard, plots, the resolved config (a local directory).
    checkpoint_dir: checkpoints (default ``workdir/checkpoints``; may be ``gs://...``).
    progress: show a tqdm progress bar (process 0).
    async_checkpoints: write checkpoints in the background.
    stop_at: stop after this step with a checkpoint, as a preemption does (a job time limit);
      running again resumes.
    on_nonfinite: ``"stop"`` (raise ``NonFiniteError`` without saving) or ``"skip"`` (keep the
      parameters, go on) when a step's loss, gradients or parameters are not finite.
    fallback_to_good_checkpoint: when the newest checkpoint cannot be restored (corrupt, or of
      another config), move it aside and resume from the newest good one instead of raising.
  """
  if on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f"on_nonfinite={on_nonfinite!r} is not allowed; allowed: "
                      f"{list(ON_NONFINITE)}")
  workdir = paths_lib.resolve(workdir)
  checkpoint_dir = paths_lib.resolve(checkpoint_dir or os.path.join(workdir, "checkpoints"))
  os.makedirs(workdir, exist_ok=True)
  run, _, train_windows, val_windows = prepare(cfg, workdir)
  t = run.train
  if t.init_from and not paths_lib.is_url(t.init_from) and not os.path.isfile(
      os.path.join(t.init_from, "config.json")):
    raise ConfigError(f"train.init_from={t.init_from!r} is not a pretrained directory (no "
                      "config.json); allowed: a directory of 'nlx export', 'nlx convert' or "
                      "LM.save_pretrained")
  mesh = sharding.make_mesh(run.mesh)
  trainer = step_lib.build(run, mesh)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir, t.keep_checkpoints, async_checkpoints)
  ckpt.preflight(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state)))
  data_iter = pipeline.train_iterator(
      train_windows, batch_size=t.batch_size, steps=t.steps, seed=t.seed,
      shuffle=run.data.shuffle, process_index=jax.process_index(),
      process_count=jax.process_count(), threads=run.data.prefetch_threads)
  restored = ckpt.restore_newest_good(trainer.abstract_state, fallback_to_good_checkpoint)
  if restored is not None:
    resumed, state, data_state = restored
    data_iter.set_state(data_state)
    if jax.process_index() == 0:
      print(f"resuming from checkpoint step {resumed} ({ckpt.directory}/{resumed})",
            file=sys.stderr)
  else:
    state = step_lib.init_state(trainer, run.model, t.seed)
    if t.init_from:  # a converted or exported model: its parameters, a fresh optimizer
      from nlx import pretrained  # pylint: disable=g-import-not-at-top
      state["params"] = pretrained.init_params(t.init_from, run.model,
                                                 trainer.abstract_state["params"], seed=t.seed)
      state["opt_state"] = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings[
          "opt_state"])(state["params"])
      if jax.process_index() == 0:
        print(f"starting from the parameters of {t.init_from}", file=sys.stderr)
  save_config(cfg, workdir)  # after the restore: a refused checkpoint leaves the workdir as it was
  if t.trainable and jax.process_index() == 0:  # adapters: say what trains
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"])]
    trains = sum(n for n, on in zip(sizes, trainer.trainable) if on)
    print(f"train.trainable: {trains:,} of {sum(sizes):,} parameters train; the others stay "
          "fixed", file=sys.stderr)
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
  paths, skipped = step_lib.param_paths(trainer.abstract_state["params"]), 0
  try:
    for step in range(start, t.steps):
      batch = to_global(next(data_iter), trainer.batch_sharding)
      state, metrics = train_step(state, batch)
      ckpt.raise_if_failed()  # a background save that failed stops the run now, not at the end
      done = step + 1
      report = nonfinite_report(done, jax.device_get(
          {k: metrics[k] for k in ("loss",) + step_lib.NONFINITE_KEYS}), paths)
      if report:
        _handle_nonfinite(report, on_nonfinite, ckpt)
        skipped += 1
      if last_time is None:  # time from the end of the first (compiling) step
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), done
      if done % t.log_every == 0 or done == t.steps:
        record = {k: float(v) for k, v in jax.device_get(metrics).items()
                  if k not in step_lib.NONFINITE_KEYS}
        if skipped:
          record["skipped_steps"] = skipped
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
