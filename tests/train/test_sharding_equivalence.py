"""The same 5 training steps on 8 fake CPU devices under different meshes, and on one device,
give the same losses (float32, rtol 1e-5); each mesh runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import json
import os
import subprocess
import sys

import numpy as np

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = {"one_device": None, "data8": (8, 1, 1), "fsdp4_tensor2": (1, 4, 2),
          "data2_fsdp2_tensor2": (2, 2, 2)}

SCRIPT = r"""
import json, sys
import jax
import numpy as np
from nlx import configs
from nlx.data import pipeline, tokenizers
from nlx.train import sharding, step
meshes = json.loads(sys.argv[1])
cfg = configs.load(sys.argv[2], ["train.steps=5", "train.batch_size=8", "train.seq_len=32",
                                 "model.n_heads=4", "optimizer.warmup_steps=0"])
windows = pipeline.pack(["".join(chr(97 + (i * 7) % 26) for i in range(4000))],
                        tokenizers.ByteTokenizer(), 32)
out = {}
for name, shape in meshes.items():
  devices = jax.devices()[:1] if shape is None else jax.devices()
  if shape is not None:
    cfg.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  else:
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
  run = configs.validate(cfg, n_devices=len(devices))
  trainer = step.build(run, sharding.make_mesh(run.mesh, devices))
  state = step.init_state(trainer, run.model, 0)
  train_step = step.jit_train_step(trainer)
  batches = pipeline.host_batches(windows, batch_size=8, steps=5, seed=0)
  losses = []
  for s in range(5):
    state, m = train_step(state, sharding.global_batch(batches[s], trainer.batch_sharding))
    losses.append(float(m["loss"]))
  out[name] = losses
print("LOSSES", json.dumps(out))
"""


def test_meshes_give_the_losses_of_one_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, json.dumps(MESHES),
       os.path.join(ROOT, "configs", "transformer.py") + ":tiny"],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  line = [l for l in result.stdout.splitlines() if l.startswith("LOSSES")]
  assert line, result.stderr[-3000:]
  losses = json.loads(line[0][len("LOSSES "):])
  reference = np.asarray(losses["one_device"])
  for name, values in losses.items():
    np.testing.assert_allclose(values, reference, rtol=1e-5, err_msg=name)
  assert reference[-1] < reference[0]
  print(json.dumps(losses))
