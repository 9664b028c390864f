"""The reference: the recurrence of ``nlx.memory.core``, token by token.

``recurrent_scan`` runs the write and read of the core's docstring one token at a time, with
``jax.grad`` for the gradient of the inner objective: every fast path (the chunk-parallel forms in
``nlx.memory.chunk_start`` and ``nlx.ops.delta_rule``, the kernels of
``pallas_kernels/chunked_memory``) is tested against it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nlx.memory.base import (Array, Memory, Weights, batched, bind, check_read, check_row_scale,
                             decay_term, layer_inputs, tree_scale)
from nlx.memory.objectives import Objective


def chunk_positions(reset: Array, offset, chunk_size: int) -> Array:
  """Each token's position in its gradient chunk, ``[T]`` for ``reset [T]``: chunks of
  ``chunk_size`` tokens aligned with each document's first token (a reset), and, before the first
  reset, with the call's first token at position ``offset`` (a call that continues a chunk)."""
  index = jnp.arange(reset.shape[-1])
  start = jax.lax.cummax(jnp.where(reset, index, -1), axis=0)
  return jnp.where(start >= 0, index - start, index + offset) % chunk_size


def _time_major(x, batch_ndim: int):
  """``[*batch, T, ...] -> [T, *batch, ...]`` (None passes through)."""
  return None if x is None else jnp.moveaxis(x, batch_ndim, 0)


def recurrent_scan(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                   lr: Array, log_decay: Array, momentum: Optional[Array], weights: Weights,
                   momentum_state: Optional[Weights], grad_chunk: Optional[int] = None,
                   batch_ndim: int = 0, offset=0, chunk_start: Optional[Weights] = None,
                   dgd: bool = False, read: str = "after_write", params: Optional[dict] = None,
                   row_scale: Optional[Array] = None, accumulated: Optional[Weights] = None,
                   reset: Optional[Array] = None, reset_weights: Optional[Weights] = None):
  """The token-by-token recurrence of ``nlx.memory.core`` (the reference).

  Args:
    memory, objective: the memory and its inner objective.
    q, k: ``[T, K]``; v: ``[T, V]``; lr, log_decay: ``[T]``; momentum: ``[T]`` or None.
    weights: initial memory weights ``{name: [in, out]}``.
    momentum_state: initial momentum (same structure) or None (no momentum).
    grad_chunk: None for gradients at the current (decayed) state; an int C for gradients at the
      state at the start of the token's chunk (chunks of C tokens aligned at t = −offset).
    batch_ndim: number of leading batch axes on every argument (e.g. 2 for ``[B, H, T, D]``);
      the scan over time is outermost and the per-slice step is vmapped inside it.
    offset: int scalar (may be traced): tokens of the first chunk already seen by an earlier call;
      with ``reset``, also ``[*batch]`` (one per slice).
    chunk_start: the weights at the start of that chunk (needed when ``offset`` can be > 0).
    dgd: add DGD's per-layer decay term ``−lr_t h_lᵀ (h_l W_l)`` (needs ``grad_chunk``; ``h_l``:
      layer l's input for the key ``k_t`` at the gradient's reference state). ``"proximal"``:
      layer l's rate, on its decay and gradient terms, is ``lr_t / (1 + lr_t ‖h_l‖²)``.
      ``"normalized"``: no decay term; layer l's gradient step at ``lr_t / max(1, ‖h_l‖²)``
      (``core.layer_rates``).
    read: "after_write" (``o_t = M_t(q_t)``) or "before_write" (``o_t = M_{t−1}(q_t)``).
    params: the memory's fixed parameters (``Memory.param_shapes``), or None.
    row_scale: ``[C]`` (C = ``grad_chunk``) or None: ``M_t = γ_t M_0 + c_i A_t`` for the token at
      position i of its chunk (``nlx.memory.core``); needs ``grad_chunk``, no momentum, no DGD.
    accumulated: with ``row_scale``, the accumulated writes ``A`` of the chunk that an earlier
      call began (same structure as ``weights``; None: zeros, as at a chunk boundary).
    reset: ``[T]`` bool or None: document boundaries. Where true, the weights are set to
      ``reset_weights`` (None: zeros) and the momentum (and ``accumulated``) to zero before the
      token's decay and write (a ``where``, so that a non-finite state cannot leak into the next
      document), and with ``grad_chunk`` a gradient chunk starts at the token: the document's
      chunks are aligned with its first token (``chunk_positions``), as if it ran alone.
    reset_weights: the weights a reset restores (same structure as ``weights``), or None.

  Returns:
    ``(o [T, V], weights, momentum_state, chunk_start, accumulated)`` after the last token;
    ``chunk_start`` is the start weights of the chunk the next token belongs to (the final
    weights when it starts a new chunk; None without ``grad_chunk``), ``accumulated`` that
    chunk's ``A`` so far (zeros when it starts a new chunk; None without ``row_scale``). The next
    token's position in its chunk is ``(offset + T) % grad_chunk`` without ``reset``, and
    ``(chunk_positions(reset, offset, grad_chunk)[-1] + 1) % grad_chunk`` with it.
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  if dgd and grad_chunk is None:
    raise ValueError("dgd=True needs grad_chunk (DGD's keys are taken at the chunk-start state)")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, grad_chunk)
  scaled = row_scale is not None
  if reset is not None and reset_weights is None:
    reset_weights = jax.tree.map(jnp.zeros_like, weights)

  def step(t, carry, x, consts):
    mem, scale, w_init = bind(memory, consts[0]), consts[1], consts[2]
    grad_fn = jax.grad(lambda w, kt, vt: objective.loss(mem.apply(w, kt), vt))
    w, p, w_ref, a, d = carry
    qt, kt, vt, lrt, gt, mt, rt, position = x
    if rt is not None:  # a document starts at this token: it sees none of the earlier state
      w = jax.tree.map(lambda x, y: jnp.where(rt, y, x), w, w_init)
      p = jax.tree.map(lambda x: jnp.where(rt, jnp.zeros_like(x), x), p)
    if grad_chunk is not None:
      position = (t + offset) % grad_chunk if position is None else position
      w_ref = jax.tree.map(lambda x, y: jnp.where(position == 0, x, y), w, w_ref)
    decayed = tree_scale(jnp.exp(gt), w)
    rate = {n: lrt for n in w}
    if dgd:  # h_l: the layer's input at w_ref
      h = layer_inputs(mem, w_ref, kt)
      if dgd == "proximal":  # lr_l = lr / (1 + lr ‖h_l‖²)
        rate = {n: lrt / (1.0 + lrt * jnp.sum(h[n] * h[n])) for n in w}
      if dgd == "normalized":  # lr_l = lr / max(1, ‖h_l‖²)
        rate = {n: lrt / jnp.maximum(1.0, jnp.sum(h[n] * h[n])) for n in w}
      if decay_term(dgd):  # W_l ← exp(g) W_l − lr_l h_lᵀ (h_l W_l)
        decayed = {n: decayed[n] - rate[n] * jnp.outer(h[n], h[n] @ w[n]) for n in w}
    grads = grad_fn(w_ref if grad_chunk is not None else decayed, kt, vt)
    update = {n: -rate[n] * grads[n] for n in grads}
    if scaled:  # M_t = γ_t M_0 + c_i A_t, tracking d = γ_t M_0 and A_t = exp(g_t) A_{t−1} + U_t
      d = tree_scale(jnp.exp(gt), jax.tree.map(lambda x, y: jnp.where(position == 0, x, y), w, d))
      a = jax.tree.map(lambda x, u: jnp.exp(gt) * jnp.where(position == 0, 0, x) + u, a, update)
      new = jax.tree.map(lambda x, y: x + scale[position] * y, d, a)
    else:
      if p is not None:
        p = jax.tree.map(lambda x, u: mt * x + u, p, update)
        update = p
      new = jax.tree.map(jnp.add, decayed, update)
    return (new, p, w_ref, a, d), mem.apply(new if read == "after_write" else w, qt)

  consts = (params, row_scale, reset_weights)

  def body(carry, tx):
    t, x = tx
    return batched(lambda c, xt, cs: step(t, c, xt, cs), batch_ndim)(carry, x, consts)

  positions = None
  if reset is not None and grad_chunk is not None:
    offsets = jnp.broadcast_to(offset, reset.shape[:batch_ndim])
    positions = batched(lambda r, o: chunk_positions(r, o, grad_chunk), batch_ndim)(reset, offsets)
  xs = jax.tree.map(lambda x: _time_major(x, batch_ndim),
                    (q, k, v, lr, log_decay, momentum, reset, positions))
  t = q.shape[batch_ndim]
  start = weights if chunk_start is None else chunk_start
  a = d = None
  if scaled:
    a = jax.tree.map(jnp.zeros_like, weights) if accumulated is None else accumulated

    def start_d(w, acc, scale, off):  # γ M_0 of the chunk in progress: M = γ M_0 + c A now
      c_prev = jnp.where(off % grad_chunk > 0, scale[(off - 1) % grad_chunk], 0.0)
      return jax.tree.map(lambda x, y: x - c_prev * y, w, acc)

    d = batched(start_d, batch_ndim)(weights, a, row_scale,
                                     jnp.broadcast_to(offset, q.shape[:batch_ndim]))
  (weights, momentum_state, w_ref, a, _), o = jax.lax.scan(
      body, (weights, momentum_state, start, a, d), (jnp.arange(t), xs))
  if grad_chunk is not None:
    new_chunk = ((offset + t) % grad_chunk == 0 if positions is None else
                 (positions[..., -1] + 1) % grad_chunk == 0)
    expand = lambda x: jnp.reshape(new_chunk, jnp.shape(new_chunk) + (1,) * (x.ndim - batch_ndim))
    w_ref = jax.tree.map(lambda x, y: jnp.where(expand(x), x, y), weights, w_ref)
    if scaled:
      a = jax.tree.map(lambda x: jnp.where(expand(x), 0, x), a)
  return jnp.moveaxis(o, 0, batch_ndim), weights, momentum_state, (
      w_ref if grad_chunk is not None else None), a
