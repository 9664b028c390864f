"""A trained model from a workdir of ``nlx train`` (for ``nlx generate``, ``nlx eval`` and
``nlx export``); the workdir and its checkpoint directory may be ``gs://`` URLs."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from flax import nnx

from nlx import pretrained
from nlx.data import tokenizers
from nlx.train import checkpoint as checkpoint_lib
from nlx.train import config as run_config
from nlx.train import loop
from nlx.train import paths
from nlx.train import sharding
from nlx.train import step as step_lib


@dataclasses.dataclass
class Trained:
  """The restored model (an ``nnx`` LM), its tokenizer, run config and step."""

  model: Any
  tokenizer: Any
  run: run_config.RunConfig
  step: int


def load(workdir: str, checkpoint_dir: Optional[str] = None) -> Trained:
  """Restores the latest checkpoint of ``workdir`` on this host's devices (data parallel, one
  slice); with no checkpoint yet, the parameters of ``train.init_from`` (a converted model) at
  step 0.

  Args:
    workdir: the workdir of ``nlx train`` (local or ``gs://``).
    checkpoint_dir: its checkpoints, if not ``workdir/checkpoints`` (local or ``gs://``).
  """
  workdir = paths.check(workdir, "--workdir")
  cfg = loop.load_workdir_config(workdir)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):  # configs saved before multislice lack them
    if name in cfg.mesh:
      cfg.mesh[name] = 1
  run = run_config.validate(cfg, n_devices=jax.device_count())
  tokenizer = tokenizers.from_config(run.data, workdir)
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh))
  directory = paths.check(checkpoint_dir or paths.join(workdir, "checkpoints"),
                          "--checkpoint_dir")
  ckpt = (checkpoint_lib.Checkpointer(directory, run.train.keep_checkpoints, read_only=True)
          if paths.isdir(directory) else None)
  step = None if ckpt is None else ckpt.latest_step()
  if step is None:
    if ckpt is not None:
      ckpt.close()
    if run.train.init_from:
      params = pretrained.init_params(run.train.init_from, run.model,
                                      trainer.abstract_state["params"], seed=run.train.seed)
      return Trained(nnx.merge(trainer.graphdef, params), tokenizer, run, 0)
    raise ValueError(f"--workdir {workdir!r} has no checkpoint in {directory}")
  state, _ = ckpt.restore(trainer.abstract_state, step)
  ckpt.close()
  model = nnx.merge(trainer.graphdef, state["params"])
  return Trained(model, tokenizer, run, int(jax.device_get(state["step"])))
