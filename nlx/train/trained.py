"""A trained model from a workdir of ``nlx train`` (for ``nlx generate`` and ``nlx eval``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

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


def load(workdir: str, checkpoint_dir: str = None) -> Trained:
  """Restores the latest checkpoint of ``workdir`` on this host's devices (data parallel); with
  no checkpoint yet, the parameters of ``train.init_from`` (a converted model) at step 0."""
  cfg = loop.load_workdir_config(workdir)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  run = run_config.validate(cfg, n_devices=jax.device_count())
  tokenizer = tokenizers.from_config(run.data, workdir)
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh))
  directory = checkpoint_dir or os.path.join(workdir, "checkpoints")
  ckpt = (checkpoint_lib.Checkpointer(directory, run.train.keep_checkpoints, read_only=True)
          if os.path.isdir(directory) or paths.is_url(directory) else None)
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
