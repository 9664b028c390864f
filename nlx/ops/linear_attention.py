"""(Gated) linear attention, and the layout and dispatch of every matrix-memory op.

``linear_attention`` writes ``S ← exp(g_t) S + k_t v_tᵀ``: the dot-product objective, whose
gradient does not depend on the memory (linear attention, RetNet, Mamba2/SSD, scalar-gated GLA).
Its three forms (``impl``):

* reference, token by token: ``nlx/memory/recurrent.py::recurrent_scan`` with ``LINEAR`` and
  ``DOT`` (``impl="recurrent"``);
* chunked: ``linear_attention_chunked`` below, the chunk-start dual form
  ``nlx/memory/chunk_start.py::chunk_start_scan``, exact for every chunk size because the dot
  objective's gradient is state-free;
* kernel: ``pallas_kernels/chunked_memory`` with kind ``"linear_attention"`` (``ops.py`` is the
  differentiable entry point, ``chunk.py`` the per-chunk algebra, ``kernel_gpu.py`` /
  ``kernel_tpu.py`` the Triton and Mosaic kernels).

``matrix_memory`` is the body shared with ``nlx.ops.delta_rule``: the ``[B, T, H, ...]`` to
``[B, H, T, ...]`` layout, the accumulation dtype and the dispatch to the three forms.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.linear import LINEAR
from nlx.memory.objectives import DOT, Objective
from nlx.ops.common import compute_dtype, heads_first, reset_reason, resolve_impl
from nlx.ops.validation import (check_gate, check_options, check_reset, check_sequences,
                                check_state)
from pallas_kernels.chunked_memory import ops as pallas_ops

Array = jax.Array


def linear_attention_chunked(q: Array, k: Array, v: Array, beta: Array, log_decay: Array,
                             state: Array, chunk_size: int, batch_ndim: int = 0,
                             reset: Optional[Array] = None):
  """Chunk-parallel (gated) linear attention, exact for every chunk size.

  Args:
    q: ``[T, K]`` (already scaled); k: ``[T, K]``; v: ``[T, V]``; beta, log_decay: ``[T]``
    (beta: the write strength, ones for linear attention); state: ``[K, V]``; chunk_size: C;
    batch_ndim: leading batch axes on every argument; reset: ``[T]`` bool or None, the document
    boundaries (the state is zero before a reset token's decay and write).

  Returns:
    ``(o [T, V], final state [K, V])``.
  """
  if reset is not None:
    state, o = core.scan_chunks(_linear_attention_body, state, (q, k, v, beta, log_decay, reset),
                                chunk_size, prepare=_linear_attention_prepare,
                                finish=_linear_attention_read, batch_ndim=batch_ndim)
    return o, state
  o, state, _ = core.chunk_start_scan(LINEAR, DOT, q, k, v, beta, log_decay, None, {"w": state},
                                      None, chunk_size, batch_ndim=batch_ndim)
  return o, state["w"]


def _linear_attention_prepare(chunk):
  """A chunk with document boundaries: its writes ``β_j v_j`` and segment-masked decays."""
  q, k, v, beta, log_decay, reset = chunk
  decay, gamma = core.segment_decay(log_decay, reset)
  return q, k, beta[:, None] * v, decay, gamma


def _linear_attention_body(state, prepared):
  """The state after a chunk: ``γ_C S_0 + Σ_j decay[C, j] k_j (β_j v_j)ᵀ``."""
  _, k, writes, decay, gamma = prepared
  return core.chunk_end_weights(state, k, writes, decay[-1], gamma[-1]), state


def _linear_attention_read(prepared, state):
  """Every token's read of a chunk, from its start state."""
  q, k, writes, decay, gamma = prepared
  return core.chunk_matmul(q, state, k, writes, decay, gamma)


def matrix_memory(q, k, v, lr, g, scale, initial_state, chunk_size: int, impl: str,
                  objective: Objective, chunked: Callable, reset: Optional[Array] = None):
  """Shared body of ``linear_attention`` and ``delta_rule`` (validated inputs, resolved impl).

  ``chunked``: the op's chunked form, ``(q, k, v, lr, log_decay, state, chunk_size, batch_ndim,
  reset) -> (o, state)`` on the core's layout (``linear_attention_chunked``,
  ``delta_rule_chunked``). ``reset``: ``[B, T]`` document boundaries or None (every form, the
  kernels included: they mask their chunk decays in-kernel).
  """
  b, h, dk, dv = q.shape[0], q.shape[2], q.shape[3], v.shape[3]
  scale = dk**-0.5 if scale is None else scale
  if impl == "pallas":
    kind, beta = ("linear_attention", None) if objective is DOT else ("delta_rule", lr)
    o, state, _ = pallas_ops.chunked_memory(kind, q, k, v, beta=beta, g=g,
                                            initial_state=initial_state, scale=scale,
                                            chunk_size=chunk_size, reset=reset)
    return o, state
  cdt = compute_dtype(q.dtype)
  cast = lambda x: None if x is None else jnp.asarray(x, cdt)
  qs = heads_first(cast(q) * scale)
  ks, vs = heads_first(cast(k)), heads_first(cast(v))
  lr = jnp.moveaxis(cast(lr), 2, 1)
  g = jnp.zeros_like(lr) if g is None else jnp.moveaxis(cast(g), 2, 1)
  s0 = jnp.zeros((b, h, dk, dv), cdt) if initial_state is None else cast(initial_state)
  if reset is not None:  # [B, T] -> [B, H, T]; a reset at t = 0 discards the initial state
    # (a where, not a zero decay, so that a non-finite initial state cannot reach the chunked form)
    reset = jnp.broadcast_to(jnp.asarray(reset).astype(bool)[:, None, :], lr.shape)
    s0 = jnp.where(reset[:, :, :1, None], jnp.zeros_like(s0), s0)

  if impl == "recurrent":
    o, state, _, _, _ = core.recurrent_scan(LINEAR, objective, qs, ks, vs, lr, g, None,
                                            {"w": s0}, None, batch_ndim=2, reset=reset)
    state = state["w"]
  else:
    o, state = chunked(qs, ks, vs, lr, g, s0, chunk_size, batch_ndim=2, reset=reset)
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), state


def linear_attention(q: Array, k: Array, v: Array, *, g: Optional[Array] = None,
                     scale: Optional[float] = None, initial_state: Optional[Array] = None,
                     chunk_size: int = 64, impl: str = "auto",
                     reset: Optional[Array] = None) -> tuple[Array, Array]:
  """(Gated) linear attention: ``S ← exp(g_t) S + k_t v_tᵀ``, ``o_t = S_tᵀ (scale q_t)``.

  The dot-product memory of docs/EQUATIONS.md §1. g=None is linear attention; g constant per head is
  RetNet; data-dependent g is Mamba2/SSD and scalar-gated GLA. The chunked form is exact for
  every chunk size and sequence length.

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H]`` log-decay (≤ 0) or None.
    scale: multiplies q; default ``K ** -0.5``.
    initial_state: ``[B, H, K, V]`` or None (zeros).
    chunk_size: tokens per chunk of the chunked form.
    impl: "auto" | "chunked" | "recurrent" | "pallas".
    reset: ``[B, T]`` bool (or 0/1 integer) or None: document boundaries of a packed batch.
      Where ``reset[b, t]``, row b's state is set to zero before token t's decay and write (a
      reset at t = 0 discards ``initial_state``), so each document runs as if alone; the final
      state is the last document's. Every form takes it, the kernels ("pallas", and "auto" where
      it picks them) included. A non-finite state never crosses a reset in the recurrent form (it
      is replaced, not multiplied by zero) nor at t = 0; inside a sequence the chunked form and
      the kernels zero the state with zero decays, so there only a finite state is isolated.

  Returns:
    ``(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] in float32/float64)``.
  """
  b, t, h, dk, dv = check_sequences(q, k, v)
  check_gate("g", g, b, t, h, required=False)
  check_reset(reset, b, t)
  if initial_state is not None:
    check_state("initial_state", initial_state, (b, h, dk, dv))
  impl = resolve_impl(check_options(chunk_size, impl, scale), "linear_attention", q, k, v,
                      chunk_size, reset_reason(reset, "linear_attention"))
  ones = jnp.ones((b, t, h), compute_dtype(q.dtype))
  return matrix_memory(q, k, v, ones, g, scale, initial_state, chunk_size, impl, DOT,
                       linear_attention_chunked, reset)
