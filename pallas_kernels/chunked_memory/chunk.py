"""One chunk of a linear associative memory, written once for the reference and both kernels.

Every function here works on ONE (batch·head, value-block) slice and ONE chunk of C tokens, in
float32, and uses only operations that Pallas lowers on GPU (Triton) and TPU (Mosaic): 2-D
matmuls (``lax.dot_general``, transposed operands included), elementwise math, ``where`` on iota
masks, reductions with ``keepdims`` and a ``fori_loop``. No slicing of values, no cumsum, no 1-D
vectors: gates arrive already accumulated within the chunk, as a column ``[C, 4]`` and a row
``[4, C]`` (the two layouts a kernel needs for outer differences), so the same code runs inside a
Triton program, a Mosaic kernel and a plain ``lax.scan`` (``reference.py``).

Three memories (``KINDS``), the linear-memory ops of ``nlx.ops`` (see its docstrings):

* ``linear_attention``: ``S_t = a_t S_{t-1} + k_t v_tᵀ``.
* ``delta_rule``: ``S_t = a_t S_{t-1} + β_t k_t (v_t − a_t S_{t-1}ᵀ k_t)ᵀ`` (online L2 step).
* ``titans``: ``P_t = η_t P_{t-1} + β_t k_t (v_t − S_cᵀ k_t)ᵀ`` (gradient at the chunk-start state
  ``S_c``, β the inner learning rate), ``S_t = a_t S_{t-1} + P_t``; without momentum ``P_t`` is
  the write alone.

With ``G_t = Σ_{l≤t} log a_l`` and ``E_t = Σ_{l≤t} log η_l`` (sums within the chunk), every state in
the chunk is ``S_t = e^{G_t} S_0 + c_t P_0 + Σ_{j≤t} Γ_{tj} k_j u_jᵀ`` with pseudo-values ``u`` and
write coefficients Γ (``Γ = D``, the decay matrix ``D_{tj} = e^{G_t − G_j}``, or ``Γ = D·D^η`` with
momentum). Outputs read after the write: ``o_t = S_tᵀ (scale · q_t)``.

Gate channels (``GATE_CHANNELS``): 0 β (write strength / inner learning rate; 1 for linear
attention), 1 G (cumulative log-decay), 2 E (cumulative log-momentum), 3 the segment (the number
of document boundaries so far within the chunk, as a float; zero without boundaries; it also
keeps the channel count a power of two for Triton).

Document boundaries (``segmented=True``, linear attention and the delta rule only): the state is
zero before a reset token's decay and write. Token j's write reaches token t ≥ j only in the same
segment, and the chunk-start state reaches token t only in segment 0, so every decay of the chunk
is masked: ``D_{tj}`` (and the delta rule's ``A``) where the segments of t and j differ, the
decay-from-start ``e^{G_t}`` where t's segment is not 0, the end row ``e^{G_last − G_j}`` where
j's segment is not the last token's, and ``e^{G_last}`` (what the next chunk keeps of ``S_0``)
when the chunk holds a boundary at or before ``last``. With ``segmented=False`` the channel is
never read and the code is that of the kernels without boundaries.

Padding: only the final chunk may be partial; ``last`` is the index of its last real token (C − 1
for full chunks). End states are read at row ``last``, and no row ``t ≤ last`` depends on a later
row, so padded tokens (zeros, β = 0) never reach an output or a state.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

KINDS = ("linear_attention", "delta_rule", "titans")
GATE_CHANNELS = 4
BETA, LOG_DECAY, LOG_MOMENTUM, SEGMENT = 0, 1, 2, 3
# The kinds that take document boundaries (``segmented=True``).
SEGMENTED_KINDS = ("linear_attention", "delta_rule")


class Chunk(NamedTuple):
  """Inputs of one chunk (float32). q, k: ``[C, K]``; v: ``[C, V]``; gates ``[C, 4]``/``[4, C]``."""

  q: Array
  k: Array
  v: Array
  gates_col: Array
  gates_row: Array


class State(NamedTuple):
  """Memory ``[K, V]`` and momentum ``[K, V]`` (None without momentum)."""

  memory: Array
  momentum: Optional[Array]


_MM, _MM_TN, _MM_NT = ((1,), (0,)), ((0,), (0,)), ((1,), (1,))


def _dot(a: Array, b: Array, dims, dtype) -> Array:
  """``dot_general`` with float32 accumulation; operands cast to ``dtype`` first (None: as given).

  ``dtype`` is the operand precision of the call: the input dtype (bfloat16 operands run at the
  matrix unit's bfloat16 rate, accumulating in float32) or float32.
  """
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _mm(a: Array, b: Array, dtype=None) -> Array:
  """``a @ b``, float32 accumulation."""
  return _dot(a, b, _MM, dtype)


def _mm_tn(a: Array, b: Array, dtype=None) -> Array:
  """``aᵀ @ b`` without materialising ``aᵀ``."""
  return _dot(a, b, _MM_TN, dtype)


def _mm_nt(a: Array, b: Array, dtype=None) -> Array:
  """``a @ bᵀ`` without materialising ``bᵀ``."""
  return _dot(a, b, _MM_NT, dtype)


def _iotas(c: int) -> tuple[Array, Array]:
  """Row and column indices of a ``[C, C]`` matrix."""
  return (lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _channel_col(gates_col: Array, ch: int) -> Array:
  """``[C, 4] -> [C, 1]``: one gate channel as a column."""
  lane = lax.broadcasted_iota(jnp.int32, gates_col.shape, 1)
  return jnp.sum(jnp.where(lane == ch, gates_col, 0.0), axis=1, keepdims=True)


def _channel_row(gates_row: Array, ch: int) -> Array:
  """``[4, C] -> [1, C]``: one gate channel as a row."""
  sub = lax.broadcasted_iota(jnp.int32, gates_row.shape, 0)
  return jnp.sum(jnp.where(sub == ch, gates_row, 0.0), axis=0, keepdims=True)


def _at_row(col: Array, last) -> Array:
  """``[C, 1] -> [1, 1]``: the entry at row ``last``."""
  rows = lax.broadcasted_iota(jnp.int32, col.shape, 0)
  return jnp.sum(jnp.where(rows == last, col, 0.0), axis=0, keepdims=True)


def last_row(index, num_chunks: int, chunk: int, last: int):
  """The index of the last real token of chunk ``index``: ``last`` for the final chunk, else C − 1.

  Arithmetic rather than ``where`` (Triton's lowering mistypes a ``where`` of two constants).
  """
  is_final = (index == num_chunks - 1).astype(jnp.int32)
  return (chunk - 1) - is_final * (chunk - 1 - last)


def _masked_exp(mask: Array, x: Array) -> Array:
  """``exp(x)`` where ``mask``, 0 elsewhere (masked entries never reach ``exp``)."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _same_segment(chunk: Chunk) -> Array:
  """``[C, C]`` bool: tokens t (row) and j (column) lie in the same segment (symmetric)."""
  return (_channel_col(chunk.gates_col, SEGMENT) == _channel_row(chunk.gates_row, SEGMENT))


def _from_start(g: Array, seg: Optional[Array]) -> Array:
  """``e^{G}``: what the chunk-start state keeps at a token (``[C, 1]``) or at ``last``
  (``[1, 1]``); zero past a document boundary (``seg``, the token's segment, nonzero). ``seg``
  None: no boundaries."""
  return jnp.exp(g) if seg is None else _masked_exp(seg == 0.0, g)


def delta_matrix_t(chunk: Chunk, segmented: bool = False, dtype=None) -> Array:
  """``Aᵀ [C, C]`` of the delta rule's UT system ``(I + A) U = …``: ``A_{tj} = β_t D_{tj} k_t·k_j``, j < t.

  Built transposed (``Aᵀ_{jt}``), the layout ``unit_lower_inverse`` reads its rows in. With
  ``segmented``, ``D_{tj}`` is zero across a document boundary.
  """
  c = chunk.k.shape[0]
  rows, cols = _iotas(c)
  g_col = _channel_col(chunk.gates_col, LOG_DECAY)
  g_row = _channel_row(chunk.gates_row, LOG_DECAY)
  beta_row = _channel_row(chunk.gates_row, BETA)
  below = cols > rows
  if segmented:
    below = below & _same_segment(chunk)
  decay_t = _masked_exp(below, g_row - g_col)  # [j, t] = e^{G_t − G_j}, j < t
  return beta_row * decay_t * _mm_nt(chunk.k, chunk.k, dtype)


def unit_lower_inverse(a_t: Array) -> Array:
  """``(I + A)^{-1}`` for strictly lower triangular A, given ``Aᵀ [C, C]``; by block doubling.

  Blocked forward substitution on the matrix unit, no row loop: with ``X_b`` the inverse of the
  block diagonal of ``I + A`` in blocks of b tokens (``X_1 = I``), the inverse in blocks of 2b is
  ``X_2b = X_b − X_b A_b X_b``, where ``A_b`` keeps the entries of A that lie in a 2b block but
  not in a b block (the lower-left b×b quarter of each 2b block): the 2×2 block formula
  ``[[L11, 0], [L21, L22]]⁻¹ = [[L11⁻¹, 0], [−L22⁻¹ L21 L11⁻¹, L22⁻¹]]`` applied to every 2b block
  at once with masks, two ``[C, C]`` matmuls per level, log2(C) levels. Operands stay float32
  (the inverse's own arithmetic, as fla keeps its triangular solve in float32). Not
  differentiated: ``chunk_vjp`` applies the inverse's closed-form rule.
  """
  c = a_t.shape[0]
  rows, cols = _iotas(c)
  inv = (rows == cols).astype(jnp.float32)
  b = 1
  while b < c:
    # Aᵀ restricted to A's lower-left quarters of the 2b blocks; X A_b = X (A_bᵀ)ᵀ.
    quarter = ((rows // (2 * b)) == (cols // (2 * b))) & ((rows // b) != (cols // b))
    a_quarter_t = jnp.where(quarter, a_t, 0.0)
    inv = inv - _mm(_mm_nt(inv, a_quarter_t), inv)
    b *= 2
  return inv


def unit_lower_inverse_rows(a_t: Array) -> Array:
  """``(I + A)^{-1}`` by row-by-row forward substitution (C − 1 dependent steps): the serial
  algorithm ``unit_lower_inverse`` replaces, kept as the tests' second opinion."""
  c = a_t.shape[0]
  rows, cols = _iotas(c)
  eye = (rows == cols).astype(jnp.float32)

  def body(i, inv):
    a_row_i = jnp.sum(jnp.where(cols == i, a_t, 0.0), axis=1, keepdims=True)  # [C, 1]: A_{i,m}
    new_row = -jnp.sum(a_row_i * inv, axis=0, keepdims=True)  # [1, C]
    return jnp.where(rows == i, new_row + eye, inv)

  return lax.fori_loop(1, c, body, eye)


def chunk_step(kind: str, scale: float, chunk: Chunk, state: State, last,
               inverse: Optional[Array] = None, segmented: bool = False,
               dtype=None) -> tuple[Array, State]:
  """One chunk: its outputs and the state after its token ``last``.

  Args:
    kind: one of ``KINDS``.
    scale: multiplies q.
    chunk: the chunk's inputs (float32).
    state: the state before the chunk (momentum None unless ``kind == "titans"`` with momentum).
    last: int scalar, index of the chunk's last real token.
    inverse: ``(I + A)^{-1}`` for the delta rule (``unit_lower_inverse(delta_matrix_t(chunk))``);
      computed here when None. Passed in by the backward pass, which differentiates it apart.
    segmented: the chunk's gates carry document boundaries (channel ``SEGMENT``; kinds in
      ``SEGMENTED_KINDS``, no momentum): every decay that crosses one is masked to zero.
    dtype: operand dtype of the dots that read inputs or states (the input dtype; float32
      accumulation); None: as given (float32). Dots among gate-only or inverse quantities stay
      float32.

  Returns:
    ``(o [C, V], State)``.
  """
  q, k, v, gc, gr = chunk
  c = k.shape[0]
  rows, cols = _iotas(c)
  causal = rows >= cols
  beta = _channel_col(gc, BETA)
  g_col, g_row = _channel_col(gc, LOG_DECAY), _channel_row(gr, LOG_DECAY)
  g_last = _at_row(g_col, last)
  w0, p0 = state
  seg_col = seg_last = None  # segments of the tokens [C, 1] and of token ``last`` [1, 1]
  if segmented:
    if kind not in SEGMENTED_KINDS or p0 is not None:
      raise ValueError(f"segmented=True is only for kinds {SEGMENTED_KINDS} without momentum; "
                       f"got kind={kind!r}")
    seg_col = _channel_col(gc, SEGMENT)
    seg_last = _at_row(seg_col, last)
    causal = causal & _same_segment(chunk)

  # Pseudo-values u: what each token writes, given the chunk-start state.
  if kind == "linear_attention":
    u = v
  elif kind == "delta_rule":
    if inverse is None:
      inverse = unit_lower_inverse(delta_matrix_t(chunk, segmented, dtype))
    u = _mm(inverse, beta * v - _mm(beta * _from_start(g_col, seg_col) * k, w0, dtype), dtype)
  else:
    u = beta * (v - _mm(k, w0, dtype))

  # Write coefficients: Γ [C, C] and the end row of Γ as a column [C, 1].
  decay = _masked_exp(causal, g_col - g_row)
  end_live = lax.broadcasted_iota(jnp.int32, (c, 1), 0) <= last  # [C, 1] over j
  if segmented:
    end_live = end_live & (seg_col == seg_last)
  live_row = lax.broadcasted_iota(jnp.int32, (1, c), 1) <= last  # [1, C] over s
  if p0 is None:
    gamma, gamma_end = decay, _masked_exp(end_live, g_last - g_col)
  else:
    m_col, m_row = _channel_col(gc, LOG_MOMENTUM), _channel_row(gr, LOG_MOMENTUM)
    m_last = _at_row(m_col, last)
    gamma = _mm(decay, _masked_exp(causal, m_col - m_row))
    # Γ_{last, j} = Σ_{j≤s≤last} e^{G_last − G_s} e^{E_s − E_j}: a row sum of D^ηᵀ, masked to s ≤ last.
    to_end = _masked_exp(live_row, g_last - g_row)  # [1, C] over s
    gamma_end = jnp.sum(_masked_exp(cols >= rows, m_row - m_col) * to_end, axis=1, keepdims=True)

  qs = q * scale
  o = (_from_start(g_col, seg_col) * _mm(qs, w0, dtype)
       + _mm(gamma * _mm_nt(qs, k, dtype), u, dtype))
  w1 = _from_start(g_last, seg_last) * w0 + _mm_tn(k, gamma_end * u, dtype)
  p1 = None
  if p0 is not None:
    carry = jnp.sum(decay * jnp.exp(m_row), axis=1, keepdims=True)  # c_t = Σ_{s≤t} e^{G_t−G_s+E_s}
    o = o + carry * _mm(qs, p0, dtype)
    carry_end = jnp.sum(jnp.where(live_row, to_end * jnp.exp(m_row), 0.0), axis=1,
                        keepdims=True)
    w1 = w1 + carry_end * p0
    p1 = jnp.exp(m_last) * p0 + _mm_tn(k, _masked_exp(end_live, m_last - m_col) * u, dtype)
  return o, State(w1, p1)


def chunk_vjp(kind: str, scale: float, chunk: Chunk, state: State, last, d_out: Array,
              d_state: State, segmented: bool = False, dtype=None) -> tuple[Chunk, State]:
  """Gradients of one ``chunk_step`` w.r.t. its chunk inputs and its start state.

  ``jax.vjp`` of ``chunk_step`` with the delta rule's inverse as an input, whose cotangent is
  then pulled back by hand (``d(I+A)^{-1} = −(I+A)^{-1} dA (I+A)^{-1}``), so that the loop of the
  forward substitution is never differentiated (its residuals would be C matrices of ``[C, C]``).

  Args:
    d_out: ``[C, V]`` cotangent of the outputs; d_state: cotangent of the end state.
    segmented, dtype: as in ``chunk_step`` (no gradient reaches the segment channel).

  Returns:
    ``(d_chunk, d_state_start)`` with the structures of ``chunk`` and ``state``.
  """
  inverse = None
  if kind == "delta_rule":
    inverse = unit_lower_inverse(delta_matrix_t(chunk, segmented, dtype))
  # The differentiated dots run on float32 operands: JAX transposes a bfloat16 × bfloat16 → float32
  # dot into one that pairs the float32 cotangent with a bfloat16 operand, which the Triton
  # lowering refuses (and a custom_vjp that would cast it does not lower). Upcasting bfloat16 is
  # exact, so only the matrix unit's rate is lost, not accuracy.
  dtype = None
  step = lambda ch, st, inv: chunk_step(kind, scale, ch, st, last, inv, segmented, dtype)
  _, pull = jax.vjp(step, chunk, state, inverse)
  d_chunk, d_start, d_inverse = pull((d_out, d_state))
  if kind == "delta_rule":
    # d(Aᵀ) = −(I+A)^{-1} d(inv)ᵀ (I+A)^{-1}, kept on A's pattern (j < t in Aᵀ's [j, t] layout).
    rows, cols = _iotas(inverse.shape[0])
    d_a_t = jnp.where(cols > rows, -_mm(inverse, _mm_tn(d_inverse, inverse)), 0.0)
    _, pull_a = jax.vjp(lambda ch: delta_matrix_t(ch, segmented, dtype), chunk)
    (d_chunk_a,) = pull_a(d_a_t)
    d_chunk = jax.tree.map(jnp.add, d_chunk, d_chunk_a)
  return d_chunk, d_start
