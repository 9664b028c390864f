"""Resumable study runs: the training state of one sweep saved as it trains, read back by a rerun.

A study whose runs outlast a session (an MQAR level of HOPE takes hours on 2 CPU cores) saves,
under ``DIR`` (one directory per sweep, e.g. ``<out>/checkpoints/hope_d64_P16``):

* the arrays of every run of the sweep (parameters and optimizer state) with nlx's orbax
  ``Checkpointer`` (``nlx.train.checkpoint``: atomic, the newest one kept, a saved tree of another
  shape refused by name), its step the number of the save;
* beside them, as JSON, each run's progress (its losses, curve, seconds, whether it stopped) and
  the ``fingerprint`` of the sweep (everything that decides its training: the model config, the
  data seed, the rates, the steps ...);
* ``result.json`` once the sweep is finished: a rerun reads it and trains nothing.

A rerun of the same command resumes each sweep from its newest save (the data are a pure
function of the seed and the step, so the steps after it are the ones the first run would have
taken); a rerun whose fingerprint differs is refused with a ``ValueError`` that names the fields,
so that no sweep continues from the state of another config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import jax

from nlx.train.checkpoint import Checkpointer


def add_flag(parser, default_minutes: float, at: str, what: str = "each run") -> None:
  """Adds ``--checkpoint_minutes`` to a study's ``parser`` (``apply_flag`` reads it)."""
  parser.add_argument("--checkpoint_minutes", type=float, default=None,
                      help=f"{what} saves its state under OUT/checkpoints this often (default "
                           f"{default_minutes:g}; 0: at every {at}), and a rerun of the command "
                           "continues from there; -1: no checkpoints")


def apply_flag(args, settings: dict) -> None:
  """Sets ``settings["checkpoint_minutes"]`` from ``--checkpoint_minutes`` when it was given
  (-1: None, no checkpoints); any other negative value is a ValueError naming the flag."""
  value = args.checkpoint_minutes
  if value is None:
    return
  if value < 0 and value != -1:
    raise ValueError(f"--checkpoint_minutes must be >= 0 (0: at every evaluation) or -1 (no "
                     f"checkpoints); got {value}")
  settings["checkpoint_minutes"] = None if value == -1 else value


# ModelConfig fields that choose how the same computation runs, not what it computes: left out of
# a fingerprint, so that a sweep saved before such a field existed, or with another setting of
# it, resumes (``model.scan_layers`` unrolls the layer loop: bitwise the same train step here).
EXECUTION_FIELDS = ("scan_layers",)


def _field_defaults() -> dict:
  """``{name: default}`` of every ``ModelConfig`` field, as JSON reads it back."""
  from nlx.nn.config import ModelConfig  # pylint: disable=g-import-not-at-top
  defaults = {}
  for field in dataclasses.fields(ModelConfig):
    if field.default is not dataclasses.MISSING:
      defaults[field.name] = _plain(field.default)
    elif field.default_factory is not dataclasses.MISSING:
      defaults[field.name] = _plain(field.default_factory())
  return defaults


def _comparable(fingerprint: dict) -> dict:
  """``fingerprint`` with the model fields at their ``ModelConfig`` default left out, so that a
  sweep saved before a field existed (its default then the only behaviour) matches a rerun that
  leaves the field at its default."""
  model = fingerprint.get("model")
  if not isinstance(model, dict):
    return fingerprint
  defaults = _field_defaults()
  return dict(fingerprint, model={k: v for k, v in model.items()
                                  if k not in defaults or v != defaults[k]})


def model_fingerprint(cfg) -> dict:
  """The fields of a ``ModelConfig`` that decide what a model computes (``EXECUTION_FIELDS``
  left out), for a sweep's fingerprint."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}


def _plain(x):
  """``x`` as JSON reads it back (tuples become lists, numbers stay numbers)."""
  return json.loads(json.dumps(x, default=str))


class SweepCheckpoint:
  """The saved state of one sweep under ``directory``.

  Args:
    directory: the sweep's own directory (created on the first save).
    fingerprint: a JSON-able dict of everything that decides the sweep's training.
    every_seconds: the least time between two saves of ``maybe_save`` (0: every call).
  """

  RESULT = "result.json"

  def __init__(self, directory: str, fingerprint: dict, every_seconds: float = 600.0):
    if every_seconds < 0:
      raise ValueError(f"every_seconds must be >= 0; got {every_seconds}")
    self.directory = os.path.abspath(directory)
    self.fingerprint = _plain(fingerprint)
    self.every_seconds = every_seconds
    self._last = time.time()
    self._checkpointer: Optional[Checkpointer] = None

  def _arrays(self) -> Checkpointer:
    if self._checkpointer is None:
      self._checkpointer = Checkpointer(os.path.join(self.directory, "arrays"), keep=1,
                                        async_save=False)
    return self._checkpointer

  def _check(self, saved: dict) -> None:
    """Raises ValueError naming every field of ``saved`` that differs from this fingerprint (model
    fields at their default left out on both sides: ``_comparable``)."""
    saved, mine = _comparable(saved), _comparable(self.fingerprint)
    keys = sorted(set(saved) | set(mine))
    diff = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in keys
            if saved.get(k) != mine.get(k)]
    if diff:
      raise ValueError(f"{self.directory} holds a sweep of another configuration ("
                       + "; ".join(diff) + "); use another --out, or remove that directory to "
                       "start this sweep afresh")

  def finished(self) -> Optional[list]:
    """The results of the finished sweep (``finish``), or None when it has not finished."""
    path = os.path.join(self.directory, self.RESULT)
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    self._check(saved["fingerprint"])
    return saved["results"]

  def restore(self, arrays_template) -> Optional[tuple]:
    """``(arrays, progress)`` of the newest save, the arrays in the structure of
    ``arrays_template``; None when nothing was saved."""
    if not os.path.isdir(os.path.join(self.directory, "arrays")):
      return None
    checkpointer = self._arrays()
    if checkpointer.latest_step() is None:
      return None
    leaves, treedef = jax.tree.flatten(arrays_template)
    abstract = {"leaves": [jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=getattr(x, "sharding", None))
                           for x in leaves]}
    # The fingerprint first, so that another config is named by its fields, not its shapes.
    step = checkpointer.latest_step()
    meta = checkpointer.manager.restore(step, args=_json_only())["data"]
    self._check(meta["fingerprint"])
    state, data = checkpointer.restore(abstract, step)
    return jax.tree.unflatten(treedef, state["leaves"]), data["progress"]

  def due(self) -> bool:
    """Whether ``every_seconds`` have passed since the last save (or since this object was made)."""
    return time.time() - self._last >= self.every_seconds

  def maybe_save(self, arrays, progress, force: bool = False) -> bool:
    """Saves ``arrays`` (any pytree of arrays) and ``progress`` (JSON-able) when it is ``due``,
    or when ``force``; returns whether it saved. ``progress`` may be a function returning it,
    called only when this saves. Each save is the checkpointer's next step (1, 2, ...), so a
    forced save after a periodic one at the same training step replaces it."""
    if not force and not self.due():
      return False
    checkpointer = self._arrays()
    checkpointer.save((checkpointer.latest_step() or 0) + 1, {"leaves": jax.tree.leaves(arrays)},
                      {"fingerprint": self.fingerprint,
                       "progress": _plain(progress() if callable(progress) else progress)})
    checkpointer.raise_if_failed(block=True)
    self._last = time.time()
    return True

  def finish(self, results: list) -> None:
    """Marks the sweep finished with its ``results`` (written atomically)."""
    os.makedirs(self.directory, exist_ok=True)
    path = os.path.join(self.directory, self.RESULT)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"fingerprint": self.fingerprint, "results": _plain(results)}, f)
    os.replace(path + ".tmp", path)


def _json_only():
  """Restore args that read only a checkpoint's JSON item (``data``)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.args.Composite(data=ocp.args.JsonRestore())
