"""The GPU kernels compiled to PTX and cubin for sm_90 on a machine without a GPU.

Pallas lowers each kernel to Triton IR (TTIR, ``lowering.triton_ir``); XLA would compile that
with the Triton it embeds. Here the same TTIR goes through the ``triton`` wheel (its ``compile``
accepts a ``.ttir`` file; it ships ``ptxas`` and ``cuobjdump``) for ``GPUTarget("cuda", 90, 32)``,
and ``cuobjdump -res-usage`` reads the cubin's registers, local memory (spills) and static shared
memory; Triton's metadata adds the dynamic shared memory its layouts need. The wheel's Triton is
not the one inside jaxlib, so the numbers are those of that Triton's pipeline on the same IR:
close to, not identical with, what XLA builds on an H100/H200.

``python -m pallas_kernels.chunked_memory.ptx --triton-python PY [--shape B,T,H,K,V,C]
[--kinds delta_rule] [--warps 4,8] [--stages 1,2] [--block-v 32,64] [--grad-block-v 32]
[--only KERNELS]``: ``PY`` is a Python interpreter with ``triton`` installed (kept apart from the
project's environment: e.g. ``python -m venv /tmp/t && /tmp/t/bin/pip install triton``); prints
one JSON line per (value block, kernel, warps, stages). ``--block-v`` compiles at each value
block (``BlockSizes.block_v``; the gradient kernel's block is then the same unless
``--grad-block-v`` is given); without it, the launch table's (``ops.GPU_TABLE``).
``python -m pallas_kernels.chunked_memory.ptx --choose sm90_stats.jsonl`` compiles nothing: it
prints the launch-table entry that ``choose`` (the rule ``ops.GPU_TABLE`` follows) gives for
every kind and shape class in the statistics.
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


# How ``ops.GPU_TABLE`` is chosen from these statistics (``choose``), per kind and shape class:
SMEM_LIMIT = 227 * 1024  # dynamic shared memory one block may use on an H100/H200 SM
SEQUENTIAL = ("fwd_state", "bwd_state")  # one program per (batch·head, value block)
MAX_BLOCK_V = 64  # the value block is at most 64 (the 128 class's 64: two programs per head)


def choose(rows: Sequence[dict], kind: str, head: int) -> dict:
  """The launch-table entry the statistics ``rows`` (this module's JSON lines, with a
  ``block_v``) give for ``kind`` at K = V = ``head``. The rule, in order:

  1. a configuration is legal when it compiled and its shared memory fits ``SMEM_LIMIT``;
  2. ``block_v``: the largest value block ≤ min(head, ``MAX_BLOCK_V``) at which both sequential
     kernels have a legal configuration without spills (none: the one with the least stack);
  3. ``grad_block_v`` (≤ ``block_v``): the least stack bytes per thread × value blocks per head
     (the gradient kernel's spill for one chunk), ties to the larger block;
  4. each kernel's (num_warps, num_stages) at its block: the least stack; then, for the
     sequential kernels, more warps (their programs are the critical path: more threads for
     the serial chunk walk), for the parallel ones the fewest registers × warps (the smallest
     register footprint: more programs resident per SM); then 1 stage (2 stages only add shared
     memory in these statistics; what they overlap is a run-time effect, not seen here).
  """
  prefix = f"nlx_{kind}_"
  legal = [r for r in rows if r["kernel"].startswith(prefix) and "error" not in r
           and r["shape_BTHKVC"][3] == head and r["triton_shared_bytes"] <= SMEM_LIMIT]
  phase = lambda r: r["kernel"][len(prefix):]
  at = lambda name, bv: [r for r in legal if phase(r) == name and r["block_v"] == bv]
  least_stack = lambda rs: min((r["stack_bytes"] for r in rs), default=float("inf"))
  blocks = sorted({r["block_v"] for r in legal if phase(r) in SEQUENTIAL
                   and r["block_v"] <= min(head, MAX_BLOCK_V)}, reverse=True)
  spill = {bv: sum(least_stack(at(p, bv)) for p in SEQUENTIAL) for bv in blocks}
  block_v = next((bv for bv in blocks if spill[bv] == 0), None)
  if block_v is None:
    block_v = min(blocks, key=lambda bv: (spill[bv], -bv))
  grads = sorted({r["block_v"] for r in legal if phase(r) == "bwd_grad"
                  and r["block_v"] <= block_v})
  grad_block_v = min(grads, key=lambda bv: (least_stack(at("bwd_grad", bv)) * head // bv, -bv))

  def best(name: str) -> dict:
    if name == "bwd_grad":
      rs = at(name, grad_block_v)
    elif name in ("fwd_ut", "fwd_coef"):  # the whole V / the gates: no value block
      rs = [r for r in legal if phase(r) == name]
    else:
      rs = at(name, block_v)
    seq = name in SEQUENTIAL
    return min(rs, key=lambda r: (r["stack_bytes"],
                                  -r["num_warps"] if seq else r["registers"] * r["num_warps"],
                                  r["num_stages"], r["registers"]))

  launch = {name: best(name) for name in sorted({phase(r) for r in legal})}
  return {"kind": kind, "class": head, "block_v": block_v, "grad_block_v": grad_block_v,
          "launch": {n: (r["num_warps"], r["num_stages"]) for n, r in launch.items()},
          "rows": launch}


def main(argv: Sequence[str] = ()) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import lowering  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.chunked_memory.ptx",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--triton-python",
                      help="a Python interpreter with the triton wheel installed")
  parser.add_argument("--choose", nargs="+", metavar="JSONL",
                      help="instead of compiling: read these statistics (this module's output) "
                      "and print the launch-table entry ``choose`` gives per kind and class")
  parser.add_argument("--shape", default="8,4096,16,128,128,64", help="B,T,H,K,V,chunk")
  parser.add_argument("--kinds", default="delta_rule", help="comma-separated kinds")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--stages", default="1")
  parser.add_argument("--only", default=None, help="comma-separated kernel names (default: all)")
  parser.add_argument("--block-v", default=None,
                      help="comma-separated value blocks (default: the launch table's)")
  parser.add_argument("--grad-block-v", type=int, default=None,
                      help="the gradient kernel's value block (default: --block-v's)")
  args = parser.parse_args(list(argv) or sys.argv[1:])
  if args.choose:
    rows = [json.loads(line) for path in args.choose for line in open(path) if line.strip()]
    for kind, head in sorted({(r["kernel"].split("_fwd")[0].split("_bwd")[0][4:],
                               r["shape_BTHKVC"][3]) for r in rows}):
      entry = choose(rows, kind, head)
      entry["rows"] = {n: {k: r[k] for k in ("block_v", "num_warps", "num_stages", "registers",
                                             "stack_bytes", "triton_shared_bytes")}
                       for n, r in entry["rows"].items()}
      print(json.dumps(entry), flush=True)
    return 0
  if not args.triton_python:
    parser.error("--triton-python is required to compile")
  from pallas_kernels.chunked_memory.ops import BlockSizes  # pylint: disable=g-import-not-at-top
  shape = tuple(int(x) for x in args.shape.split(","))
  block_vs = [int(b) for b in args.block_v.split(",")] if args.block_v else [None]
  for kind in args.kinds.split(","):
    for block_v in block_vs:
      blocks = None
      if block_v or args.grad_block_v:
        blocks = BlockSizes(block_v=block_v, grad_block_v=args.grad_block_v or block_v)
      for name, ttir in sorted(lowering.triton_ir(kind, shape, block_sizes=blocks).items()):
        if args.only and name not in args.only.split(","):
          continue
        for warps in (int(w) for w in args.warps.split(",")):
          for stages in (int(s) for s in args.stages.split(",")):
            row = {"kernel": name, "shape_BTHKVC": shape, "block_v": block_v,
                   "grad_block_v": args.grad_block_v or block_v, "num_warps": warps,
                   "num_stages": stages}
            row.update(compile_stats(ttir, args.triton_python, warps, stages))
            print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
