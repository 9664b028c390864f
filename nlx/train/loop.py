"""The training loop of ``nlx train``: data, state, steps, evaluation, metrics, checkpoints, plots.

``train(config, workdir)`` validates the config for this run's devices, saves the resolved config
(``DIR/config.json``), restores the latest checkpoint of ``DIR/checkpoints`` or initializes, and
runs ``train.steps`` steps. Every ``log_every`` steps it logs loss, tokens/s and norms to the
trackers of ``train.trackers`` (``metrics.jsonl``, TensorBoard, wandb; ``nlx.train.metrics``) and
to the progress bar, or without one (``progress=False``, ``nlx train --no_progress``) as one
``key=value`` line on stdout; every ``eval_every`` steps (and at the end) the validation loss and
perplexity; every ``checkpoint_every`` steps (at the end, and on SIGTERM) a checkpoint. The
workdir and the checkpoint directory may be ``gs://`` URLs (``nlx.train.paths``). With
``train.pack_documents`` in force (``RunConfig.pack_documents``) the batches carry segment ids:
the model reads each document apart, and the training and validation losses leave out the
targets that start a document (the validation loss is token-weighted over its batches).

Faults (docs/RELIABILITY.md): a step whose loss, gradients or new parameters hold a NaN/Inf keeps
the parameters as they were (``nlx.train.step``) and is recorded in the step guard on the device;
the host reads the guard when it checks (``train.check_finite``: ``log_steps``, the default, at
log steps, checkpoint steps and the end, so the device pipeline never waits on a per-step fetch;
``every_step`` after each step). A check that finds non-finite steps stops the run without
saving (``on_nonfinite="stop"``: a ``NonFiniteError`` naming the first non-finite step and its
first non-finite tensor, and how many steps since the last check were skipped) or goes on
(``"skip"``: counted in ``skipped_steps``). A checkpoint that cannot be restored is a
``CheckpointError`` naming its step, unless ``fallback_to_good_checkpoint`` resumes from the
newest good one.
"""

from __future__ import annotations

import json
import math
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
                            tokenizer_vocab=tokenizer.vocab_size,
                            n_slices=sharding.slice_count(jax.devices()))
  return run, tokenizer, train_windows, val_windows


def save_config(cfg, workdir: str) -> None:
  """Writes ``cfg`` as ``DIR/config.json`` (process 0; whole, never half written)."""
  if jax.process_index() == 0:
    paths_lib.write_text(paths_lib.join(workdir, CONFIG_FILE), cfg.to_json(indent=2) + "\n")


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


def guard_report(guard: dict, param_paths: list) -> Optional[str]:
  """``nonfinite_report`` of the first non-finite step a step guard saw; None if it saw none.

  Args:
    guard: host values of ``nlx.train.step.init_guard``'s tree.
    param_paths: ``nlx.train.step.param_paths`` of the parameters.
  """
  if not int(guard["count"]):
    return None
  return nonfinite_report(int(guard["first_step"]), {
      "loss": guard["first_loss"], "nonfinite_grads": guard["first_grads"],
      "nonfinite_params": guard["first_params"]}, param_paths)


def _handle_nonfinite(guard: dict, param_paths: list, since: int, done: int, policy: str,
                      ckpt) -> None:
  """Stops (``NonFiniteError``) or warns about the non-finite steps of ``since + 1 .. done``."""
  report, count = guard_report(guard, param_paths), int(guard["count"])
  alone = count == 1 and int(guard["first_step"]) == done  # the check caught it at its step
  if alone:
    interval = ""
  else:
    interval = (f"{count} of steps {since + 1}-{done} were non-finite; each was skipped "
                "(parameters unchanged) and the others trained on until this check at step "
                f"{done} (train.check_finite='log_steps': checks at log and checkpoint steps)")
  if policy == "stop":
    newest = ckpt.latest_step()
    kept = ("no checkpoint of this run was written" if newest is None
            else f"the newest checkpoint (step {newest}) is intact")
    raise NonFiniteError(
        f"{report}. {interval + '. ' if interval else ''}Stopped without saving; {kept}. Lower "
        "optimizer.learning_rate, check the data, or pass --on_nonfinite=skip"
        + ("" if alone else " (--config.train.check_finite=every_step stops at the non-finite "
           "step itself)"))
  if alone:
    print(f"warning: {report}; step skipped (parameters unchanged)", file=sys.stderr)
  else:
    print(f"warning: {report}; {count} non-finite steps in steps {since + 1}-{done}, each step "
          "skipped (parameters unchanged)", file=sys.stderr)


def train(cfg, workdir: str, *, checkpoint_dir: Optional[str] = None, progress: bool = True,
          async_checkpoints: bool = True, stop_at: Optional[int] = None,
          on_nonfinite: str = "stop", fallback_to_good_checkpoint: bool = False) -> dict:
  """Trains ``cfg`` (a run ConfigDict) in ``workdir``; returns the last logged record.

  Args:
    cfg: the run config.
    workdir: metrics, TensorBoard, plots, the resolved config (a local directory or ``gs://``).
    checkpoint_dir: checkpoints (default ``workdir/checkpoints``; may be ``gs://...``).
    progress: show a tqdm progress bar (process 0); without it, each logged record is printed as
      one ``key=value`` line on stdout (``nlx.train.metrics.log_line``).
    async_checkpoints: write checkpoints in the background.
    stop_at: stop after this step with a checkpoint, as a preemption does (a job time limit);
      running again resumes.
    on_nonfinite: ``"stop"`` (raise ``NonFiniteError`` without saving) or ``"skip"`` (keep the
      parameters, go on) when a check finds a step whose loss, gradients or parameters were not
      finite (``train.check_finite`` says when the host checks).
    fallback_to_good_checkpoint: when the newest checkpoint cannot be restored (corrupt, or of
      another config), move it aside and resume from the newest good one instead of raising.
  """
  if on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f"on_nonfinite={on_nonfinite!r} is not allowed; allowed: "
                      f"{list(ON_NONFINITE)}")
  workdir = paths_lib.check(workdir, "--workdir")
  checkpoint_dir = paths_lib.check(checkpoint_dir or paths_lib.join(workdir, "checkpoints"),
                                   "--checkpoint_dir")
  paths_lib.makedirs(workdir)
  run, _, train_windows, val_windows = prepare(cfg, workdir)
  t = run.train
  if t.init_from:
    paths_lib.check(t.init_from, "train.init_from")
    if not paths_lib.is_url(t.init_from) and not paths_lib.isfile(
        paths_lib.join(t.init_from, "config.json")):
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
  train_step, eval_step = step_lib.jit_guarded_step(trainer), step_lib.jit_eval_step(trainer)
  writer = metrics_lib.MetricsWriter(
      workdir, start, enabled=jax.process_index() == 0, trackers=t.trackers,
      config=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
      wandb_project=t.wandb_project, wandb_entity=t.wandb_entity, log_lines=not progress)
  lr = optimizer_lib.schedule(run.optimizer, t.steps)
  ckpt.watch_sigterm()
  record, bar = {}, _progress_bar(start, t.steps, progress)
  tokens_per_step = t.batch_size * t.seq_len
  last_time, last_step = None, start
  param_paths, skipped = step_lib.param_paths(trainer.abstract_state["params"]), 0
  # The step guard (on the device): reset after each check, read only when the host checks.
  fresh_guard = jax.device_put(step_lib.init_guard(len(param_paths)),
                               sharding.replicated(trainer.mesh))
  guard, checked = fresh_guard, start  # the guard holds the steps after `checked`
  failed = True
  try:
    for step in range(start, t.steps):
      batch = to_global(next(data_iter), trainer.batch_sharding)
      state, guard, metrics = train_step(state, guard, batch)
      ckpt.raise_if_failed()  # a background save that failed stops the run now, not at the end
      done = step + 1
      log = done % t.log_every == 0 or done == t.steps
      stop = ckpt.should_stop() or done == stop_at
      save = bool(t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps or stop
      if save:  # the previous save's failure stops the run before this step is logged or saved
        ckpt.raise_if_failed(block=True)
      if t.check_finite == "every_step" or log or save:  # never save past an unchecked step
        seen = jax.device_get(guard)
        if int(seen["count"]):
          skipped += int(seen["count"])
          _handle_nonfinite(seen, param_paths, checked, done, on_nonfinite, ckpt)
          guard = fresh_guard
        checked = done
      if last_time is None:  # time from the end of the first (compiling) step
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), done
      if log:
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
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
      if save:
        writer.sync()  # a remote workdir's metrics: at least up to the newest checkpoint
        ckpt.save(done, state, data_iter.get_state())
        last_time = time.perf_counter()
      if stop:
        break
    failed = False
  finally:
    if bar is not None:
      bar.close()
    try:
      ckpt.close()
    except BaseException:
      failed = True
      raise
    finally:
      writer.close(failed=failed)
  if t.plots and jax.process_index() == 0:
    metrics_lib.plot(workdir, f"{run.model.family} ({paths_lib.basename(workdir)})")
  return {"step": int(jax.device_get(state["step"])), **record}


def _progress_bar(start: int, total: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)


def load_workdir_config(workdir: str):
  """The resolved run ConfigDict saved by ``train`` in ``workdir``."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = paths_lib.join(workdir, CONFIG_FILE)
  if not paths_lib.isfile(path):
    raise ValueError(f"--workdir {workdir!r} has no {CONFIG_FILE}; is it the workdir of "
                     "'nlx train'?")
  return ml_collections.ConfigDict(json.loads(paths_lib.read_text(path)))
