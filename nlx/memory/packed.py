"""The chunk-start dual form with document boundaries (packed documents).

A document's gradient chunks are aligned with its first token (``chunk_positions``), so they
need not match a call's chunks. ``chunk_start_scan_packed`` (``titans_memory``/``dgd_memory`` with
``reset``) keeps the call's chunks and lets a document's gradient chunk straddle two of them;
``document_slots`` (HOPE's and the CMS's packed forms) instead places the tokens in a buffer
where every later chunk of a document is aligned with a buffer chunk.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp

from nlx.memory.base import (Array, Memory, Weights, batched, bind, check_read,
                             check_row_scale, decay_term)
from nlx.memory.chunk_start import (_chunk_writes, _pick, _prepare_coefficients, _pseudo_values,
                                    _weights_at, chunk_read)
from nlx.memory.chunks import ChunkCoefficients, decay_matrix
from nlx.memory.objectives import Objective
from nlx.memory.recurrent import chunk_positions


def gradient_chunks(reset: Array, offset, chunk_size: int) -> tuple[Array, Array]:
  """``(positions, fresh)``, each ``[T]`` for ``reset [T]``: each token's position in its
  gradient chunk (``chunk_positions``: chunks aligned with each document's first token), and
  whether that chunk is its document's first, whose gradient reference is the reset state."""
  index = jnp.arange(reset.shape[-1])
  start = jax.lax.cummax(jnp.where(reset, index, -1), axis=0)
  return chunk_positions(reset, offset, chunk_size), (start >= 0) & (index - start < chunk_size)


def document_slots(reset: Array, offset, chunk_size: int) -> tuple[Array, Array, Array]:
  """Where each token of a packed sequence goes in ``chunk_start_scan_packed``'s buffer.

  A document's gradient chunks are aligned with its first token (``chunk_positions``). In the
  buffer every chunk boundary that is not a document's start falls on a buffer-chunk boundary
  (placeholders pad up to it), so each buffer chunk's tokens take their gradients either at the
  buffer chunk's start state or, for a document's first gradient chunk (which may start anywhere
  and straddle two buffer chunks), at the reset state. Only a document longer than a chunk pads,
  once, so ``offset + T + ⌊T/(C+1)⌋ (C − 1)`` slots always suffice.

  Args:
    reset: ``[T]`` bool; offset: the first token's position in its chunk (int, may be traced);
    chunk_size: C.

  Returns:
    ``(slots, positions, fresh)``, each ``[T]``: the buffer slot, the position in the gradient
    chunk, and whether the token's gradient reference is the reset state.
  """
  c, index = chunk_size, jnp.arange(reset.shape[-1])
  positions, fresh = gradient_chunks(reset, offset, c)
  boundary = (positions == 0) & ~reset  # a chunk boundary inside a document: aligned in the buffer
  last = jax.lax.cummax(jnp.where(boundary, index, -1), axis=0)
  phase = jnp.where(last >= 0, index - last, index + offset) % c  # each slot's phase mod C
  before = jnp.concatenate([jnp.reshape(offset - 1, (1,)).astype(phase.dtype), phase[:-1]])
  pad = jnp.where(boundary, -(before + 1) % c, 0)
  return offset + index + jnp.cumsum(pad), positions, fresh


def place_at_slots(x: Array, slots: Array, size: int, fill=0) -> Array:
  """One slice's tokens ``x [T, ...]`` put at ``slots [T]`` (``document_slots``) of a buffer
  ``[size, ...]`` whose other slots hold ``fill`` (the placeholders)."""
  return jnp.full((size,) + x.shape[1:], fill, x.dtype).at[slots].set(x)


def buffer_chunks(t: int, chunk_size: int) -> int:
  """The number of buffer chunks ``document_slots`` needs for ``t`` tokens (any offset)."""
  c = chunk_size
  return -(-(c - 1 + t + (t // (c + 1)) * (c - 1)) // c)


def small_buffer_chunks(t: int, chunk_size: int, slack: int = 4) -> int:
  """Buffer chunks for ``T + T/slack`` slots (whole chunks; at most ``buffer_chunks``'): enough
  for most layouts, whose documents are much longer than a chunk. ``slack`` 0: ``buffer_chunks``."""
  c, full = chunk_size, buffer_chunks(t, chunk_size)
  return full if not slack else min(full, -(-t // c) + -(-t // (slack * c)))


_R = TypeVar("_R")


def with_small_buffer(reset: Array, chunk_sizes: Sequence[int], run: Callable[[bool], _R],
                      slack: int = 4) -> _R:
  """``run(small)``: ``small`` True when, at every chunk size, every row of ``reset [B, T]`` fits
  ``document_slots``' tokens in ``small_buffer_chunks``, else False (the worst layout's buffer).
  A ``lax.cond`` on the batch: both are compiled, one runs; ``run(False)`` alone where the small
  buffer is no smaller."""
  t = reset.shape[-1]
  sizes = [c for c in chunk_sizes if small_buffer_chunks(t, c, slack) < buffer_chunks(t, c)]
  if not sizes:
    return run(False)
  last = lambda c: batched(lambda r: document_slots(r, 0, c)[0][-1], 1)(reset.astype(bool))
  fits = jnp.all(jnp.stack([jnp.max(last(c)) < small_buffer_chunks(t, c, slack) * c
                            for c in sizes]))
  return jax.lax.cond(fits, lambda: run(True), lambda: run(False))


def scaled_coefficients(log_decay: Array, reset: Array, later: Array, scale: Array, c_in,
                        c_last) -> ChunkCoefficients:
  """``ChunkCoefficients`` of a buffer chunk of ``chunk_start_scan_packed`` with a row scale
  (TTT's ``c_i``; no momentum, no DGD: the second state is the accumulated writes ``A``).

  The chunk's tokens fall in gradient chunks that start at its resets and at ``later`` (a
  document's later chunk, at most one per buffer chunk, at ``split``); before both, the tokens
  continue the gradient chunk of the incoming state (``M_in = γ M_0 + c_in A_in``, ``A_in``). For
  token t at position i of its gradient chunk (``scale[t] = c_i``):

  * continuing: ``M_t = γ_t M_in + (c_i − c_in) γ_t A_in + c_i Σ (γ_t/γ_j) U_j``;
  * after ``split``: its chunk starts from ``M_{split−1}`` (the continuing chunk's last token,
    at position C − 1), so ``M_t = γ_t M_in + (c_last − c_in) γ_t A_in + c_last Σ_{j<split}
    (γ_t/γ_j) U_j + c_i Σ_{j≥split} (γ_t/γ_j) U_j``;
  * after a reset r: ``M_t = (γ_t/γ_{r−1}) M_init + c_i Σ_{j≥r} (γ_t/γ_j) U_j``;

  and ``A_t`` sums its own gradient chunk's decayed writes (plus ``γ_t A_in`` when continuing).

  Args:
    log_decay, reset, later, scale: ``[C]``; c_in: the scale of the incoming state's last token
      (``c_{−1} = 0`` at a call's start; ``c_last`` when a chunk starts at slot 0, so that
      ``A_in`` drops out); c_last: ``c_{C−1}``.
  """
  segment = jnp.cumsum(reset.astype(jnp.int32))
  chunk = jnp.cumsum((reset | later).astype(jnp.int32))
  same_chunk = chunk[:, None] == chunk[None, :]
  decay = jnp.where(segment[:, None] == segment[None, :], decay_matrix(log_decay), 0.0)
  first = segment == 0
  continuing, after = first & (chunk == 0), first & (chunk > 0)
  decayed = jnp.exp(jnp.cumsum(log_decay))
  gamma = jnp.where(first, decayed, 0.0)
  scales = jnp.where(same_chunk, scale[:, None],
                     jnp.where(after[:, None] & continuing[None, :], c_last, 0.0))
  carry = gamma * jnp.where(continuing, scale - c_in, jnp.where(after, c_last - c_in, 0.0))
  init = decay @ jnp.where(reset, jnp.exp(log_decay), 0.0)
  return ChunkCoefficients(gamma, decay * scales, carry, jnp.where(continuing, decayed, 0.0),
                           jnp.where(same_chunk, decay, 0.0), None, init)


def chunk_start_scan_packed(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                            lr: Array, log_decay: Array, momentum: Optional[Array],
                            weights: Weights, momentum_state: Optional[Weights],
                            chunk_start: Weights, offset, chunk_size: int,
                            reset: Optional[Array], reset_weights: Optional[Weights],
                            batch_ndim: int = 0, dgd: bool = False,
                            read: str = "after_write", params: Optional[dict] = None,
                            row_scale: Optional[Array] = None,
                            accumulated: Optional[Weights] = None):
  """``chunk_start_scan_offset`` with document boundaries: the parallel form of
  ``recurrent_scan(..., grad_chunk=C, reset=reset, reset_weights=reset_weights)``.

  The tokens fill buffer chunks of C slots in order (the first ``offset`` slots are placeholders
  that write nothing, decay nothing and keep the momentum, as in ``chunk_start_scan_offset``; no
  padding between documents). A document's gradient chunks are aligned with its first token, so
  they need not match the buffer's: in each buffer chunk a token takes its gradient at

  * ``reset_weights`` when it lies in its document's first gradient chunk (``gradient_chunks``'
    ``fresh``; the reset state is known before the scan);
  * the state after token ``split − 1`` of this buffer chunk when a later gradient chunk of its
    document starts at position ``split`` of this buffer chunk and the token is at or after it
    (there is at most one such start per buffer chunk: two are C tokens apart). That state
    comes from the writes of the tokens before ``split``, so the chunk's gradients are taken
    twice (a second ``chunk_writes``), in exchange for a buffer of ``⌈(offset + T)/C⌉`` chunks;
  * otherwise the reference carried from the previous buffer chunk (the first: ``chunk_start``).

  A reset token restores ``reset_weights`` and zero momentum (``ChunkCoefficients.init``).

  Args:
    reset: ``[*batch, T]`` bool, or None (no boundaries: slices that continue different chunks,
      ``offset [*batch]``); reset_weights: ``{name: [*batch, in, out]}`` (unused without reset);
      offset: a Python int (the buffer then has ``⌈(offset + T)/C⌉`` chunks), or an int array,
      scalar or ``[*batch]``, that may be traced (``⌈(T + C − 1)/C⌉`` chunks); row_scale
      ``[*batch, C]`` and ``accumulated``: as in ``chunk_start_scan_offset`` (the accumulated
      writes take the momentum's place; ``scaled_coefficients``; reads after the write only);
      the rest as in ``chunk_start_scan_offset``.

  Returns:
    ``(o, weights, momentum_state, chunk_start, offset)`` after the last token; ``offset``
    ``[*batch]``, the next token's position in its chunk. With ``row_scale``,
    ``momentum_state`` is the accumulated writes of the next token's chunk (zeros when it starts
    a new one).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, chunk_size)
  scaled = row_scale is not None
  if scaled:
    if read != "after_write":
      raise ValueError("row_scale with document boundaries reads after the write only; use "
                       "recurrent_scan for read='before_write'")
    momentum_state = jax.tree.map(jnp.zeros_like, weights) if accumulated is None else accumulated
  c, t = chunk_size, q.shape[batch_ndim]
  batch_shape = q.shape[:batch_ndim]
  static = isinstance(offset, int)
  n = -(-(offset + t) // c) if static else -(-(t + c - 1) // c)
  if reset is None:
    reset, reset_weights = jnp.zeros(batch_shape + (t,), bool), weights
  offsets = jnp.broadcast_to(jnp.asarray(offset, jnp.int32), batch_shape)
  positions, fresh = batched(lambda r, o: gradient_chunks(r, o, c), batch_ndim)(reset, offsets)
  later = (positions == 0) & ~reset  # a document's later gradient chunk starts here

  def place(x, fill):  # [*batch, T, ...] -> [N, *batch, C, ...]
    if x is None:
      return None
    if static:
      pad = [(0, 0)] * x.ndim
      pad[batch_ndim] = (offset, n * c - offset - t)
      buffer = jnp.pad(x, pad, constant_values=fill)
    else:
      put = lambda xs, o: jax.lax.dynamic_update_slice_in_dim(
          jnp.full((n * c,) + xs.shape[1:], fill, xs.dtype), xs, o, axis=0)
      buffer = batched(put, batch_ndim)(x, offsets)
    buffer = buffer.reshape(batch_shape + (n, c) + x.shape[batch_ndim + 1:])
    return jnp.moveaxis(buffer, batch_ndim, 0)

  xs = (place(q, 0), place(k, 0), place(v, 0), place(lr, 0), place(log_decay, 0),
        place(momentum, 1), place(reset, False), place(fresh, False),
        place(jnp.ones(reset.shape, bool), False), place(later, False),
        place(positions, 0) if scaled else None)

  def prepare(start, chunk, w_init, consts, scale):  # parallel over chunks
    qc, kc, vc, lrc, gc, mc, rc, fc, lc, sc, pc = chunk
    split = jnp.where(sc.any(), jnp.argmax(sc), c)
    if scaled:  # c_in: the scale of the token before the chunk's first real one
      # (a chunk that starts there: c_last, so that the incoming A drops out)
      c_in = jnp.where(pc[start] > 0, scale[jnp.maximum(pc[start] - 1, 0)], scale[c - 1])
      row = jnp.where(jnp.arange(c) < start, c_in, scale[pc])  # placeholders first: no change
      coefficients = (scaled_coefficients(gc, rc, sc, row, c_in, scale[c - 1]), None)
    else:
      coefficients = _prepare_coefficients(gc, mc, dgd, read, start, reset=rc, live=lc)
    # The gradients at the reset state (first gradient chunks) do not depend on the scan.
    at_init = _chunk_writes(bind(memory, consts), objective, w_init, kc, vc, lrc, dgd)
    return (qc, kc, vc, lrc) + coefficients + (fc, split, at_init)

  last = offsets + t - 1  # [*batch]: the last real token's slot
  aligned = static and (offset + t) % c == 0  # the last token ends the last chunk
  index = jnp.arange(n).reshape((n,) + (1,) * batch_ndim)
  lasts = jnp.broadcast_to(last, (n,) + batch_shape)

  def writes(part, chunk, w0, p0, w_init):  # the chunk's writes from the selected gradients
    if decay_term(dgd):
      return _pseudo_values(*part, chunk[3], w0, p0, chunk[5], w_init, same=False, dgd=dgd)
    return part[0]._replace(init=w_init)

  def body(carry, x, consts):
    mem, (w0, p0, ref, w_init), (at, chunk) = bind(memory, consts), carry, x
    _, kc, vc, lrc, coef = chunk[:5]
    fresh_c, split, at_init = chunk[6:9]
    at_ref = _pick(_chunk_writes(mem, objective, ref, kc, vc, lrc, dgd), at_init, fresh_c)
    # The reference of a gradient chunk that starts at `split`: the state after the token before,
    # from the writes of the tokens before it (their gradients do not depend on it).
    before = writes(at_ref, chunk, w0, p0, w_init)
    w_split = _weights_at(w0, p0, before, coef, jnp.maximum(split - 1, 0))[0]
    w_split = jax.tree.map(lambda a, b: jnp.where(split == 0, a, b), w0, w_split)
    late = (jnp.arange(c) >= split) & ~fresh_c
    cw = writes(_pick(at_ref, _chunk_writes(mem, objective, w_split, kc, vc, lrc, dgd), late), chunk,
                w0, p0, w_init)
    ref = jax.tree.map(lambda a, b: jnp.where(split < c, a, b), w_split, ref)
    w1, p1 = _weights_at(w0, p0, cw, coef, c - 1)
    at_last = None if aligned else _weights_at(w0, p0, cw, coef, at % c)
    return (w1, p1, ref, w_init), ((w0, p0, cw), at_last)

  starts = jnp.broadcast_to(jnp.where(index == 0, offsets, 0), (n,) + batch_shape)
  chunks = jax.vmap(batched(prepare, batch_ndim), in_axes=(0, 0, None, None, None))(
      starts, xs, reset_weights, params, row_scale)
  step = batched(body, batch_ndim)
  (w_end, p_end, ref, _), (ys, at_last) = jax.lax.scan(
      lambda carry, x: step(carry, x, params),
      (weights, momentum_state, chunk_start, reset_weights), (lasts, chunks))
  read_chunk = batched(lambda ch, y, cs: chunk_read(bind(memory, cs), ch, y, read), batch_ndim)
  o = jax.vmap(read_chunk, in_axes=(0, 0, None))(chunks, ys, params)
  o = jnp.moveaxis(o, 0, batch_ndim)
  o = o.reshape(batch_shape + (n * c,) + o.shape[batch_ndim + 2:])
  if static:
    o = jax.lax.slice_in_dim(o, offset, offset + t, axis=batch_ndim)
  else:
    o = batched(lambda os, s: jax.lax.dynamic_slice_in_dim(os, s, t, axis=0), batch_ndim)(
        o, offsets)

  if aligned:
    weights, momentum_state = w_end, p_end
  else:
    chunk_of_last = batched(lambda tree, i: jax.tree.map(lambda x: x[i], tree), batch_ndim)
    to_batch = lambda tree: jax.tree.map(lambda x: jnp.moveaxis(x, 0, batch_ndim), tree)
    weights, momentum_state = chunk_of_last(to_batch(at_last), last // c)
  new_offset = ((positions[..., -1] + 1) % c).astype(jnp.int32)
  expand = lambda m, x: jnp.reshape(m, m.shape + (1,) * (x.ndim - batch_ndim))
  pick = lambda m, a, b: jax.tree.map(lambda x, y: jnp.where(expand(m, x), x, y), a, b)
  # The next token's gradient chunk: a new one, its document's first (reference: the reset
  # state), or the last token's (the reference carried out of the last buffer chunk).
  ref = pick(fresh[..., -1], reset_weights, ref)
  chunk_start = pick(new_offset == 0, weights, ref)
  if scaled:  # a new chunk accumulates from zero
    momentum_state = pick(new_offset == 0, jax.tree.map(jnp.zeros_like, momentum_state),
                          momentum_state)
  return o, weights, momentum_state, chunk_start, new_offset
