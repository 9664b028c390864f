"""(Gated) delta rule: one online gradient step of ``½‖Sᵀk − v‖²`` per token on a matrix memory.

DeltaNet (g=None), Gated DeltaNet, and HOPE's DGD on a linear memory (docs/EQUATIONS.md §4).
Its three forms (``impl``):

* reference, token by token: ``nlx/memory/recurrent.py::recurrent_scan`` with ``LINEAR`` and
  ``L2`` (online gradients, ``impl="recurrent"``);
* chunked: ``delta_rule_chunked`` below, the UT transform. The gradient of token t depends on the
  memory written by the previous tokens of its chunk, so the chunk-start dual form does not
  apply; instead each chunk's pseudo-values solve a unit lower triangular system
  (``nlx/memory/chunks.py::unit_lower_inverse``), and the rest is the chunk algebra of
  ``nlx/memory/chunks.py`` (``chunk_matmul``, ``chunk_end_weights``, ``scan_chunks``). Exact for
  every chunk size;
* kernel: ``pallas_kernels/chunked_memory`` with kind ``"delta_rule"`` (``chunk.py`` holds the
  kernels' own, in-kernel UT inverse; ``ops.py``, ``kernel_gpu.py``, ``kernel_tpu.py``).

Layout and dispatch are ``linear_attention``'s (``nlx.ops.linear_attention.matrix_memory``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.objectives import L2
from nlx.ops.common import reset_reason, resolve_impl
from nlx.ops.linear_attention import matrix_memory
from nlx.ops.validation import (check_gate, check_options, check_reset, check_sequences,
                                check_state)

Array = jax.Array


def _delta_rule_prepare(chunk):
  """State-independent part of a delta-rule chunk: solve the UT system (all chunks at once).

  Inside a chunk (local times 1..C, γ_t = Π_{l≤t} exp(g_l)), the memory is
  ``S_t = γ_t S_0 + Σ_{j≤t} (γ_t/γ_j) k_j w_jᵀ`` where the pseudo-values w solve
  ``w_t + β_t Σ_{j<t} (γ_t/γ_j)(k_t·k_j) w_j = β_t v_t − β_t γ_t S_0ᵀ k_t``, a unit lower triangular
  system ``(I + A) W = βV − (βγ K) S_0``. With ``(I + A)^{-1}`` (``core.unit_lower_inverse``),
  ``W = U − Wk S_0`` with U and Wk independent of S_0.

  With document boundaries (a sixth field, ``reset [C]``), ``γ_t/γ_j`` is zero when a reset lies in
  ``(j, t]`` and ``γ_t`` is zero after the chunk's first reset, in the system, the reads and the
  chunk-end state alike: each segment of the chunk is its own delta rule.
  """
  q, k, v, beta, log_decay = chunk[:5]
  if len(chunk) == 6:  # document boundaries: decays that cross one are zero (core.segment_decay)
    decay, gamma = core.segment_decay(log_decay, chunk[5])
  else:
    decay = core.decay_matrix(log_decay)
    gamma = jnp.exp(jnp.cumsum(log_decay))
  inverse = core.unit_lower_inverse(beta[:, None] * decay * (k @ k.T))
  u = inverse @ (beta[:, None] * v)
  wk = inverse @ ((beta * gamma)[:, None] * k)
  return q, k, u, wk, decay, gamma


def _delta_rule_body(state, prepared):
  """Sequential part of a chunk: its pseudo-values and the state after it."""
  _, k, u, wk, decay, gamma = prepared
  writes = u - wk @ state
  return core.chunk_end_weights(state, k, writes, decay[-1], gamma[-1]), (state, writes)


def _delta_rule_read(prepared, y):
  """Parallel part of a chunk: every token's read, from the chunk-start state and pseudo-values."""
  q, k, _, _, decay, gamma = prepared
  state, writes = y
  return core.chunk_matmul(q, state, k, writes, decay, gamma)


def delta_rule_chunked(q: Array, k: Array, v: Array, beta: Array, log_decay: Array, state: Array,
                       chunk_size: int, batch_ndim: int = 0, reset: Optional[Array] = None):
  """Chunk-parallel (gated) delta rule, exact for every chunk size.

  Args:
    q: ``[T, K]`` (already scaled); k: ``[T, K]``; v: ``[T, V]``; beta, log_decay: ``[T]``;
    state: ``[K, V]``; chunk_size: C; batch_ndim: leading batch axes on every argument;
    reset: ``[T]`` bool or None, the document boundaries (the state is zero before a reset
    token's decay and write).

  Returns:
    ``(o [T, V], final state [K, V])``.
  """
  xs = (q, k, v, beta, log_decay) + (() if reset is None else (reset,))
  state, o = core.scan_chunks(_delta_rule_body, state, xs, chunk_size,
                              prepare=_delta_rule_prepare, finish=_delta_rule_read,
                              batch_ndim=batch_ndim)
  return o, state


def delta_rule(q: Array, k: Array, v: Array, *, beta: Array, g: Optional[Array] = None,
               scale: Optional[float] = None, initial_state: Optional[Array] = None,
               chunk_size: int = 64, impl: str = "auto",
               reset: Optional[Array] = None) -> tuple[Array, Array]:
  """(Gated) delta rule: ``S ← exp(g_t) S``; ``S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ``; ``o_t = S_tᵀ q_t``.

  ``q_t`` is scaled by ``scale`` (default ``K^-1/2``) before the read.

  One online gradient step of ``½‖Sᵀk − v‖²`` per token: DeltaNet (g=None), Gated DeltaNet, and
  HOPE's DGD on a linear memory (docs/EQUATIONS.md §4). The chunked form (UT transform) is exact for
  every chunk size and sequence length. Keys are used as given (DeltaNet L2-normalises them first).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` write strength;
    g: ``[B, T, H]`` log-decay (≤ 0) or None.
    scale, initial_state, chunk_size, impl, reset: as in ``linear_attention`` (``reset``: ``[B, T]``
      document boundaries, the state zero before a reset token's decay and write).

  Returns:
    ``(o [B, T, H, V], final_state [B, H, K, V])``.
  """
  b, t, h, dk, dv = check_sequences(q, k, v)
  check_gate("beta", beta, b, t, h, required=True)
  check_gate("g", g, b, t, h, required=False)
  check_reset(reset, b, t)
  if initial_state is not None:
    check_state("initial_state", initial_state, (b, h, dk, dv))
  impl = resolve_impl(check_options(chunk_size, impl, scale), "delta_rule", q, k, v, chunk_size,
                      reset_reason(reset, "delta_rule"))
  return matrix_memory(q, k, v, beta, g, scale, initial_state, chunk_size, impl, L2,
                       delta_rule_chunked, reset)
