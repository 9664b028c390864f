"""``nlx aot``: the JSON report of a compile for a small TPU topology (a subprocess, libtpu), a
run that does not fit, and the jaxpr FLOP count that replaces XLA's (which counts a scan body
once)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from nlx.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the tpu extra) is not installed")


def _aot(*flags: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  result = subprocess.run(
      [sys.executable, "-m", "nlx.cli", "aot", "--config",
       os.path.join(ROOT, "configs", "transformer.py") + ":tiny", *flags],
      env=env, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@needs_libtpu
def test_aot_reports_memory_flops_step_time_and_mfu():
  report = _aot("--topology", "v5e:2x2", "--config.model.n_layers=4")
  assert report["chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
  assert report["argument_bytes"] > 4 * report["params"]  # float32 params + Adam moments
  assert report["bytes_per_device"] >= report["argument_bytes"]
  # The step's FLOPs: at least 6·N per token (forward + backward), all 4 layers counted.
  model_flops = 6 * report["params"] * report["batch_size"] * report["seq_len"]
  assert model_flops <= report["flops_per_step"] < 3 * model_flops
  assert report["flops_per_device"] == report["flops_per_step"] / 4
  assert report["step_s_estimate"] > 0 and 0 < report["mfu_estimate"] < 1


@needs_libtpu
def test_aot_reports_a_run_that_does_not_fit():
  # 2^25 x 64 float32 embedding = 8 GiB of parameters, replicated on every chip with its Adam
  # moments: 24 GiB > the 16 GiB of a v5e chip; the TPU compiler refuses it.
  report = _aot("--topology", "v5e:2x2", "--config.model.vocab_size=33554432",
                "--config.train.batch_size=4", "--config.train.seq_len=8")
  assert report["fits"] is False
  assert "RESOURCE_EXHAUSTED" in report["error"]
  assert report["argument_bytes"] >= 3 * 8 * 2**30
  assert report["bytes_per_device"] > report["hbm_bytes"]


MULTISLICE = r"""
import json
from nlx import configs
from nlx.train import aot, sharding
from nlx.train.config import MeshConfig
tiny = "configs/transformer.py:tiny"
cfg = configs.load(tiny, ["model.n_layers=2", "mesh.dcn_data=-1"])
out = {"report": aot.compile_for_topology(cfg, "v5e:2x2", num_slices=2)}
_, devices = aot._topology_devices("v5e:2x2", 2)
run = configs.validate(configs.load(tiny, ["mesh.dcn_data=2"]), n_devices=8)
mesh = sharding.make_mesh(run.mesh, devices)
rows = {}  # the batch rows each slice holds, as the trainer shards them
batch = sharding.batch_sharding(mesh, run.axis_rules)  # the trainer's (step.build)
for d, index in batch.devices_indices_map((16, 257)).items():
  rows.setdefault(d.slice_index, set()).update(range(16)[index[0]])
out["rows"] = {k: sorted(v) for k, v in rows.items()}
# fsdp across the slices: each slice one block of the fsdp axis.
mesh = sharding.make_mesh(MeshConfig(data=2, tensor=2, dcn_fsdp=2), devices)
out["shape"] = list(mesh.devices.shape)
out["fsdp_slices"] = [d.slice_index for d in mesh.devices[0, :, 0]]
# One v5e 4x4 slice, data=16: the data axis is a ring of neighbouring chips (mesh_utils' order;
# the devices' own order is not one).
ring = list(sharding.make_mesh(MeshConfig(), aot._topology_devices("v5e:4x4")[1]).devices.flat)
out["ring_hops"] = [sum(abs(a - b) for a, b in zip(ring[i - 1].coords, ring[i].coords))
                    for i in range(16)]
try:
  aot.compile_for_topology(configs.load(tiny, ["mesh.dcn_data=3"]), "v5e:2x2", num_slices=2)
except ValueError as e:
  out["refused"] = str(e)
print("AOT", json.dumps(out))
"""


@needs_libtpu
def test_aot_compiles_for_two_slices_with_the_batch_across_them():
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  result = subprocess.run([sys.executable, "-c", MULTISLICE], env=env, capture_output=True,
                          text=True, timeout=600, check=False, cwd=ROOT)
  line = [l for l in result.stdout.splitlines() if l.startswith("AOT ")]
  assert line, result.stderr[-3000:]
  out = json.loads(line[0][len("AOT "):])
  report = out["report"]
  assert (report["chips"], report["slices"]) == (8, 2)
  assert report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert report["dcn"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert report["fits"] is True and report["bytes_per_device"] >= report["argument_bytes"] > 0
  assert report["flops_per_device"] == report["flops_per_step"] / 8
  # The 16 rows: the first 8 on slice 0, the last 8 on slice 1 (data crosses the DCN once).
  assert out["rows"] == {"0": list(range(8)), "1": list(range(8, 16))}
  assert out["shape"] == [2, 2, 2] and out["fsdp_slices"] == [0, 1]
  assert out["ring_hops"] == [1] * 16
  assert out["refused"].startswith("mesh.dcn_data=3 but the run has 2 slices; allowed:")


def test_aot_refuses_a_slice_count_below_one():
  with pytest.raises(ValueError, match=r"--num_slices 0: allowed: an integer >= 1"):
    aot.compile_for_topology(None, "v5e:2x2", num_slices=0)


def test_aot_refuses_an_unknown_chip():
  with pytest.raises(ValueError, match=r"chip 'v9x' is not known; allowed: \['v4', 'v5e'"):
    aot.compile_for_topology(None, "v9x:2x2")


def test_jaxpr_flops_multiplies_scan_bodies_by_their_length():
  w = jnp.ones((7, 16, 32))

  def f(x):
    y, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi @ wi.T), None), x, w)
    return y.sum()

  x = jnp.ones((4, 16))
  forward = 7 * 2 * (2 * 4 * 16 * 32)
  assert aot.jaxpr_flops(jax.make_jaxpr(f)(x)) == forward
  # The gradient with respect to x: the forward, then two matmuls back per matmul forward... of
  # which only the ones toward x are needed (w is a constant): 2 more per layer.
  assert aot.jaxpr_flops(jax.make_jaxpr(jax.grad(f))(x)) == 2 * forward
