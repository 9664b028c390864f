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


# --- Interpret-mode agreement: the kernels against the float64 recurrence of nlx.ops.

# Which gates each kind takes (titans: beta is the inner learning rate).
_GATES = {"linear_attention": ("g",), "delta_rule": ("beta", "g"),
          "titans": ("beta", "g", "momentum")}
# Normwise relative error bounds (``‖got − want‖ / ‖want‖`` per output and gradient) by input
# dtype: the precision contract of the kernels (docs/KERNELS.md).
AGREEMENT_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}
# (kind, backend, dtype): the rows of the table. Head sizes K=24, V=40 are not powers of two (the
# wrapper pads them), T=45 is not a multiple of the chunk (16).
AGREEMENT_ROWS = tuple((kind, backend, dtype) for kind in ("delta_rule", "linear_attention",
                                                           "titans")
                       for backend in ("gpu", "tpu") for dtype in ("float32", "bfloat16"))
AGREEMENT_SHAPE = (2, 45, 2, 24, 40, 16)  # B, T, H, K, V, chunk


def agreement_inputs(kind: str, b: int, t: int, h: int, dk: int, dv: int, seed: int = 0) -> dict:
  """Normalised keys, sigmoid gates, small log-decays and nonzero initial states (float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(seed), 8)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  k = normal(1, (b, t, h, dk))
  x = {"q": normal(0, (b, t, h, dk)), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
       "v": normal(2, (b, t, h, dv)), "initial_state": 0.3 * normal(6, (b, h, dk, dv)),
       "g": -0.2 * jax.nn.softplus(normal(4, (b, t, h)))}
  if "beta" in _GATES[kind]:
    x["beta"] = jax.nn.sigmoid(normal(3, (b, t, h))) * (0.5 if kind == "titans" else 1.0)
  if kind == "titans":
    x["momentum"] = jax.nn.sigmoid(normal(5, (b, t, h)))
    x["initial_momentum"] = 0.3 * normal(7, (b, h, dk, dv))
  return x


def _recurrence(kind: str, chunk: int):
  """nlx.ops's token-by-token recurrence with the kernels' signature."""
  from nlx import ops as nlx_ops  # pylint: disable=g-import-not-at-top

  def run(q, k, v, *, beta=None, g=None, momentum=None, initial_state=None,
          initial_momentum=None):
    if kind == "linear_attention":
      o, s = nlx_ops.linear_attention(q, k, v, g=g, initial_state=initial_state,
                                      impl="recurrent")
      return o, s, None
    if kind == "delta_rule":
      o, s = nlx_ops.delta_rule(q, k, v, beta=beta, g=g, initial_state=initial_state,
                                impl="recurrent")
      return o, s, None
    o, st = nlx_ops.titans_memory(q, k, v, lr=beta, momentum=momentum, g=g,
                                  initial_state=nlx_ops.TitansState(initial_state,
                                                                    initial_momentum),
                                  chunk_size=chunk, impl="recurrent")
    return o, st.memory, st.momentum

  return run


def _outputs_and_grads(fn, x: dict, weights):
  import jax  # pylint: disable=g-import-not-at-top

  def run(x, weights):
    out, pull = jax.vjp(lambda x: fn(**x), x)
    ws = tuple(None if o is None else w.astype(o.dtype) for o, w in zip(out, weights))
    (grads,) = pull(ws)
    return out, grads

  return jax.jit(run)(x, weights)


def agreement(kind: str, backend: str, dtype: str, shape=AGREEMENT_SHAPE, seed: int = 0) -> dict:
  """Normwise relative errors ``‖got − want‖ / ‖want‖`` of the kernel (``backend``, interpret
  mode, q/k/v in ``dtype``) against the float64 recurrence of ``nlx.ops`` on the same (rounded)
  inputs: every output and the gradient of every input under one fixed random cotangent."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pallas_kernels.chunked_memory import ops as kops  # pylint: disable=g-import-not-at-top
  b, t, h, dk, dv, chunk = shape
  x = agreement_inputs(kind, b, t, h, dk, dv, seed)
  x = {n: (a.astype(dtype) if n in ("q", "k", "v") else a) for n, a in x.items()}
  names = ("o", "state", "momentum")
  wkeys = jax.random.split(jax.random.key(seed + 100), 3)
  state = (b, h, dk, dv)
  weights = [jax.random.normal(wkeys[0], (b, t, h, dv)).astype(dtype).astype(jnp.float32),
             jax.random.normal(wkeys[1], state),
             jax.random.normal(wkeys[2], state) if kind == "titans" else None]
  kernel = lambda **kw: kops.chunked_memory(kind, chunk_size=chunk, backend=backend,
                                            interpret=True, **kw)
  out, grads = _outputs_and_grads(kernel, x, weights)
  with jax.enable_x64(True):
    x64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in x.items()}
    w64 = [None if w is None else jnp.asarray(np.asarray(w, np.float64)) for w in weights]
    out64, grads64 = _outputs_and_grads(_recurrence(kind, chunk), x64, w64)
    out64 = [None if o is None else np.asarray(o) for o in out64]
    grads64 = {n: np.asarray(a) for n, a in grads64.items()}
  rel = lambda a, w: float(np.linalg.norm(np.asarray(a, np.float64) - w) / np.linalg.norm(w))
  errors = {name: rel(o, w) for name, o, w in zip(names, out, out64) if w is not None}
  errors.update({f"d{n}": rel(grads[n], grads64[n]) for n in sorted(grads64)})
  return errors


def agreement_table(rows=AGREEMENT_ROWS, shape=AGREEMENT_SHAPE) -> list:
  """``[{"kind", "backend", "dtype", "rtol", "max_error", "worst", "errors", "ok"}]`` for
  ``rows``."""
  table = []
  for kind, backend, dtype in rows:
    errors = agreement(kind, backend, dtype, shape)
    worst = max(errors, key=errors.get)
    rtol = AGREEMENT_RTOL[dtype]
    table.append({"kind": kind, "backend": backend, "dtype": dtype, "rtol": rtol,
                  "max_error": errors[worst], "worst": worst, "errors": errors,
                  "ok": errors[worst] <= rtol})
  return table
