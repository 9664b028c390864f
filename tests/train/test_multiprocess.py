"""Two processes on localhost (``jax.distributed`` over gloo on CPU, one device each) train 3 steps
of a tiny model and get the losses of one process (float32, rtol 1e-5).

Each process loads only its rows of every global batch (``pipeline.host_batches`` with its
process index), as on a pod; the 2-device mesh is ``data=2``."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, sys
from nlx.train import sharding
sharding.maybe_initialize_distributed()
import jax
from nlx import configs
from nlx.data import pipeline, tokenizers
from nlx.train import step
cfg = configs.load(sys.argv[1], ["train.steps=3", "train.batch_size=8", "train.seq_len=32",
                                 "optimizer.warmup_steps=0", "mesh.data=-1"])
run = configs.validate(cfg, n_devices=jax.device_count(), n_processes=jax.process_count())
trainer = step.build(run, sharding.make_mesh(run.mesh))
state = step.init_state(trainer, run.model, 0)
train_step = step.jit_train_step(trainer)
windows = pipeline.pack(["".join(chr(97 + (i * 7) % 26) for i in range(4000))],
                        tokenizers.ByteTokenizer(), 32)
batches = pipeline.host_batches(windows, batch_size=8, steps=3, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
losses = []
for s in range(3):
  state, m = train_step(state, sharding.global_batch(batches[s], trainer.batch_sharding))
  losses.append(float(m["loss"]))
print("LOSSES", json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                            "losses": losses}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(n_processes: int) -> list:
  config = os.path.join(ROOT, "configs", "transformer.py") + ":tiny"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()  # no fake devices
  if n_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               JAX_NUM_PROCESSES=str(n_processes))
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, config], cwd=ROOT, text=True,
                            env=dict(env, JAX_PROCESS_ID=str(i)) if n_processes > 1 else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(n_processes)]
  outputs = []
  try:
    outputs = [proc.communicate(timeout=600) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  results = []
  for proc, (out, err) in zip(procs, outputs):
    line = [l for l in out.splitlines() if l.startswith("LOSSES")]
    assert proc.returncode == 0 and line, err[-3000:]
    results.append(json.loads(line[0][len("LOSSES "):]))
  return results


def test_two_processes_train_like_one():
  (single,) = _launch(1)
  pair = _launch(2)
  assert single["devices"] == 1
  assert sorted(r["process"] for r in pair) == [0, 1] and pair[0]["devices"] == 2
  for r in pair:
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
  assert single["losses"][-1] < single["losses"][0]
  print(json.dumps({"one_process": single["losses"], "two_processes": pair[0]["losses"]}))
