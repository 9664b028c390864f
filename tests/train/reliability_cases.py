"""Shared runs and helpers of the reliability tests (tests/train/test_reliability.py,
tests/train/test_determinism.py): `nlx train` of the tiny Transformer in-process or as a subprocess."""

import os
import subprocess
import sys

import jax
import numpy as np

from nlx import cli
from nlx.train import metrics as metrics_lib
from nlx.train import trained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [f"--config={os.path.join(ROOT, 'configs', 'transformer.py')}:tiny",
        "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.eval_batches=1", "--no_progress",
        "--config.train.plots=False", "--config.optimizer.warmup_steps=2"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
WAIT_S = 600  # a safety limit on waiting for a subprocess, not a timing assertion


def train(workdir, *flags) -> int:
  """`nlx train` of TINY (then ``flags``) in this process; its exit status."""
  return cli.main(["train", "--workdir", str(workdir), *TINY, *flags])


def spawn(workdir, *flags, env=None, cwd=ROOT, log=None) -> subprocess.Popen:
  """`nlx train` of TINY in a subprocess run in ``cwd`` (its output in ``log``, default
  WORKDIR.log); ``workdir`` may be relative to ``cwd``."""
  log = log or f"{os.path.join(cwd, workdir)}.log"
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "ab") as out:
    return subprocess.Popen([sys.executable, "-m", "nlx.cli", "train", "--workdir", str(workdir),
                             *TINY, *flags], env=env or ENV, cwd=cwd, stdout=out, stderr=out)


def log_tail(workdir) -> str:
  with open(f"{workdir}.log", encoding="utf-8", errors="replace") as f:
    return f.read()[-3000:]


def losses(workdir) -> list:
  return [r["loss"] for r in metrics_lib.read_records(str(workdir))]


def params(workdir) -> list:
  """The parameters of the newest checkpoint of ``workdir`` (numpy leaves)."""
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trained.load(str(workdir)).model))]


def assert_same_params(a, b, rtol: float = 0.0) -> None:
  """The newest checkpoints of workdirs ``a`` and ``b`` hold the same parameters (bitwise when
  ``rtol`` is 0)."""
  for x, y in zip(params(a), params(b), strict=True):
    if rtol:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)
    else:
      np.testing.assert_array_equal(x, y)
