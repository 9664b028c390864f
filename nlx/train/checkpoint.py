"""Checkpoints: one orbax ``CheckpointManager`` around the train state and the data iterator.

Each checkpoint ``DIR/<step>/`` holds ``state`` (params, optimizer state, RNG and step, saved
sharded by every host) and ``data`` (the grain iterator state, JSON). Saves are asynchronous
(training continues while they are written), atomic (a step directory appears only when complete)
and keep the newest ``keep`` checkpoints. ``restore`` reads into the sharded abstract state, so
each device loads only its shard. ``DIR`` is a local path or a ``gs://`` URL (``nlx.train.paths``;
on GCS, which cannot rename a directory, orbax marks a complete step with ``commit_success.txt``).
A SIGTERM (preemption) sets ``preempted``; the loop then saves and exits at the next step boundary
(on several hosts, one step later: the hosts vote without stalling, ``should_stop``).

A save that fails (an unwritable directory, a full disk, an I/O error) is a ``CheckpointError``
naming the step and the path, raised at the first step boundary after the background write fails
(``raise_if_failed``, polled by the loop every step without blocking) and at the latest by the next
``save`` or ``close``; the failed step never becomes a checkpoint, so the previous one stays the
newest. ``preflight`` checks before training that the directory can be created and written (a
probe file, or object) and that a local disk has room for one checkpoint.

A process killed while saving leaves at most a ``<step>.orbax-checkpoint-tmp-*`` directory, which
is never a step (and is removed when the manager opens the directory). Before reading a step,
``restore`` compares the saved tree (every path, shape and dtype) with this run's state, so a
checkpoint of another config is refused by name rather than loaded; any failure to read a step is
a ``CheckpointError`` naming it. ``restore_newest_good`` can instead move a bad step aside
(``DIR/bad-<step>``) and fall back to the newest one that reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nlx.errors import CheckpointError
from nlx.train import paths
from nlx.train.step import param_paths


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``directory`` (a path or ``gs://`` URL)."""

  def __init__(self, directory: str, keep: int, async_save: bool = True, read_only: bool = False):
    directory = paths.check(directory, "--checkpoint_dir")  # absolute: orbax refuses relative
    if not read_only:
      _check_writable(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    # Handlers named up front, so that a fresh manager can read a step's metadata before restoring.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    self.preempted = threading.Event()
    self._pending: Optional[int] = None  # the step of the save in flight (not yet checked)
    self._vote, self._vote_fn, self._vote_sharding = None, None, None  # should_stop, hosts > 1

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def preflight(self, state_bytes: int) -> None:
    """Refuses, before any training, a local disk without room for one checkpoint.

    Args:
      state_bytes: the size of one saved state; the disk must have at least this much free.

    Raises:
      CheckpointError: naming the directory, its free space and the need.
    """
    if paths.is_url(self.directory):
      return
    free = shutil.disk_usage(self.directory).free
    if free < state_bytes:
      raise CheckpointError(f"checkpoint directory {self.directory} has {free / 2**20:.1f} MiB "
                            f"free; one checkpoint needs {state_bytes / 2**20:.1f} MiB")

  def save(self, step: int, state: dict, data_state: dict) -> None:
    """Starts writing ``DIR/<step>`` (in the background when asynchronous).

    Raises:
      CheckpointError: the previous save failed, or this one could not start.
    """
    self.raise_if_failed(block=True)  # one save in flight at a time; a failure is never skipped
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_state)),
                        force=True)
    except Exception as e:  # pylint: disable=broad-except  (any failure: name the step and path)
      raise CheckpointError(self._save_failure(step, e)) from e
    self._pending = step

  def raise_if_failed(self, block: bool = False) -> None:
    """Raises if the save in flight has failed; without ``block``, returns while it runs.

    Raises:
      CheckpointError: naming the step, the path, the error and the newest good checkpoint.
    """
    if self._pending is None or (not block and self.manager.is_saving_in_progress()):
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._save_failure(step, e)) from e

  def _save_failure(self, step: int, error: Exception) -> str:
    self.manager.reload()  # the failed step is not a checkpoint; rescan what is on disk
    good = self.manager.latest_step()
    kept = (f"the newest good checkpoint is step {good}" if good is not None
            else "no checkpoint of this run exists yet")
    return (f"saving checkpoint step {step} to {self.directory}/{step} failed: "
            f"{type(error).__name__}: {error}; {kept}; stopped")

  def restore(self, abstract_state: dict, step: Optional[int] = None) -> tuple[dict, dict]:
    """``(state, data_state)`` of ``step`` (default: the latest), sharded like the abstract."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint to restore in {self.manager.directory}")
    where = f"checkpoint step {step} ({self.manager.directory}/{step})"
    try:
      saved = self.manager.item_metadata(step)["state"]
      if saved is None:
        raise ValueError("no metadata of the state")
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file: name the step)
      raise CheckpointError(f"{where} cannot be read: {type(e).__name__}: {e}") from e
    mismatch = tree_mismatch(saved, abstract_state)
    if mismatch:
      raise CheckpointError(f"{where} is of another model or config: {mismatch}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{where} is corrupt or incomplete: {type(e).__name__}: {e}") from e
    return restored["state"], restored["data"]

  def restore_newest_good(self, abstract_state: dict,
                          fallback: bool = False) -> Optional[tuple[int, dict, dict]]:
    """``(step, state, data_state)`` of the newest checkpoint; None when there is none.

    Args:
      abstract_state: the sharded ``ShapeDtypeStruct`` tree of this run's state.
      fallback: when the newest step cannot be restored, move it aside (``DIR/bad-<step>``, kept
        for inspection) and try the next newest, down to the oldest.

    Raises:
      CheckpointError: the newest step is bad and not ``fallback``, or every step is bad.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return (step, *self.restore(abstract_state, step))
      except CheckpointError as e:
        if not fallback:
          raise CheckpointError(f"{e}\n(--fallback_to_good_checkpoint resumes from the newest "
                                "good checkpoint instead)") from e
        print(f"warning: {e}; moved aside, trying an older checkpoint", file=sys.stderr)
        failures.append(str(e))
        self._move_aside(step)
    if failures:
      raise CheckpointError("no good checkpoint to resume from:\n" + "\n".join(failures))
    return None

  def _move_aside(self, step: int) -> None:
    """Renames ``DIR/<step>`` to ``DIR/bad-<step>[-<time>]`` (process 0), then rescans."""
    directory = epath.Path(self.manager.directory)
    if jax.process_index() == 0:
      target = directory / f"bad-{step}"
      if target.exists():
        target = directory / f"bad-{step}-{int(time.time())}"
      (directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"nlx_checkpoint_move_aside_{step}")
    self.manager.reload()

  def watch_sigterm(self) -> None:
    """On SIGTERM, set ``preempted`` (the loop saves and stops); main thread only."""
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda signum, frame: self.preempted.set())

  def should_stop(self) -> bool:
    """Whether a host got SIGTERM: the loop then saves and stops (called once per step).

    One process: its own flag. Several must stop at the same step, so they vote: a collective
    over every device combines the flags (``_any_process``); the vote is dispatched by this call
    and read by the next one, while the step dispatched in between runs, so the host never waits
    for an idle device (a per-step fetch would stall the pipeline). All hosts read the same vote
    at the same call: they stop together, one step after the signal.
    """
    if jax.process_count() == 1:
      return self.preempted.is_set()
    vote, self._vote = self._vote, self._any_process(self.preempted.is_set())
    return vote is not None and bool(vote)

  def _any_process(self, flag: bool) -> jax.Array:
    """Whether ``flag`` is set on any process: a replicated bool scalar, not yet fetched."""
    if self._vote_fn is None:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("processes",))
      self._vote_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          "processes"))
      self._vote_fn = jax.jit(lambda flags: flags.any(), out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
    local = np.full((jax.local_device_count(),), flag)
    flags = jax.make_array_from_process_local_data(self._vote_sharding, local,
                                                   (jax.device_count(),))
    return self._vote_fn(flags)

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager.

    Raises:
      CheckpointError: that save failed.
    """
    try:
      self.raise_if_failed(block=True)
    finally:
      self.manager.close()


def _check_writable(directory: str) -> None:
  """Creates ``directory`` and writes a probe file in it (an object, on GCS), then removes it.

  Raises:
    CheckpointError: naming the directory and the error.
  """
  probe = paths.join(directory, f".nlx-write-test-{jax.process_index()}-{os.getpid()}")
  try:
    paths.makedirs(directory)
    paths.write_text(probe, "nlx")
    paths.path(probe).unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError; tf.io.gfile's own errors)
    why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    raise CheckpointError(f"checkpoint directory {directory} is not writable: {why}; choose "
                          "another --workdir or --checkpoint_dir") from e


def tree_mismatch(saved, abstract) -> Optional[str]:
  """The first difference between a saved tree's metadata and ``abstract``; None if they agree.

  Args:
    saved: orbax metadata of a saved state (leaves with ``shape`` and ``dtype``).
    abstract: the ``ShapeDtypeStruct`` tree it should restore into.
  """
  def table(tree) -> dict:
    return dict(zip(param_paths(tree), jax.tree.leaves(tree)))

  saved, wanted = table(saved), table(abstract)
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    return (f"{len(missing)} tensor(s) of this config are not in it (first: {missing[:3]}) and "
            f"{len(extra)} of its tensors are not in this config (first: {extra[:3]})")
  for path in sorted(wanted, key=lambda p: not p.startswith("params/")):  # parameters first
    have, want = saved[path], wanted[path]
    if tuple(have.shape) != tuple(want.shape) or str(have.dtype) != str(want.dtype):
      return (f"{path} is {have.dtype}{list(have.shape)} in the checkpoint, "
              f"{want.dtype}{list(want.shape)} in this config")
  return None
