"""The kernels lower for real accelerators without one: TPU ahead-of-time, GPU through jax.export.

Each check runs in a child process (``python -m pallas_kernels.chunked_memory.lowering``): libtpu
is loaded only there, never in the test worker.
"""

import json
import os
import subprocess
import sys

import pytest

from pallas_kernels.chunked_memory.chunk import KINDS
from pallas_kernels.chunked_memory.lowering import expected_kernels


def lower(*args):
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run([sys.executable, "-m", "pallas_kernels.chunked_memory.lowering", *args],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("topology,chips,device_kind", [("v5e:2x2", 4, "TPU v5 lite"),
                                                        ("v5p:2x2x1", 4, "TPU v5")])
def test_tpu_kernels_compile_ahead_of_time(topology, chips, device_kind):
  results = lower("tpu", topology)
  assert [r["kind"] for r in results] == list(KINDS)
  for r in results:
    assert (r["topology"], r["chips"], r["device_kind"]) == (topology, chips, device_kind)
    # Every forward and backward kernel (phase kernels: six for the delta rule, four for linear
    # attention; six for Titans with momentum) is a Mosaic kernel inside the compiled executable.
    assert r["mosaic_custom_calls"] == len(expected_kernels(r["kind"])), r
    assert r["kernels"] == expected_kernels(r["kind"])
    # XLA's cost analysis includes the kernels' cost estimates (far above the XLA glue alone).
    assert r["cost_analysis"]["flops"] > 1e8, r["cost_analysis"]


def test_gpu_kernels_lower_to_triton_for_cuda():
  results = lower("gpu")
  assert [r["kind"] for r in results] == list(KINDS)
  for r in results:
    assert r["platforms"] == ["cuda"]
    assert r["triton_custom_calls"] == len(expected_kernels(r["kind"])), r
    assert r["kernels"] == expected_kernels(r["kind"])


def test_tpu_qkv_retiling_only_for_4d_arguments():
  # H = 16, K = V = 128 (head-strided): q, k, v as [B, T, H, D] arguments are re-tiled by XLA on
  # the way in (reshapes) and dq, dk, dv on the way out (copies); as [B, T, H·D] (what a
  # projection gives) they reach the kernels as they are (docs/KERNELS.md, "TPU").
  def bf16_moves(qkv):
    (r,) = lower("tpu", "v5e:2x2", "--shape", "1,256,16,128,128,64", "--kinds", "delta_rule",
                 "--qkv", qkv)
    return [s for s in r["layout_copies"]["shapes"] + r["layout_reshapes"]["shapes"]
            if s.startswith("bf16")]

  assert len(bf16_moves("heads")) == 6
  assert bf16_moves("flat") == []
