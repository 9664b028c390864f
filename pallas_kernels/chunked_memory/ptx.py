"""The GPU kernels compiled to PTX and cubin for sm_90 on a machine without a GPU.

Pallas lowers each kernel to Triton IR (TTIR, ``lowering.triton_ir``); XLA would compile that
with the Triton it embeds. Here the same TTIR goes through the ``triton`` wheel (its ``compile``
accepts a ``.ttir`` file; it ships ``ptxas`` and ``cuobjdump``) for ``GPUTarget("cuda", 90, 32)``,
and ``cuobjdump -res-usage`` reads the cubin's registers, local memory (spills) and static shared
memory; Triton's metadata adds the dynamic shared memory its layouts need. The wheel's Triton is
not the one inside jaxlib, so the numbers are those of that Triton's pipeline on the same IR:
close to, not identical with, what XLA builds on an H100/H200.

``python -m pallas_kernels.chunked_memory.ptx --triton-python PY [--shape B,T,H,K,V,C]
[--kinds delta_rule] [--warps 4,8] [--stages 1,2]``: ``PY`` is a Python interpreter with
``triton`` installed (kept apart from the project's environment: e.g. ``python -m venv /tmp/t &&
/tmp/t/bin/pip install triton``); prints one JSON line per (kernel, warps, stages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

# Run by the triton interpreter (no jax there): compile one TTIR file, print resource usage.
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
  f.write(kernel.asm["cubin"])
usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                       capture_output=True, text=True, check=True).stdout
os.unlink(f.name)
fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
print(json.dumps({"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]),
                  "stack_bytes": int(fields["STACK"]), "static_shared_bytes": int(fields["SHARED"]),
                  "triton_shared_bytes": int(kernel.metadata.shared),
                  "ptx_lines": kernel.asm["ptx"].count("\n"), "cubin_bytes": len(kernel.asm["cubin"]),
                  "triton": triton.__version__}))
"""


def compile_stats(ttir: str, triton_python: str, warps: int, stages: int,
                  timeout: int = 900) -> dict:
  """Resource usage of one TTIR module compiled for sm_90 (see the module docstring)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([triton_python, "-c", _COMPILE, path, str(warps), str(stages)],
                          capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] = ()) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import lowering  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.chunked_memory.ptx",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--triton-python", required=True,
                      help="a Python interpreter with the triton wheel installed")
  parser.add_argument("--shape", default="8,4096,16,128,128,64", help="B,T,H,K,V,chunk")
  parser.add_argument("--kinds", default="delta_rule", help="comma-separated kinds")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--stages", default="1")
  parser.add_argument("--only", default=None, help="comma-separated kernel names (default: all)")
  args = parser.parse_args(list(argv) or sys.argv[1:])
  shape = tuple(int(x) for x in args.shape.split(","))
  for kind in args.kinds.split(","):
    for name, ttir in sorted(lowering.triton_ir(kind, shape).items()):
      if args.only and name not in args.only.split(","):
        continue
      for warps in (int(w) for w in args.warps.split(",")):
        for stages in (int(s) for s in args.stages.split(",")):
          row = {"kernel": name, "shape_BTHKVC": shape, "num_warps": warps,
                 "num_stages": stages}
          row.update(compile_stats(ttir, args.triton_python, warps, stages))
          print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
