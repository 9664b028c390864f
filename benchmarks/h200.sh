#!/usr/bin/env bash
# nlx's GPU kernels against flash-linear-attention on one NVIDIA H200 (issue 22, item 6).
#
#   bash benchmarks/h200.sh            # from anywhere in the checkout; about 4-8 minutes
#
# Times, at B,T,H,D = 8,4096,16,128 in bfloat16, forward and forward+backward (median of 20
# after two warm-up runs):
#   * nlx: pallas_kernels.chunked_memory (Pallas -> Triton) kinds "delta_rule" (gated, with beta)
#     and "linear_attention" (scalar gate), native on the GPU, under jax.jit;
#   * fla: fla.ops.gated_delta_rule.chunk_gated_delta_rule and fla.ops.simple_gla.chunk_simple_gla
#     on the same kind of inputs (L2-normalised keys, sigmoid beta, log-sigmoid decays);
# then prints one table: ms, the nlx/fla time ratio, TFLOP/s and the fraction of the H200
# roofline (max(FLOPs / 989 TFLOP/s, bytes / 4.8 TB/s) over the measured time; FLOPs are nlx's
# matmul count for both implementations, bytes the inputs and outputs read/written once).
#
# It installs exactly this, into two virtual environments under $H200_VENVS (default
# /tmp/nlx-h200; reused when present), and nothing else:
#   nlx side: jax[cuda12]==0.10.2 (the project's pinned JAX; the checkout is used from
#             PYTHONPATH, not installed, since the kernels import only jax);
#   fla side: flash-linear-attention==0.6.0 and torch (the version its requirements resolve;
#             triton comes with torch).
# The two sides run in separate processes (JAX and PyTorch would both claim the GPU's memory).
# Each step is bounded by `timeout`; JSON results land in $H200_VENVS/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${H200_VENVS:-/tmp/nlx-h200}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ ! -x "$DIR/nlx/bin/python" ]; then
  "$PY" -m venv "$DIR/nlx"
  timeout 240 "$DIR/nlx/bin/pip" install -q "jax[cuda12]==0.10.2"
fi
if [ ! -x "$DIR/fla/bin/python" ]; then
  "$PY" -m venv "$DIR/fla"
  timeout 300 "$DIR/fla/bin/pip" install -q "flash-linear-attention==0.6.0" torch
fi
"$DIR/nlx/bin/python" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$DIR/fla/bin/python" -c "import torch, fla; print('torch', torch.__version__, 'fla', fla.__version__)"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout 200 "$DIR/nlx/bin/python" -m benchmarks.kernels --h200 nlx --json "$DIR/nlx.json" \
  || { echo "nlx side failed (exit $?)"; echo '[]' > "$DIR/nlx.json"; status=1; }
timeout 120 "$DIR/fla/bin/python" -m benchmarks.kernels --h200 fla --json "$DIR/fla.json" \
  || { echo "fla side failed (exit $?)"; echo '[]' > "$DIR/fla.json"; status=1; }
"$DIR/nlx/bin/python" -m benchmarks.kernels --h200 table "$DIR/nlx.json" "$DIR/fla.json"
exit $status
