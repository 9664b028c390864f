"""Chunk algebra shared by the parallel forms: decay matrices, the UT inverse, the coefficients
of a chunk's states, the dual-form matmuls and the scan over chunks.

Inside a chunk of C tokens every state is a combination of the chunk's start state and its
per-token writes (``ChunkCoefficients``); the reads become masked matmuls (``chunk_matmul``) and
only the chunk-to-chunk state is sequential (``scan_chunks``). The chunk-start dual form
(``nlx.memory.chunk_start``) and the delta rule's UT-transform form (``nlx.ops.delta_rule``) are
both built from these pieces.

``unit_lower_inverse`` / ``unit_lower_solve`` are the XLA side's one unit lower triangular inverse
(the delta rule's UT transform and DGD's decay terms). The kernels keep their own, in-kernel one
(``pallas_kernels/chunked_memory/chunk.py``: forward substitution in a ``fori_loop`` on iota
masks, which Triton and Mosaic lower); the kernels import nothing from nlx.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from nlx.memory.base import Array, batched, check_row_scale, decay_term


def segment_sum(x: Array) -> Array:
  """``[C] -> [C, C]``: ``out[t, s] = Σ_{l=s+1..t} x_l`` for ``s ≤ t``, ``-inf`` above the diagonal.

  Built from a masked cumulative sum rather than a difference of prefix sums, so long runs of
  strong decay lose no precision.
  """
  c = x.shape[-1]
  lower = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  # sums[t, s] = Σ_{l ≤ t} [l > s] x_l: a cumulative sum down the rows, as one matmul (XLA's CPU
  # cumsum is a slow reduce-window).
  sums = lower.astype(x.dtype) @ jnp.where(strict, x[:, None], 0)
  return jnp.where(lower, sums, -jnp.inf)


def decay_matrix(log_a: Array) -> Array:
  """``[C] -> [C, C]``: ``Π_{l=s+1..t} a_l`` for ``s ≤ t`` (1 on the diagonal), 0 above."""
  return jnp.exp(segment_sum(log_a))


def segment_decay(log_a: Array, reset: Array) -> tuple[Array, Array]:
  """A chunk's decay matrix and decay since its start, with document boundaries.

  ``reset [C]`` (bool) marks the tokens before whose decay and write the state is set to zero.
  Token j's write reaches token i ≥ j only if no reset lies in ``(j, i]`` (the same segment:
  equal counts of resets so far), and the chunk's incoming state reaches token i only if no
  reset lies in ``[0, i]``. The masks are applied with ``where`` to finite decays, so no
  ``-inf`` enters the cumulative sums.

  Returns:
    ``(decay [C, C], gamma [C])``: ``decay_matrix(log_a)`` and ``exp(cumsum(log_a))`` with the
    entries that cross a boundary set to zero.
  """
  segment = jnp.cumsum(reset.astype(jnp.int32))
  same = segment[:, None] == segment[None, :]
  decay = jnp.where(same, decay_matrix(log_a), 0.0)
  gamma = jnp.where(segment == 0, jnp.exp(jnp.cumsum(log_a)), 0.0)
  return decay, gamma


def unit_lower_inverse(a: Array) -> Array:
  """``(I + a)^{-1}`` for a strictly lower triangular ``a: [C, C]``.

  ``a`` is nilpotent (``aᶜ = 0``), so ``(I + a)^{-1} = Σ_{k<C} (−a)^k = Π_j (I + (−a)^{2^j})``:
  log2(C) squarings and products, only matmuls (differentiable with small residuals, and no
  LAPACK custom call: XLA's CPU triangular solve stalled under load in the backward pass).
  """
  c = a.shape[-1]
  power = -jnp.tril(a, -1)
  inverse = jnp.eye(c, dtype=a.dtype) + power
  span = 2  # inverse = Σ_{k<span} (−a)^k
  while span < c:
    power = power @ power
    inverse = inverse + power @ inverse
    span *= 2
  return inverse


def unit_lower_solve(a: Array, rhs: Array, block: int = 16) -> Array:
  """``(I + a)^{-1} rhs`` for a strictly lower triangular ``a: [C, C]`` and ``rhs: [C, N]``.

  Blocked forward substitution: the diagonal blocks are inverted (``unit_lower_inverse``) and
  the blocks below them are eliminated by matmuls, ``O(C² N + C b²)`` against the explicit
  inverse's ``O(C³ log C)`` (which dominated DGD's chunk at C = 64). Only matmuls, as above.
  """
  c = a.shape[-1]
  a = jnp.tril(a, -1)
  done = []
  for lo in range(0, c, block):
    hi = min(lo + block, c)
    r = rhs[lo:hi]
    if done:
      r = r - a[lo:hi, :lo] @ jnp.concatenate(done, 0)
    done.append(unit_lower_inverse(a[lo:hi, lo:hi]) @ r)
  return done[0] if len(done) == 1 else jnp.concatenate(done, 0)


class ChunkCoefficients(NamedTuple):
  """How memory and momentum at each token of a chunk depend on the chunk's start and writes.

  With U_j = −lr_j G_j the write of token j (a gradient step) and, for DGD, w_j the pseudo-value
  of its decay term (``_dgd_writes``), both outer products with token j's key, for t, j in the
  chunk:
    M_t = gamma[t] M_0 + carry[t] P_0 + Σ_{j≤t} (write[t, j] U_j + decay[t, j] w_j)
    P_t = mom_carry[t] P_0 + Σ_{j≤t} mom_write[t, j] U_j
  Without momentum, ``write`` is the decay matrix and the momentum fields are None; without DGD,
  ``decay`` is None.

  With a row scale ``c`` (``chunk_coefficients(row_scale=...)``, no momentum, no DGD) the second
  state ``P`` is the chunk's accumulated writes ``A`` instead of a momentum: ``M_t = γ_t M_in +
  (c_t − c_{s−1}) γ_t A_in + c_t Σ_{j≤t} (γ_t/γ_j) U_j`` and ``A_t = γ_t A_in + Σ_{j≤t}
  (γ_t/γ_j) U_j``, where ``M_in``, ``A_in`` are the state before slot ``s = start`` (a call that
  continues a chunk; ``c_{−1} = 0``, and ``A_in = 0`` at a chunk boundary). So ``write = c ⊙
  decay`` (row-scaled), ``carry = (c − c_{s−1}) γ``, ``mom_carry = γ``, ``mom_write = decay``.

  With document boundaries (``chunk_coefficients(reset=...)``), a reset token r sets the memory to
  a reset state ``M_init`` and the momentum to zero before its decay and write: every coefficient
  that crosses a reset is zero, and ``M_t`` gains ``init[t] M_init`` (``init[t] = γ_t/γ_{r−1}``
  for the last reset r ≤ t, zero before the chunk's first reset).
  """

  gamma: Array          # [C]
  write: Array          # [C, C], lower triangular
  carry: Optional[Array]      # [C]
  mom_carry: Optional[Array]  # [C]
  mom_write: Optional[Array]  # [C, C]
  decay: Optional[Array] = None  # [C, C]
  init: Optional[Array] = None   # [C]: with document boundaries, the weight of the reset state


def chunk_coefficients(log_decay: Array, momentum: Optional[Array], start=0,
                       dgd: bool = False, row_scale: Optional[Array] = None,
                       reset: Optional[Array] = None,
                       live: Optional[Array] = None) -> ChunkCoefficients:
  """Coefficients of ``ChunkCoefficients`` for one chunk; log_decay, momentum ``[C]``.

  ``start`` (int scalar, may be traced): the first token of the chunk that this call owns; the
  momentum ``P_0`` is carried in at that token (earlier positions hold placeholder tokens that
  write nothing, decay nothing and have η = 1, see ``chunk_start_scan_offset``). ``dgd``: also
  the coefficients of DGD's pseudo-values (they decay, and have no momentum). ``row_scale``:
  ``[C]``, the scale ``c`` of every position's accumulated writes (``ChunkCoefficients``; a
  final partial chunk passes its first positions). ``reset``: ``[C]`` bool, document boundaries
  (not with ``row_scale``); ``live``: ``[C]`` bool or None, false at placeholders that sit
  between a document's tokens (``chunk_start_scan_packed``), which then add no momentum.
  """
  if reset is not None:
    return _reset_coefficients(log_decay, momentum, start, dgd, reset, live)
  gamma = jnp.exp(jnp.cumsum(log_decay))
  decay = decay_matrix(log_decay)
  dgd_decay = decay if decay_term(dgd) else None
  if row_scale is not None:
    check_row_scale(row_scale, momentum, dgd, log_decay.shape[-1])
    live = jnp.arange(log_decay.shape[-1]) >= start
    c_in = jnp.where(start > 0, row_scale[jnp.maximum(start - 1, 0)], 0.0)
    return ChunkCoefficients(gamma, row_scale[:, None] * decay, (row_scale - c_in) * gamma * live,
                             gamma * live, decay)
  if momentum is None:
    return ChunkCoefficients(gamma, decay, None, None, None, dgd_decay)
  # η = 0 is allowed (no carry-over); clamp its log so that gradients stay finite.
  log_eta = jnp.log(jnp.maximum(momentum, jnp.finfo(momentum.dtype).tiny))
  mom_write = decay_matrix(log_eta)
  mom_carry = jnp.exp(jnp.cumsum(log_eta)) * (jnp.arange(log_eta.shape[-1]) >= start)
  # M_t = Σ_{s≤t} (γ_t/γ_s) P_s + γ_t M_0, and P_s expands in P_0 and U_j: compose the two.
  return ChunkCoefficients(gamma, decay @ mom_write, decay @ mom_carry, mom_carry, mom_write,
                           dgd_decay)


def _reset_coefficients(log_decay: Array, momentum: Optional[Array], start, dgd: bool,
                        reset: Array, live: Optional[Array] = None) -> ChunkCoefficients:
  """``chunk_coefficients`` with document boundaries ``reset [C]`` (``ChunkCoefficients``)."""
  c = log_decay.shape[-1]
  segment = jnp.cumsum(reset.astype(jnp.int32))
  same = segment[:, None] == segment[None, :]
  before_first = segment == 0
  decay = jnp.where(same, decay_matrix(log_decay), 0.0)
  gamma = jnp.where(before_first, jnp.exp(jnp.cumsum(log_decay)), 0.0)
  # M_init enters at the reset token r, before its decay: γ_t/γ_{r−1} = decay[t, r] exp(g_r).
  init = decay @ jnp.where(reset, jnp.exp(log_decay), 0.0)
  dgd_decay = decay if decay_term(dgd) else None
  if momentum is None:
    return ChunkCoefficients(gamma, decay, None, None, None, dgd_decay, init)
  log_eta = jnp.log(jnp.maximum(momentum, jnp.finfo(momentum.dtype).tiny))
  mom_write = jnp.where(same, decay_matrix(log_eta), 0.0)
  carried = (jnp.arange(c) >= start) & before_first
  mom_carry = jnp.where(carried, jnp.exp(jnp.cumsum(log_eta)), 0.0)
  # M_t = Σ_s (γ_t/γ_s) P_s over the real tokens s (a placeholder keeps P but adds nothing to M).
  added = decay if live is None else jnp.where(live[None, :], decay, 0.0)
  return ChunkCoefficients(gamma, added @ mom_write, added @ mom_carry, mom_carry, mom_write,
                           dgd_decay, init)


def previous_rows(coef: ChunkCoefficients, reset: Optional[Array] = None) -> ChunkCoefficients:
  """The coefficients of the memory before each token's write: row t is ``coef``'s row t − 1
  (row 0: the chunk's start state). Momentum fields are dropped (reads need the weights only).
  With document boundaries ``reset [C]``, the row of a reset token is the reset state alone."""
  def shift(x, first):
    return None if x is None else jnp.concatenate([jnp.full((1,) + x.shape[1:], first, x.dtype),
                                                   x[:-1]], axis=0)

  prev = ChunkCoefficients(shift(coef.gamma, 1.0), shift(coef.write, 0.0),
                           shift(coef.carry, 0.0), None, None, shift(coef.decay, 0.0),
                           shift(coef.init, 0.0))
  if reset is None:
    return prev
  rows = lambda x, value: None if x is None else jnp.where(
      reset.reshape(reset.shape + (1,) * (x.ndim - 1)), value, x)
  return ChunkCoefficients(rows(prev.gamma, 0.0), rows(prev.write, 0.0), rows(prev.carry, 0.0),
                           None, None, rows(prev.decay, 0.0), rows(prev.init, 1.0))


def chunk_matmul(h: Array, w0: Array, keys: Array, writes: Array, write: Array, gamma: Array,
                 p0: Optional[Array] = None, carry: Optional[Array] = None,
                 pseudo: Optional[Array] = None, decay: Optional[Array] = None,
                 w_init: Optional[Array] = None, init: Optional[Array] = None) -> Array:
  """Row t of ``h`` times the weights of token t, without forming them (the dual form).

  The weights of token t are ``gamma[t] w0 + carry[t] p0 + init[t] w_init + Σ_{j≤t} keys_jᵀ
  (write[t, j] writes_j + decay[t, j] pseudo_j)``.

  Args:
    h: ``[C, in]`` inputs; w0, p0, w_init: ``[in, out]``; keys: ``[C, in]``; writes, pseudo:
    ``[C, out]``; write, decay: ``[C, C]``; gamma, carry, init: ``[C]``.

  Returns:
    ``[C, out]``.
  """
  x = h @ keys.T
  out = gamma[:, None] * (h @ w0) + (write * x) @ writes
  if pseudo is not None:
    out = out + (decay * x) @ pseudo
  if p0 is not None:
    out = out + carry[:, None] * (h @ p0)
  if w_init is not None:
    out = out + init[:, None] * (h @ w_init)
  return out


def chunk_end_weights(w0: Array, keys: Array, writes: Array, write_row: Array, gamma_end: Array,
                      p0: Optional[Array] = None, carry_end: Optional[Array] = None,
                      pseudo: Optional[Array] = None, decay_row: Optional[Array] = None,
                      w_init: Optional[Array] = None, init_end=None) -> Array:
  """The weights after the chunk's last token: ``chunk_matmul``'s weights for its last row."""
  combined = write_row[:, None] * writes
  if pseudo is not None:
    combined = combined + decay_row[:, None] * pseudo
  w = gamma_end * w0 + keys.T @ combined
  if p0 is not None:
    w = w + carry_end * p0
  if w_init is not None:
    w = w + init_end * w_init
  return w


def scan_chunks(body, carry, xs, chunk_size: int, prepare=None, finish=None,
                batch_ndim: int = 0, consts=None):
  """``lax.scan`` of ``body`` over chunks of ``chunk_size`` steps, and the remainder chunk.

  Only ``body`` is sequential. ``prepare`` (before) and ``finish`` (after) run for all chunks at
  once, so the scan carries the state and nothing else (as flash-linear-attention does).

  Args:
    body: ``(carry, chunk) -> (carry, y)`` for one batch slice.
    carry: initial carry (leaves ``[*batch, ...]``).
    xs: pytree of arrays ``[*batch, T, ...]`` (None leaves allowed).
    chunk_size: C. The last ``T mod C`` steps form a shorter final chunk, handled by a second call
      of ``body``; no padding is needed, so no padded token can touch the state.
    prepare: optional state-independent ``chunk -> chunk`` step, run for all chunks in parallel
      (vmapped) before the sequential scan.
    finish: optional ``(chunk, y) -> out [C, ...]``, run for all chunks in parallel after the scan
      (default: ``y`` itself, which must then be ``[C, ...]``).
    batch_ndim: number of leading batch axes. The scan runs over chunk-major arrays
      ``[N, *batch, C, ...]`` with ``body`` vmapped inside it; a scan nested in vmaps would slice
      batch-strided stacks, which XLA's CPU backend copies whole at every step of the backward
      pass (quadratic in the number of chunks).
    consts: optional per-slice constants (a pytree of ``[*batch, ...]`` leaves, e.g. a memory's
      fixed parameters): when given, the last argument of ``body`` and ``finish``.

  Returns:
    ``(carry, ys [*batch, T, ...])``.
  """
  t = jax.tree.leaves(xs)[0].shape[batch_ndim]
  n = t // chunk_size
  prepare = prepare or (lambda chunk: chunk)
  if consts is None:
    finish = finish or (lambda chunk, y: y)
    step = batched(body, batch_ndim)
    finish_all, finish_one = batched(finish, batch_ndim + 1), batched(finish, batch_ndim)
  else:  # constants are per slice: every chunk of a slice shares them (not mapped over chunks)
    per_slice_body = batched(body, batch_ndim)
    per_slice_finish = batched(finish or (lambda chunk, y, cs: y), batch_ndim)
    step = lambda c, chunk: per_slice_body(c, chunk, consts)
    finish_all = lambda chunks, y: jax.vmap(per_slice_finish, in_axes=(0, 0, None))(chunks, y,
                                                                                   consts)
    finish_one = lambda chunk, y: per_slice_finish(chunk, y, consts)
  ys = []
  if n:
    def split(x):
      x = jax.lax.slice_in_dim(x, 0, n * chunk_size, axis=batch_ndim)
      x = x.reshape(x.shape[:batch_ndim] + (n, chunk_size) + x.shape[batch_ndim + 1:])
      return jnp.moveaxis(x, batch_ndim, 0)

    full = batched(prepare, batch_ndim + 1)(jax.tree.map(split, xs))
    carry, y = jax.lax.scan(step, carry, full)
    y = jnp.moveaxis(finish_all(full, y), 0, batch_ndim)
    ys.append(y.reshape(y.shape[:batch_ndim] + (n * chunk_size,) + y.shape[batch_ndim + 2:]))
  if t > n * chunk_size:
    tail = jax.tree.map(lambda x: jax.lax.slice_in_dim(x, n * chunk_size, t, axis=batch_ndim), xs)
    tail = batched(prepare, batch_ndim)(tail)
    # A scan of length 1, not a plain call: the remainder chunk called outside a scan gave
    # garbage gradients (NaN, ~1e30) in about half of the processes under jit on XLA:CPU (jaxlib
    # 0.10.2; Mamba2 with T < chunk_size), right ones eagerly and inside a scan.
    carry, y = jax.lax.scan(step, carry, jax.tree.map(lambda x: x[None], tail))
    ys.append(finish_one(tail, jax.tree.map(lambda x: x[0], y)))
  return carry, jnp.concatenate(ys, axis=batch_ndim) if len(ys) > 1 else ys[0]
