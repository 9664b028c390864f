"""Benchmarks of nlx: a folder of the checkout, not part of the installed package.

Run from the repository root (``pip install -e .`` first):

* ``python -m benchmarks.ops``: tokens/s, peak memory and compile time of the associative-memory
  ops of ``nlx.ops`` per implementation (``benchmarks.ops``);
* ``python -m benchmarks.kernels``: the same at the Pallas kernels' shapes in bfloat16, with
  TFLOP/s and GB/s, against flash-linear-attention on a CUDA GPU (``benchmarks.kernels``);
* ``python -m benchmarks.models``: train-step tokens/s and peak memory of every model family at
  about 20M parameters (``benchmarks.models``).

``benchmarks.harness`` holds what they share: the flags, timing (a warm-up run, then the median
of timed runs), XLA's compiled memory analysis, the printed tables, the JSON output and its
metadata, and the child processes that isolate one configuration each. ``nlx`` never imports
this folder.
"""
