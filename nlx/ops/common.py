"""What every op shares between its checks and its algorithm: ``impl`` resolution and layout.

``resolve_impl`` turns ``impl="auto"`` into the kernels (``pallas_kernels/chunked_memory``) on
GPU/TPU when they support the call, else the chunked XLA form, and refuses ``impl="pallas"`` where
they do not. The core (``nlx.memory``) works on ``[B, H, T, ...]`` with two leading batch axes and
accumulates in ``compute_dtype``; the ops take ``[B, T, H, ...]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_memory import ops as pallas_ops


def resolve_impl(impl: str, kind: str, q, k, v, chunk_size: int,
                 reason: Optional[str] = None) -> str:
  """``impl`` with "auto" resolved; "pallas" checked against what the kernels support.

  ``reason``: why the kernels cannot take this call, when the caller already knows.
  """
  if impl not in ("auto", "pallas"):
    return impl
  reason = reason or pallas_ops.unsupported(kind, q, k, v, chunk_size)
  if impl == "pallas":
    if reason:
      raise ValueError(f"impl='pallas': {reason}; use impl='chunked' or 'recurrent'")
    return impl
  on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  return "pallas" if on_accelerator and not reason else "chunked"


def reset_reason(reset, kind: Optional[str] = None) -> Optional[str]:
  """Why the kernels cannot take a call with document boundaries, or None if they can.

  Args:
    reset: the op's ``reset`` (None: no boundaries, nothing to refuse).
    kind: the kernel kind the op runs; the kernels apply boundaries for
      ``pallas_ops.RESET_KINDS`` ("linear_attention", "delta_rule", "titans") and refuse them
      for any other kind, or when the kind is not given.
  """
  if reset is None or kind in pallas_ops.RESET_KINDS:
    return None
  return (f"reset (document boundaries) is not supported by the kernels for kind={kind!r}; "
          f"they take it for {pallas_ops.RESET_KINDS}")


def compute_dtype(dtype) -> jnp.dtype:
  """float32 accumulation for 16/32-bit inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def heads_first(x):
  """``[B, T, H, ...] -> [B, H, T, ...]`` (None passes through)."""
  return None if x is None else jnp.moveaxis(x, 2, 1)
