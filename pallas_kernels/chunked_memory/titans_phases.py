"""Titans (gradients at the chunk-start state, optional momentum) in phases: per-chunk math.

The chunk (``chunk.chunk_step`` with ``kind="titans"``; q scaled by ``scale``) is

* ``u = β∘(V − K S₀)``: the pseudo-values, the inner gradient at the chunk-start state ``S₀``
  (no UT system: ``W = βK`` and ``U = βV`` are elementwise, so there is no parallel UT phase);
* with ``D_{tj} = e^{G_t − G_j}`` and ``Dη_{sj} = e^{E_s − E_j}`` (causal) the write coefficients
  ``Γ = D`` without momentum, ``Γ = D·Dη`` with it; ``γ_j = Γ_{last, j}`` (what token j's write
  keeps at the chunk's end), ``c_t = Σ_{s≤t} e^{G_t − G_s + E_s}`` (what the chunk-start momentum
  ``P₀`` adds to the memory at token t), ``μ_j = e^{E_last − E_j}``, ``α = e^{G_last}``,
  ``η = e^{E_last}``, ``a_t = e^{G_t}``;
* ``o = a∘(q S₀) + (Γ∘q Kᵀ) u + c∘(q P₀)``;
* ``S₁ = α S₀ + (γ∘K)ᵀ u + c_last P₀`` and ``P₁ = η P₀ + (μ∘K)ᵀ u``.

What depends on the state and what does not:

* ``γ`` and ``c`` with momentum are ``[C, C]`` reductions of the gates alone (``coefficients``:
  phase 1, parallel over every chunk; without momentum γ is elementwise and ``c`` unused, so the
  phase is skipped);
* the state recurrence (``state_step``: the only sequential phase) needs ``u = β(V − K S₀)`` and
  the two updates: three matmuls per chunk with momentum, two without, and no ``[C, C]`` work;
* the outputs (``output``: parallel) need ``S₀`` and ``P₀`` of their own chunk; ``u`` is
  recomputed there (one matmul) rather than stored.

Backward, with ``P = Γ∘(q Kᵀ)`` and the cotangents ``dO``, ``dS₁``, ``dP₁``:

* ``Pᵀ dO`` is local to the chunk (``dv_local``, parallel: Γ needs a ``[C, C]`` product);
* ``du = Pᵀ dO + (γ∘K) dS₁ + (μ∘K) dP₁``, ``dS₀ = α dS₁ + (a∘q)ᵀ dO − (β∘K)ᵀ du`` and ``dP₀ =
  c_last dS₁ + η dP₁ + (c∘q)ᵀ dO`` walk the chunks in reverse (``state_step_bwd``, sequential);
* at fixed ``S₀``, ``P₀``, ``dS₁``, ``dP₁`` the gradients of the chunk's inputs (``grad``,
  parallel) are written out by hand, every dot on ``dtype`` operands.

Document boundaries (``segmented=True``; ``Segments`` reads them from the gates' fourth channel):
the memory and momentum are zero before a reset token; a token takes its gradient at the zero
state after a reset in its chunk or when marked fresh, else at ``S₀``; placeholders follow every
live token and change nothing (the end states are read at the last live row, computed from the
channel). Every decay is masked to its segment, ``e^{G_t}`` and ``e^{E_s}`` to the first segment
(what ``S₀`` and ``P₀`` reach), ``K S₀`` to stale tokens, ``α``/``η`` to a chunk whose last live
row is in the first segment; the backward takes the same masks (a masked exponential is a
constant zero).

Same rules as ``chunk.py`` (2-D dots, iota masks, keep-dim reductions, no value slicing), so the
Triton and Mosaic kernels run this code unchanged. Dots that read an input or a state take
``dtype`` operands (float32 accumulation); dots among gate-only quantities (``Γ = D·Dη`` and its
pullback ``dΓ Dηᵀ``, ``Dᵀ dΓ``) stay float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_memory.chunk import (BETA, LOG_DECAY, LOG_MOMENTUM, SEGMENT, Chunk,
                                                 _at_row,
                                                 _channel_col, _channel_row, _iotas, _masked_exp,
                                                 _mm, _mm_nt, _mm_tn)

Array = jax.Array
# Channels of the coefficient column ``[C, 4]`` (``coefficients``): γ and c; the rest zero.
COEF_GAMMA, COEF_CARRY = 0, 1


def _col(c: int) -> Array:
  return lax.broadcasted_iota(jnp.int32, (c, 1), 0)


class Segments(NamedTuple):
  """A chunk's document structure (``segmented=True``), read from the gates' segment channel.

  The channel holds, per token, ``−1`` for a placeholder, ``0`` for a token of the chunk's first
  segment that takes its gradient at the chunk-start state (stale), ``0.5`` for a first-segment
  token that takes it at the zero state (a document's first gradient chunk that began in an
  earlier chunk), and ``s ≥ 1`` for a token after the chunk's s-th reset (fresh: its document's
  first gradient chunk). Live tokens come first, so the chunk's last live row is their count − 1.
  """

  last: Array  # [1, 1] int32: the last live row (−1: none)
  same: Optional[Array]  # [C, C] bool: t and j in the same segment
  first_col: Array  # [C, 1] bool: in the first segment (reached by the chunk-start state)
  first_row: Optional[Array]  # [1, C]
  stale: Array  # [C, 1] float: 1 where the gradient is taken at the chunk-start state
  last_first: Array  # [1, 1] bool: the last live row is in the first segment
  end_col: Array  # [C, 1] bool: live and in the last live row's segment
  end_row: Optional[Array]  # [1, C]


def segments(gates_col: Array, gates_row: Optional[Array] = None) -> Segments:
  """The ``Segments`` of one chunk from its gate column (and row: without it ``same``,
  ``first_row`` and ``end_row`` are None, which the state phases do not read)."""
  code_col = _channel_col(gates_col, SEGMENT)
  live = code_col >= 0.0
  last = (jnp.sum(live.astype(jnp.float32), axis=0, keepdims=True) - 1.0).astype(jnp.int32)
  first = lambda code: (code >= 0.0) & (code < 1.0)
  code_last = _at_row(code_col, last)
  same = first_row = end_row = None
  if gates_row is not None:
    code_row = _channel_row(gates_row, SEGMENT)
    row_index = lax.broadcasted_iota(jnp.int32, code_row.shape, 1)
    same, first_row = code_col == code_row, first(code_row)
    end_row = (row_index <= last) & (code_row == code_last)
  return Segments(last, same, first(code_col), first_row, (code_col == 0.0).astype(jnp.float32),
                  first(code_last), live & (code_col == code_last), end_row)


def _last(seg: Optional[Segments], last):
  return last if seg is None else seg.last


def _causal(rows: Array, cols: Array, seg: Optional[Segments]) -> Array:
  """``rows ≥ cols``, within a segment when segmented."""
  return rows >= cols if seg is None else (rows >= cols) & seg.same


def _mom(gates_col: Array, gates_row: Array, last, seg: Optional[Segments] = None):
  """The momentum's gate-only quantities: ``(Dη [C, C], c [C, 1], γ [C, 1], L [1, C])``."""
  c = gates_col.shape[0]
  rows, cols = _iotas(c)
  last = _last(seg, last)
  g_col, g_row = _channel_col(gates_col, LOG_DECAY), _channel_row(gates_row, LOG_DECAY)
  m_col, m_row = _channel_col(gates_col, LOG_MOMENTUM), _channel_row(gates_row, LOG_MOMENTUM)
  g_last = _at_row(g_col, last)
  decay = _masked_exp(_causal(rows, cols, seg), g_col - g_row)
  d_eta = _masked_exp(_causal(rows, cols, seg), m_col - m_row)
  # c_t = Σ_{s≤t} D_ts e^{E_s}: the chunk-start momentum, alive in the first segment only.
  from_start = jnp.exp(m_row) if seg is None else _masked_exp(seg.first_row, m_row)
  carry = jnp.sum(decay * from_start, axis=1, keepdims=True)
  live_row = (lax.broadcasted_iota(jnp.int32, (1, c), 1) <= last) if seg is None else seg.end_row
  to_end = _masked_exp(live_row, g_last - g_row)  # L_s = e^{G_last − G_s}, s ≤ last
  # γ_j = Σ_{j≤s≤last} L_s Dη_{sj}: a row sum of Dηᵀ (its [j, s] layout), masked to s ≤ last.
  gamma = jnp.sum(_masked_exp(_causal(cols, rows, seg), m_row - m_col) * to_end, axis=1,
                  keepdims=True)
  return d_eta, carry, gamma, to_end


def coefficients(gates_col: Array, gates_row: Array, last, segmented: bool = False) -> Array:
  """Phase 1 (momentum only), one chunk: the coefficient column ``[C, 4]`` (γ, c, 0, 0)."""
  seg = segments(gates_col, gates_row) if segmented else None
  _, carry, gamma, _ = _mom(gates_col, gates_row, last, seg)
  lane = lax.broadcasted_iota(jnp.int32, gates_col.shape, 1)
  return jnp.where(lane == COEF_GAMMA, gamma, 0.0) + jnp.where(lane == COEF_CARRY, carry, 0.0)


def _ends(gates_col: Array, last, seg: Optional[Segments] = None):
  """``(α [1, 1], e^{G_last − G_j} [C, 1], live [C, 1])`` (zero for padded tokens and, when
  segmented, outside the last live row's segment; α zero when that is not the first)."""
  last = _last(seg, last)
  g_col = _channel_col(gates_col, LOG_DECAY)
  g_last = _at_row(g_col, last)
  live = _col(gates_col.shape[0]) <= last if seg is None else seg.end_col
  alpha = jnp.exp(g_last) if seg is None else _masked_exp(seg.last_first, g_last)
  return alpha, _masked_exp(live, g_last - g_col), live


def _momentum_ends(gates_col: Array, coef: Array, live, last, seg: Optional[Segments] = None):
  """``(γ, c [C, 1], c_last, η [1, 1], μ [C, 1])`` from the coefficient column and the gates."""
  last = _last(seg, last)
  m_col = _channel_col(gates_col, LOG_MOMENTUM)
  m_last = _at_row(m_col, last)
  carry = _channel_col(coef, COEF_CARRY)
  eta = jnp.exp(m_last) if seg is None else _masked_exp(seg.last_first, m_last)
  return (_channel_col(coef, COEF_GAMMA), carry, _at_row(carry, last), eta,
          _masked_exp(live, m_last - m_col))


def _pseudo_values(k: Array, v: Array, beta: Array, s0: Array, seg: Optional[Segments], dtype):
  """``(r, u = β r)`` with ``r = V − K S₀`` (``K S₀`` only at stale tokens when segmented)."""
  ks = _mm(k, s0, dtype)
  r = v - (ks if seg is None else seg.stale * ks)
  return r, beta * r


def _from_start(a: Array, seg: Optional[Segments]) -> Array:
  """``a_t = e^{G_t}`` (``[C, 1]``) where the chunk-start state reaches token t."""
  return a if seg is None else jnp.where(seg.first_col, a, 0.0)


def state_step(k: Array, v: Array, gates_col: Array, coef: Optional[Array], s0: Array,
               p0: Optional[Array], last, dtype=None, segmented: bool = False):
  """Phase 2, one chunk: ``(S₁, P₁)`` (``P₁`` None without momentum, ``p0`` None)."""
  seg = segments(gates_col) if segmented else None
  beta = _channel_col(gates_col, BETA)
  alpha, gamma, live = _ends(gates_col, last, seg)
  _, u = _pseudo_values(k, v, beta, s0, seg, dtype)
  if p0 is None:
    return alpha * s0 + _mm_tn(gamma * k, u, dtype), None
  gamma, _, c_last, eta, mu = _momentum_ends(gates_col, coef, live, last, seg)
  s1 = alpha * s0 + _mm_tn(gamma * k, u, dtype) + c_last * p0
  return s1, eta * p0 + _mm_tn(mu * k, u, dtype)


def _write_matrix(q: Array, k: Array, gates_col: Array, gates_row: Array, last, momentum: bool,
                  scale: float, dtype, seg: Optional[Segments] = None):
  """``(Γ [C, C], q Kᵀ [C, C], c [C, 1] or None)``, q scaled."""
  rows, cols = _iotas(k.shape[0])
  g_col, g_row = _channel_col(gates_col, LOG_DECAY), _channel_row(gates_row, LOG_DECAY)
  gamma = _masked_exp(_causal(rows, cols, seg), g_col - g_row)
  carry = None
  if momentum:
    d_eta, carry, _, _ = _mom(gates_col, gates_row, last, seg)
    gamma = _mm(gamma, d_eta)  # gate-only: float32
  return gamma, _mm_nt(q * scale, k, dtype), carry


def output(q: Array, k: Array, v: Array, gates_col: Array, gates_row: Array, s0: Array,
           p0: Optional[Array], last, scale: float, dtype=None, segmented: bool = False) -> Array:
  """Phase 3, one chunk: ``o [C, V]``."""
  seg = segments(gates_col, gates_row) if segmented else None
  beta = _channel_col(gates_col, BETA)
  a = _from_start(jnp.exp(_channel_col(gates_col, LOG_DECAY)), seg)
  gamma, qk, carry = _write_matrix(q, k, gates_col, gates_row, last, p0 is not None, scale, dtype,
                                   seg)
  qs = q * scale
  _, u = _pseudo_values(k, v, beta, s0, seg, dtype)
  o = a * _mm(qs, s0, dtype) + _mm(gamma * qk, u, dtype)
  if p0 is not None:
    o = o + carry * _mm(qs, p0, dtype)
  return o


def dv_local(q: Array, k: Array, gates_col: Array, gates_row: Array, d_o: Array, last,
             momentum: bool, scale: float, dtype=None, segmented: bool = False) -> Array:
  """Backward, parallel: ``Pᵀ dO [C, V]``."""
  seg = segments(gates_col, gates_row) if segmented else None
  gamma, qk, _ = _write_matrix(q, k, gates_col, gates_row, last, momentum, scale, dtype, seg)
  return _mm_tn(gamma * qk, d_o, dtype)


def state_step_bwd(q: Array, k: Array, gates_col: Array, coef: Optional[Array], dv_loc: Array,
                   d_o: Array, d_s1: Array, d_p1: Optional[Array], last, scale: float,
                   dtype=None, segmented: bool = False):
  """Backward, sequential, one chunk: ``(dS₀, dP₀)`` from ``(dS₁, dP₁)`` (``dP`` None without
  momentum)."""
  seg = segments(gates_col) if segmented else None
  beta = _channel_col(gates_col, BETA)
  if seg is not None:
    beta = beta * seg.stale  # only stale tokens read S₀
  a = _from_start(jnp.exp(_channel_col(gates_col, LOG_DECAY)), seg)
  alpha, gamma, live = _ends(gates_col, last, seg)
  qs = q * scale
  if d_p1 is None:
    du = dv_loc + _mm(gamma * k, d_s1, dtype)
    return alpha * d_s1 + _mm_tn(a * qs, d_o, dtype) - _mm_tn(beta * k, du, dtype), None
  gamma, carry, c_last, eta, mu = _momentum_ends(gates_col, coef, live, last, seg)
  du = dv_loc + _mm(gamma * k, d_s1, dtype) + _mm(mu * k, d_p1, dtype)
  d_s0 = alpha * d_s1 + _mm_tn(a * qs, d_o, dtype) - _mm_tn(beta * k, du, dtype)
  return d_s0, c_last * d_s1 + eta * d_p1 + _mm_tn(carry * qs, d_o, dtype)


def _col_sums(x: Array) -> Array:
  """``[C, C] -> [C, 1]``: column sums as a column (``xᵀ 1``; float32)."""
  return _mm_tn(x, jnp.ones((x.shape[0], 1), jnp.float32))


def _as_row(col: Array) -> Array:
  """``[C, 1] -> [1, C]`` with an identity mask (exact: one non-zero term per sum)."""
  rows, cols = _iotas(col.shape[0])
  return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def _total(x: Array) -> Array:
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def grad(q: Array, k: Array, v: Array, gates_col: Array, gates_row: Array, s0: Array,
         p0: Optional[Array], d_o: Array, d_s1: Array, d_p1: Optional[Array], last,
         scale: float, dtype=None, segmented: bool = False) -> Chunk:
  """Backward, parallel: the gradients of one Titans chunk's inputs at fixed ``S₀`` (and ``P₀``).

  ``chunk.chunk_vjp``'s result (the tests compare them), written out so that every dot that
  reads an input or a state runs on ``dtype`` operands. With ``r = V − K S₀``, ``u = β r``:
  ``du = Pᵀ dO + (γ∘K) dS₁ + (μ∘K) dP₁``, ``dP = dO uᵀ``, ``dq = s(a∘(dO S₀ᵀ) + (dP∘Γ) K +
  c∘(dO P₀ᵀ))``, ``dK = (dP∘Γ)ᵀ q + γ∘(u dS₁ᵀ) + μ∘(u dP₁ᵀ) − (β∘du) S₀ᵀ``, ``dV = β∘du``,
  ``dβ = Σ r∘du``. The gates: ``dΓ = dP∘(q Kᵀ)``; with momentum it is pulled back through
  ``Γ = D·Dη`` (``dD = dΓ Dηᵀ``, ``dDη = Dᵀ dΓ``, float32), through ``c_t = Σ_s D_{ts} e^{E_s}``
  and ``γ = Dηᵀ L`` (``L_s = e^{G_last − G_s}``), then every exponential of G and E collects its
  share (``e∘`` row sums minus column sums). All of it lands in the gate column (``gates_row``'s
  gradient is zero). Segmented, every masked exponential is a constant zero (no share), ``K S₀``
  enters ``r`` at stale tokens only, and ``e^{E_s}`` in ``c`` at first-segment tokens only.
  """
  momentum = p0 is not None
  c = k.shape[0]
  seg = segments(gates_col, gates_row) if segmented else None
  last = _last(seg, last)
  beta = _channel_col(gates_col, BETA)
  g_col = _channel_col(gates_col, LOG_DECAY)
  a = _from_start(jnp.exp(g_col), seg)
  alpha, gamma, live = _ends(gates_col, last, seg)
  qs = q * scale
  rows, cols = _iotas(c)
  g_row = _channel_row(gates_row, LOG_DECAY)
  decay = _masked_exp(_causal(rows, cols, seg), g_col - g_row)  # D [t, s]
  gamma_mat = decay
  if momentum:
    d_eta, carry, gamma, _ = _mom(gates_col, gates_row, last, seg)
    gamma_mat = _mm(decay, d_eta)  # Γ = D·Dη, gate-only: float32
    m_col = _channel_col(gates_col, LOG_MOMENTUM)
    m_last = _at_row(m_col, last)
    eta = jnp.exp(m_last) if seg is None else _masked_exp(seg.last_first, m_last)
    mu = _masked_exp(live, m_last - m_col)
  qk = _mm_nt(qs, k, dtype)
  r, u = _pseudo_values(k, v, beta, s0, seg, dtype)
  beta_s0 = beta if seg is None else beta * seg.stale  # β where K S₀ enters r

  # Outputs and end states.
  du = _mm_tn(gamma_mat * qk, d_o, dtype) + _mm(gamma * k, d_s1, dtype)
  if momentum:
    du = du + _mm(mu * k, d_p1, dtype)
  dp = _mm_nt(d_o, u, dtype)  # dP [C, C]
  d_qk = dp * gamma_mat
  d_gamma_mat = dp * qk  # dΓ
  dq_s = a * _mm_nt(d_o, s0, dtype) + _mm(d_qk, k, dtype)
  u_ds = _mm_nt(u, d_s1, dtype)  # [C, K]
  dk = _mm_tn(d_qk, qs, dtype) + gamma * u_ds - _mm_nt(beta_s0 * du, s0, dtype)
  d_gamma = jnp.sum(k * u_ds, axis=1, keepdims=True)
  dv = beta * du
  d_beta = jnp.sum(r * du, axis=1, keepdims=True)
  d_a = jnp.sum(d_o * _mm(qs, s0, dtype), axis=1, keepdims=True)
  d_alpha = _total(s0 * d_s1)
  at_last = _col(c) == last

  if not momentum:
    e = d_gamma_mat * gamma_mat  # dΓ∘Γ, Γ = D
    d_g = a * d_a + jnp.sum(e, axis=1, keepdims=True) - _col_sums(e) - gamma * d_gamma
    d_g = d_g + jnp.where(at_last, _total(gamma * d_gamma) + alpha * d_alpha, 0.0)
    d_e = jnp.zeros_like(d_g)
  else:
    dq_s = dq_s + carry * _mm_nt(d_o, p0, dtype)
    u_dp = _mm_nt(u, d_p1, dtype)
    dk = dk + mu * u_dp
    d_mu = jnp.sum(k * u_dp, axis=1, keepdims=True)
    # c_t (and c_last in S₁), η = e^{E_last} (in P₁).
    d_carry = (jnp.sum(d_o * _mm(qs, p0, dtype), axis=1, keepdims=True)
               + jnp.where(at_last, _total(p0 * d_s1), 0.0))
    d_eta_end = _total(p0 * d_p1)
    m_row = _channel_row(gates_row, LOG_MOMENTUM)
    from_start = jnp.exp(m_row) if seg is None else _masked_exp(seg.first_row, m_row)
    # Γ = D·Dη (gate-only dots, float32).
    d_decay = _mm_nt(d_gamma_mat, d_eta)  # dΓ Dηᵀ
    d_d_eta = _mm_tn(decay, d_gamma_mat)  # Dᵀ dΓ
    e_c = d_carry * decay * from_start  # c_t = Σ_s D_ts e^{E_s}: dD∘D and dE_s's share
    e_decay = d_decay * decay + e_c
    # γ_j = Σ_s L_s Dη_sj: dDη_sj += L_s dγ_j, dL_s = Σ_j Dη_sj dγ_j.
    t1 = d_eta * _as_row(d_gamma)
    d_to_end = jnp.sum(t1, axis=1, keepdims=True)  # [C, 1] over s
    to_end_col = _masked_exp(live, _at_row(g_col, last) - g_col)
    e_eta = d_d_eta * d_eta + to_end_col * t1
    d_g = (a * d_a + jnp.sum(e_decay, axis=1, keepdims=True) - _col_sums(e_decay)
           - to_end_col * d_to_end)
    d_g = d_g + jnp.where(at_last, _total(to_end_col * d_to_end) + alpha * d_alpha, 0.0)
    d_e = (jnp.sum(e_eta, axis=1, keepdims=True) - _col_sums(e_eta) + _col_sums(e_c)
           - mu * d_mu)
    d_e = d_e + jnp.where(at_last, _total(mu * d_mu) + eta * d_eta_end, 0.0)
  lane = lax.broadcasted_iota(jnp.int32, gates_col.shape, 1)
  d_gates_col = (jnp.where(lane == BETA, d_beta, 0.0) + jnp.where(lane == LOG_DECAY, d_g, 0.0)
                 + jnp.where(lane == LOG_MOMENTUM, d_e, 0.0))
  return Chunk(scale * dq_s, dk, dv, d_gates_col, jnp.zeros_like(gates_row))
