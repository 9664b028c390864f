"""Determinism (docs/RELIABILITY.md): `nlx train` with the same seed twice gives the same loss
trajectory and parameters bit for bit; on 8 fake CPU devices (a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, the batch split over them) the losses and
parameters equal one device's within float32 tolerance. (tests/train/test_sharding_equivalence.py
checks the train step alone under several meshes; this runs the whole command: data pipeline,
loop, checkpoints.)"""

import jax
import numpy as np
import pytest

from nlx.train import checkpoint as checkpoint_lib

from reliability_cases import ENV, WAIT_S, assert_same_params, log_tail, losses, spawn, train
from xla_env import xla_flags

FLAGS = ["--config.train.steps=4", "--config.train.batch_size=8",
         "--config.optimizer.warmup_steps=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("determinism") / "one"
  assert train(workdir, *FLAGS) == 0
  return workdir


@pytest.mark.slow  # ~90 s on 2 cores; docs/RELIABILITY.md
def test_the_same_seed_gives_the_same_losses_and_parameters(reference, tmp_path):
  assert train(tmp_path / "again", *FLAGS) == 0
  assert losses(tmp_path / "again") == losses(reference)
  assert_same_params(tmp_path / "again", reference)
  assert train(tmp_path / "seed1", *FLAGS, "--config.train.seed=1") == 0
  assert losses(tmp_path / "seed1") != losses(reference)  # the seed is what decides


@pytest.mark.slow  # ~45 s; the default suite's test_sharding_equivalence covers 8 devices
def test_eight_fake_devices_agree_with_one(reference, tmp_path):
  env = dict(ENV, XLA_FLAGS=xla_flags(8))
  workdir = tmp_path / "eight"
  proc = spawn(workdir, *FLAGS, "--config.mesh.data=-1", env=env)
  assert proc.wait(timeout=WAIT_S) == 0, log_tail(workdir)
  assert _mesh_of_checkpoint(workdir) == [8, 1, 1]
  np.testing.assert_allclose(losses(workdir), losses(reference), rtol=1e-5)
  assert_same_params(workdir, reference, rtol=1e-4)


def _mesh_of_checkpoint(workdir) -> list:
  """The mesh shape the newest checkpoint of ``workdir`` was saved from."""
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), 2)
  leaf = jax.tree.leaves(ckpt.manager.item_metadata(ckpt.latest_step())["state"])[0]
  ckpt.close()
  return [int(n) for n in leaf.sharding.shape]
