"""FSDP shards activations: with the trainer's batch sharding on the ``[B, T, d]`` residual stream
(``nlx.nn.model.activation_sharding``) the compiled train step's temporaries per device are far
smaller than when the compiler chooses (8 fake CPU devices, mesh fsdp=8, in a subprocess)."""

import json
import os
import subprocess
import sys

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json
import jax, jax.numpy as jnp
from nlx import configs
from nlx.train import sharding, step
cfg = configs.load("configs/transformer.py:tiny", [
    "model.d_model=64", "model.n_layers=2", "train.batch_size=16", "train.seq_len=512",
    "mesh.data=1", "mesh.fsdp=8"])
run = configs.validate(cfg, n_devices=8)
trainer = step.build(run, sharding.make_mesh(run.mesh))
tokens = jax.ShapeDtypeStruct((16, 513), jnp.int32, sharding=trainer.batch_sharding)
temp = lambda t: (step.jit_train_step(t).lower(t.abstract_state, tokens).compile()
                  .memory_analysis().temp_size_in_bytes)
constrained = temp(trainer)
original = step.loss_fn
step.loss_fn = lambda g, p, t, d=jnp.float32, activations=None: original(g, p, t, d, None)
print(json.dumps({"constrained": constrained, "free": temp(trainer)}))
"""


def test_fsdp_shards_the_residual_stream():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True, timeout=600)
  temps = json.loads(out.stdout.strip().splitlines()[-1])
  assert temps["constrained"] < 0.5 * temps["free"], temps
