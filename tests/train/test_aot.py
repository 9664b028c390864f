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
