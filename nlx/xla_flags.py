"""XLA:CPU flags that nlx's commands set before JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU hands matmuls, elementwise fusions and reductions to its YNNPACK library
(``ynn`` fusions in a compiled HLO). On a sum over a non-minor axis, e.g. the sum over the tokens
of a ``[T, D]`` product in a backward pass, YNNPACK's reduction runs 8-20x slower than XLA's own
loop on the 2-core development VM (a ``[2048, 1152] -> [1152]`` sum: 68 ms against 8.4 ms), and
such sums were about 12% of HOPE's 20M train step (docs/RESULTS.md, "XLA:CPU reductions").
``--xla_cpu_experimental_ynn_fusion_type=dot,eltwise`` keeps YNNPACK for matmuls and elementwise
fusions and leaves reductions to XLA. The flags are CPU-only: GPU and TPU ignore them.

``apply()`` adds ``CPU_FLAGS`` to ``XLA_FLAGS`` and is called by ``nlx``'s command line, the
benchmarks and the studies before their first JAX computation (JAX reads ``XLA_FLAGS`` when its
backend starts). It adds nothing when ``NLX_XLA_CPU_FLAGS=0``, when ``XLA_FLAGS`` already sets a
flag of the same name (the user's value wins), or when the installed jaxlib is not a version the
flags were tested with (``TESTED_JAXLIB``): XLA aborts on a flag it does not know. ``import nlx``
alone never changes the environment; a program that imports nlx as a library can call
``nlx.xla_flags.apply()`` first.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping, Optional

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",)
TESTED_JAXLIB = ("0.10.",)  # version prefixes of jaxlib that know CPU_FLAGS
OPT_OUT = "NLX_XLA_CPU_FLAGS"


def _jaxlib_version() -> Optional[str]:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def apply(environ: Optional[MutableMapping[str, str]] = None,
          jaxlib_version: Optional[str] = "installed") -> list[str]:
  """Adds the ``CPU_FLAGS`` that apply to ``environ`` (default ``os.environ``)'s ``XLA_FLAGS``;
  returns the flags it added (none: see the module docstring for when)."""
  environ = os.environ if environ is None else environ
  version = _jaxlib_version() if jaxlib_version == "installed" else jaxlib_version
  if environ.get(OPT_OUT, "1") == "0" or version is None:
    return []
  if not any(version.startswith(prefix) for prefix in TESTED_JAXLIB):
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [flag for flag in CPU_FLAGS if flag.split("=", 1)[0] not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
