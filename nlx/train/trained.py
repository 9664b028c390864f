"""A trained model from a workdir of ``nlx train`` (for ``nlx generate`` and ``nlx eval``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from nlx.data import tokenizers
from nlx.train import checkpoint as checkpoint_lib
from nlx.train import config as run_config
from nlx.train import loop
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
  """Restores the latest checkpoint of ``workdir`` on this host's devices (data parallel)."""
  cfg = loop.load_workdir_config(workdir)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  run = run_config.validate(cfg, n_devices=jax.device_count())
  tokenizer = tokenizers.build_tokenizer(run.data.tokenizer, run.data.spm_model,
                                         workdir=workdir)
  trainer = step_lib.build(run, sharding.make_mesh(run.mesh))
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir or os.path.join(workdir, "checkpoints"),
                                     run.train.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise ValueError(f"--workdir {workdir!r} has no checkpoint in {ckpt.manager.directory}")
  state, _ = ckpt.restore(trainer.abstract_state)
  ckpt.close()
  model = nnx.merge(trainer.graphdef, state["params"])
  return Trained(model, tokenizer, run, int(jax.device_get(state["step"])))
