"""``python -m benchmarks.kernels``: the Pallas kernels against the XLA forms and FLA.

The ops benchmark (``benchmarks.ops``: same flags, records and JSON) at the shapes of the kernel
work, B×T×H×D 8×4096×16×128 and 4×16384×8×64 in bfloat16, for the implementations ``pallas``,
``chunked``, ``recurrent`` and, on a CUDA GPU where flash-linear-attention is installed, ``fla``
(its ``chunk_gated_delta_rule`` and ``chunk_simple_gla``). Every record carries the model work
(``flops``, ``bytes``) and the rates it implies (``tflops_per_s``, ``gb_per_s``); the tables add
the speedups over ``recurrent``, ``chunked`` and ``fla``.

On CPU the Pallas kernels run only in interpret mode and flash-linear-attention needs CUDA: both
are listed under ``unavailable``, and the XLA forms are measured. Configurations whose XLA memory
analysis exceeds the available memory are reported as failures, not run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from benchmarks import ops

# (B, T, H, D) of the kernel issue, in bfloat16.
KERNEL_SHAPES = ((8, 4096, 16, 128), (4, 16384, 8, 64))
KERNEL_IMPLS = ("pallas", "chunked", "recurrent", "fla")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.kernels",
      description="The ops benchmark at the kernels' shapes (default B×T×H×D 8×4096×16×128 and "
      "4×16384×8×64, bfloat16): tokens/s, achieved TFLOP/s and GB/s of pallas, chunked and "
      "recurrent, and on a CUDA GPU flash-linear-attention's chunk_gated_delta_rule and "
      "chunk_simple_gla when installed. Configurations whose XLA memory analysis exceeds the "
      "available memory are reported as failures, not run.")
  ops.add_arguments(parser, name="kernels", impls=KERNEL_IMPLS, shapes=KERNEL_SHAPES,
                    dtype="bfloat16")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  return ops.main(argv, build_parser())


if __name__ == "__main__":
  sys.exit(main())
