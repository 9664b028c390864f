"""The delta rule in three phases, as flash-linear-attention schedules it: per-chunk math.

``chunk.chunk_step`` does a whole delta-rule chunk at once, so a kernel that walks the chunks in
order has to solve the chunk's UT system ``(I + A)⁻¹`` inside its sequential loop. Most of that
work does not depend on the state. With ``T = (I + A)⁻¹`` (``chunk.unit_lower_inverse``),
``a_t = e^{G_t}`` (what the chunk-start state keeps at token t), ``γ_t = e^{G_last − G_t}`` (what
token t's write keeps at the chunk's end) and ``α = e^{G_last}``:

* the pseudo-values are ``u = T(βV) − T(β a∘K) S₀ = U − W S₀``, with ``W [C, K]`` and
  ``U [C, V]`` independent of the state (``ut``: phase 1, parallel over all chunks);
* the state recurrence needs only ``u = U − W S₀`` and ``S₁ = α S₀ + (γ∘K)ᵀ u``: two matmuls per
  chunk (``state_step``: phase 2, the only sequential phase; it stores ``S₀`` and ``u``);
* the outputs ``o = a∘(q S₀) + (Γ∘q Kᵀ) u`` need ``S₀`` and ``u`` of their own chunk only
  (``output``: phase 3, parallel).

The backward pass splits the same way. With ``P = Γ∘(q Kᵀ)`` (q scaled) and the cotangents
``dO`` of the outputs and ``dS₁`` of the chunk's end state:

* ``P ᵀ dO`` is local to the chunk (``dv_local``, parallel);
* the state's cotangent walks the chunks in reverse: ``du = Pᵀ dO + (γ∘K) dS₁`` and
  ``dS₀ = α dS₁ + (a∘q)ᵀ dO − Wᵀ du`` (``state_step_bwd``: three matmuls, sequential; it stores
  every chunk's ``dS₁``);
* with ``S₀`` and ``dS₁`` known for every chunk, the gradients of the chunk's inputs are those of
  one ``chunk.chunk_step`` at fixed ``S₀`` (``chunk.chunk_vjp``, parallel over chunks).

Everything here follows ``chunk.py``'s rules (2-D dots, masks on iotas, keep-dim reductions, no
value slicing) so that the Triton and Mosaic kernels and the plain-JAX ``reference.forward_phased``
run the same code. ``dtype`` is the operand dtype of the dots (the input dtype; float32
accumulation); ``segmented`` masks every decay that crosses a document boundary, as in
``chunk.chunk_step``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_memory.chunk import (BETA, LOG_DECAY, SEGMENT, Chunk, _at_row,
                                                 _channel_col, _channel_row, _from_start, _iotas,
                                                 _masked_exp, _mm, _mm_nt, _mm_tn, _same_segment,
                                                 delta_matrix_t, unit_lower_inverse)

Array = jax.Array


def _segments(gates_col: Array, last, segmented: bool):
  """The tokens' segments ``[C, 1]`` and token ``last``'s ``[1, 1]`` (None, None without
  boundaries)."""
  if not segmented:
    return None, None
  seg_col = _channel_col(gates_col, SEGMENT)
  return seg_col, _at_row(seg_col, last)


def start_decay(gates_col: Array, last, segmented: bool) -> Array:
  """``a [C, 1]``: what the chunk-start state keeps at each token (zero past a boundary)."""
  seg_col, _ = _segments(gates_col, last, segmented)
  return _from_start(_channel_col(gates_col, LOG_DECAY), seg_col)


def end_decays(gates_col: Array, last, segmented: bool) -> tuple[Array, Array]:
  """``(α [1, 1], γ [C, 1])``: what the chunk's end state keeps of the start state and of each
  token's write (zero for padded tokens after ``last`` and across a boundary)."""
  c = gates_col.shape[0]
  g_col = _channel_col(gates_col, LOG_DECAY)
  g_last = _at_row(g_col, last)
  seg_col, seg_last = _segments(gates_col, last, segmented)
  live = lax.broadcasted_iota(jnp.int32, (c, 1), 0) <= last
  if segmented:
    live = live & (seg_col == seg_last)
  return _from_start(g_last, seg_last), _masked_exp(live, g_last - g_col)


def _write_matrix(q: Array, k: Array, gates_col: Array, gates_row: Array, scale: float,
                  segmented: bool, dtype) -> Array:
  """``P = Γ∘(scale·q Kᵀ) [C, C]``: token j's write as token t reads it (causal, same segment)."""
  rows, cols = _iotas(k.shape[0])
  causal = rows >= cols
  if segmented:
    causal = causal & (_channel_col(gates_col, SEGMENT) == _channel_row(gates_row, SEGMENT))
  g_col, g_row = _channel_col(gates_col, LOG_DECAY), _channel_row(gates_row, LOG_DECAY)
  return _masked_exp(causal, g_col - g_row) * _mm_nt(q * scale, k, dtype)


def ut(k: Array, v: Array, gates_col: Array, gates_row: Array, last, segmented: bool = False,
       dtype=None) -> tuple[Array, Array]:
  """Phase 1: ``(W [C, K], U [C, V])``, float32, from the chunk's keys, values and gates."""
  ch = Chunk(k, k, v, gates_col, gates_row)  # q unused by delta_matrix_t
  inverse = unit_lower_inverse(delta_matrix_t(ch, segmented, dtype))
  beta = _channel_col(gates_col, BETA)
  a = start_decay(gates_col, last, segmented)
  return _mm(inverse, beta * a * k, dtype), _mm(inverse, beta * v, dtype)


def state_step(w: Optional[Array], u0: Array, k: Array, gates_col: Array, s0: Array, last,
               segmented: bool = False, dtype=None) -> tuple[Array, Array]:
  """Phase 2, one chunk: ``(u [C, V], S₁ [K, V])`` from ``W``, ``U`` and the start state.

  Linear attention is the case ``W = None``, ``U = V``: its pseudo-values are the values."""
  alpha, gamma = end_decays(gates_col, last, segmented)
  u = u0 if w is None else u0 - _mm(w, s0, dtype)
  return u, alpha * s0 + _mm_tn(gamma * k, u, dtype)


def output(q: Array, k: Array, gates_col: Array, gates_row: Array, s0: Array, u: Array, last,
           scale: float, segmented: bool = False, dtype=None) -> Array:
  """Phase 3, one chunk: ``o [C, V] = a∘(scale·q S₀) + P u``."""
  a = start_decay(gates_col, last, segmented)
  p = _write_matrix(q, k, gates_col, gates_row, scale, segmented, dtype)
  return a * _mm(q * scale, s0, dtype) + _mm(p, u, dtype)


def dv_local(q: Array, k: Array, gates_col: Array, gates_row: Array, d_o: Array, scale: float,
             segmented: bool = False, dtype=None) -> Array:
  """Backward, parallel: ``Pᵀ dO [C, V]``, the part of ``du`` local to the chunk."""
  return _mm_tn(_write_matrix(q, k, gates_col, gates_row, scale, segmented, dtype), d_o, dtype)


def state_step_bwd(q: Array, k: Array, w: Optional[Array], gates_col: Array, dv_loc: Array,
                   d_o: Array, d_s1: Array, last, scale: float, segmented: bool = False,
                   dtype=None) -> Array:
  """Backward, sequential, one chunk: ``dS₀ [K, V]`` from ``dS₁`` (the end state's cotangent);
  ``w`` None for linear attention (``u`` does not depend on ``S₀``)."""
  alpha, gamma = end_decays(gates_col, last, segmented)
  a = start_decay(gates_col, last, segmented)
  d_s0 = alpha * d_s1 + _mm_tn(a * q * scale, d_o, dtype)
  if w is None:
    return d_s0
  du = dv_loc + _mm(gamma * k, d_s1, dtype)
  return d_s0 - _mm_tn(w, du, dtype)


def _col_sums(x: Array) -> Array:
  """``[C, C] -> [C, 1]``: the column sums of x as a column (``xᵀ 1``, a matmul: no transpose)."""
  ones = jnp.ones((x.shape[0], 1), jnp.float32)
  return _mm_tn(x, ones)


def grad(q: Array, k: Array, v: Array, gates_col: Array, gates_row: Array, s0: Array,
         d_o: Array, d_s1: Array, last, scale: float, segmented: bool = False,
         dtype=None, kind: str = "delta_rule") -> Chunk:
  """Backward, parallel: the gradients of one chunk's inputs at fixed ``S₀``, written out.

  The same result as ``chunk.chunk_vjp`` (the tests compare them), derived by hand so that every
  dot runs on ``dtype`` operands (JAX's transposes of bfloat16 dots do not lower in Triton) and
  the kernel holds only what the derivation needs. With ``P = Γ∘(q Kᵀ)``, ``u = U − W S₀``:
  ``du = Pᵀ dO + (γ∘K) dS₁``, ``dP = dO uᵀ``, ``dq = s(a∘(dO S₀ᵀ) + (dP∘Γ) K)``,
  ``dK ⊃ (dP∘Γ)ᵀ q + γ∘(u dS₁ᵀ)``; through the UT transform ``dU = du``, ``dW = −du S₀ᵀ``,
  ``dT = dU (βV)ᵀ + dW (β a∘K)ᵀ``, ``dA = −Tᵀ dT Tᵀ`` on A's pattern, ``A = β Γ'∘(K Kᵀ)``; the
  gates' gradient collects every exponential of G (``a``, Γ, Γ', γ, α). Everything lands in the
  gate column (``gates_row``'s gradient is zero: the two are copies of the same values).
  ``kind="linear_attention"``: ``u = V``, no UT transform and no β.
  """
  delta = kind == "delta_rule"
  c = k.shape[0]
  rows, cols = _iotas(c)
  beta = _channel_col(gates_col, BETA)
  g_col, g_row = _channel_col(gates_col, LOG_DECAY), _channel_row(gates_row, LOG_DECAY)
  causal, below = rows >= cols, rows > cols
  if segmented:
    same = _channel_col(gates_col, SEGMENT) == _channel_row(gates_row, SEGMENT)
    causal, below = causal & same, below & same
  decay = _masked_exp(causal, g_col - g_row)  # Γ [t, j]
  decay_below = _masked_exp(below, g_col - g_row)  # Γ' [t, j], j < t
  a = start_decay(gates_col, last, segmented)
  alpha, gamma = end_decays(gates_col, last, segmented)
  qs = q * scale

  # Recompute the chunk: T, W, U, u.
  if delta:
    inverse = unit_lower_inverse(delta_matrix_t(Chunk(k, k, v, gates_col, gates_row), segmented,
                                                dtype))
    bak, bv = beta * a * k, beta * v
    u = _mm(inverse, bv, dtype) - _mm(_mm(inverse, bak, dtype), s0, dtype)
  else:
    u = v
  qk = _mm_nt(qs, k, dtype)

  # Outputs and end state.
  du = _mm_tn(decay * qk, d_o, dtype) + _mm(gamma * k, d_s1, dtype)
  dpg = _mm_nt(d_o, u, dtype) * decay  # dP∘Γ
  dq = scale * (a * _mm_nt(d_o, s0, dtype) + _mm(dpg, k, dtype))
  u_ds = _mm_nt(u, d_s1, dtype)  # [C, K]
  dk = _mm_tn(dpg, qs, dtype) + gamma * u_ds
  d_gamma = jnp.sum(k * u_ds, axis=1, keepdims=True)
  d_alpha = jnp.sum(jnp.sum(s0 * d_s1, axis=1, keepdims=True), axis=0, keepdims=True)
  d_a = jnp.sum(d_o * _mm(qs, s0, dtype), axis=1, keepdims=True)
  e_p = dpg * qk  # dΓ∘Γ from P

  if not delta:
    e = e_p
    dv = du
    d_beta = jnp.zeros_like(d_a)
  else:
    dv, d_beta, dk, d_a, e = _through_ut(inverse, du, s0, v, k, a, beta, bv, bak, decay_below,
                                         below, dk, d_a, e_p, dtype)

  # The log-decays: a_t = e^{G_t}, Γ_{tj} = e^{G_t − G_j}, γ_j = e^{G_last − G_j}, α = e^{G_last}.
  d_g = (a * d_a + jnp.sum(e, axis=1, keepdims=True) - _col_sums(e) - gamma * d_gamma)
  at_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == last
  to_last = jnp.sum(gamma * d_gamma, axis=0, keepdims=True) + alpha * d_alpha  # [1, 1]
  d_g = d_g + jnp.where(at_last, to_last, 0.0)
  lane = lax.broadcasted_iota(jnp.int32, gates_col.shape, 1)
  d_gates_col = jnp.where(lane == BETA, d_beta, 0.0) + jnp.where(lane == LOG_DECAY, d_g, 0.0)
  return Chunk(dq, dk, dv, d_gates_col, jnp.zeros_like(gates_row))


def _through_ut(inverse, du, s0, v, k, a, beta, bv, bak, decay_below, below, dk, d_a, e_p,
                dtype):
  """``grad``'s pullback through ``u = T(βV) − T(β a∘K) S₀`` and ``T = (I + A)⁻¹``."""
  d_w = -_mm_nt(du, s0, dtype)  # [C, K]
  t_du = _mm_tn(inverse, du, dtype)  # Tᵀ dU [C, V]
  t_dw = _mm_tn(inverse, d_w, dtype)  # Tᵀ dW [C, K]
  dv = beta * t_du
  d_beta = (jnp.sum(v * t_du, axis=1, keepdims=True)
            + jnp.sum(a * k * t_dw, axis=1, keepdims=True))
  dk = dk + beta * a * t_dw
  d_a = d_a + jnp.sum(beta * k * t_dw, axis=1, keepdims=True)
  d_t = _mm_nt(du, bv, dtype) + _mm_nt(d_w, bak, dtype)  # [C, C]
  d_a_mat = jnp.where(below, -_mm_nt(_mm_tn(inverse, d_t), inverse), 0.0)  # float32 (inverse)
  kk = _mm_nt(k, k, dtype)
  d_kk = d_a_mat * beta * decay_below
  dk = dk + _mm(d_kk, k, dtype) + _mm_tn(d_kk, k, dtype)
  d_beta = d_beta + jnp.sum(d_a_mat * decay_below * kk, axis=1, keepdims=True)
  e_a = d_kk * kk  # dΓ'∘Γ'
  return dv, d_beta, dk, d_a, e_p + e_a
