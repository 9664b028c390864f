"""Checkpoints: one orbax ``CheckpointManager`` around the train state and the data iterator.

Each checkpoint ``DIR/<step>/`` holds ``state`` (params, optimizer state, RNG and step, saved
sharded by every host) and ``data`` (the grain iterator state, JSON). Saves are asynchronous
(training continues while they are written), atomic (a step directory appears only when complete)
and keep the newest ``keep`` checkpoints. ``restore`` reads into the sharded abstract state, so
each device loads only its shard. A SIGTERM (preemption) sets ``preempted``; the loop then saves
and exits at the next step boundary.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``directory`` (a path or ``gs://`` URL)."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options)
    self.preempted = threading.Event()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)),
                      force=True)

  def restore(self, abstract_state: dict, step: Optional[int] = None) -> tuple[dict, dict]:
    """``(state, data_state)`` of ``step`` (default: the latest), sharded like the abstract."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint to restore in {self.manager.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def watch_sigterm(self) -> None:
    """On SIGTERM, set ``preempted`` (the loop saves and stops); main thread only."""
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda signum, frame: self.preempted.set())

  def should_stop(self) -> bool:
    """Whether any host got SIGTERM (agreed over all hosts so that all save together)."""
    flag = self.preempted.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(multihost_utils.process_allgather(jax.numpy.asarray(flag)).any())
    return flag

  def close(self) -> None:
    """Waits for pending asynchronous saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
