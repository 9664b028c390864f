"""The chunk-start dual form, for any memory: ``recurrent_scan(..., grad_chunk=C)`` in parallel.

Within a chunk every gradient is taken at the chunk-start weights, so all of the chunk's
gradients are known at its start: each token's weights are a combination (``ChunkCoefficients``)
of the start weights, the start momentum and the per-token gradient factors, and the reads run
the memory's forward pass with masked matmuls (``chunk_matmul``) for every layer. With DGD each
layer's decay terms join the writes as pseudo-values that solve a unit lower triangular system
(``_dgd_writes``, the UT transform of the delta rule). Titans, TTT, linear attention and DGD
(``nlx.ops``) and HOPE's chunk step (``nlx.nn.hope``: ``chunk_update``/``chunk_output``) run here;
packed documents: ``nlx/memory/packed.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from nlx.memory.base import (Array, Memory, Weights, batched, bind, check_read, check_row_scale,
                             decay_term)
from nlx.memory.chunks import (ChunkCoefficients, chunk_coefficients, chunk_end_weights,
                               chunk_matmul, previous_rows, scan_chunks, unit_lower_solve)
from nlx.memory.objectives import Objective


def layer_grad_factors(memory: Memory, objective: Objective, weights: Weights, k: Array,
                       v: Array) -> tuple[Weights, Weights, Weights]:
  """Per-token gradient factors at fixed weights.

  Each layer is used once, so ``∇_{W[name]} loss(M(k_j), v_j) = inputs[name][j]ᵀ ⊗ errors[name][j]``
  with ``inputs`` the layer's input and ``errors`` the loss gradient w.r.t. its output. One
  backward pass for the chunk: a zero "tap" added to every layer's output, one row per token,
  receives exactly that token's error.

  Args:
    k: ``[C, K]``; v: ``[C, V]``.

  Returns:
    ``(inputs, errors, outputs)``: dicts of ``[C, in]``, ``[C, out]`` and ``[C, out]`` arrays
    (``outputs``: each layer's output ``inputs @ W``).
  """

  def tapped_loss(taps):
    inputs, outputs = {}, {}

    def matmul(name, h):
      inputs[name], outputs[name] = h, h @ weights[name]
      return outputs[name] + taps[name]

    return objective.loss(memory.forward(matmul, k), v).sum(), (inputs, outputs)

  taps = {name: jnp.zeros(k.shape[:1] + w.shape[-1:], w.dtype) for name, w in weights.items()}
  errors, (inputs, outputs) = jax.grad(tapped_loss, has_aux=True)(taps)
  return inputs, errors, outputs


class ChunkWrites(NamedTuple):
  """A chunk's writes, per layer: ``keys [C, in]`` (the layer's inputs at the gradient's
  reference state), ``writes [C, out]`` (U_j = −lr_j e_j, e the loss gradient w.r.t. the layer's
  output) and, for DGD, ``pseudo [C, out]`` (the pseudo-values of the decay term). With document
  boundaries, ``init`` is the reset state ``M_init`` (``{name: [in, out]}``) that the chunk's
  reset tokens restore (``ChunkCoefficients.init``)."""

  keys: Weights
  writes: Weights
  pseudo: Optional[Weights] = None
  init: Optional[Weights] = None


def layer_rates(lr: Array, keys: Weights, dgd=False) -> Weights:
  """Each layer's rate ``{name: [C]}`` for the rates ``lr [C]`` and the layers' inputs ``keys``.

  ``dgd="proximal"``: ``lr_t / (1 + lr_t ‖h_l‖²)`` for layer l's input ``h_l``, the exact step of
  DGD's proximal objective (docs/EQUATIONS.md, choice 1): ``(I + lr h_lᵀ h_l)⁻¹`` by
  Sherman–Morrison, ``η/(1 + η)`` for a unit-norm input (the arXiv rate). ``dgd="normalized"``
  (plain gradient steps, no decay term): ``lr_t / max(1, ‖h_l‖²)``, so that a layer whose input
  is longer than a unit-norm key steps no further than such a key would (the chunk bound of
  ``nlx.nn.neural_memory_config.MAX_CHUNK_STEP`` then holds for every layer of an MLP memory).
  Otherwise ``lr``.
  """
  if dgd == "normalized":
    return {name: lr / jnp.maximum(1.0, jnp.sum(h * h, axis=-1)) for name, h in keys.items()}
  if dgd != "proximal":
    return {name: lr for name in keys}
  return {name: lr / (1.0 + lr * jnp.sum(h * h, axis=-1)) for name, h in keys.items()}


def _chunk_writes(memory: Memory, objective: Objective, w_grad: Weights, k: Array, v: Array,
                  lr: Array, dgd=False) -> tuple[ChunkWrites, Weights]:
  """A chunk's gradient factors at ``w_grad``, and each layer's output there (each layer's
  writes at its ``layer_rates``)."""
  inputs, errors, outputs = layer_grad_factors(memory, objective, w_grad, k, v)
  rates = layer_rates(lr, inputs, dgd)
  writes = {name: -rates[name][:, None] * e for name, e in errors.items()}
  return ChunkWrites(inputs, writes), outputs


def _dgd_writes(memory: Memory, objective: Objective, w_grad: Weights, k: Array, v: Array,
                lr: Array, w0: Weights, p0: Optional[Weights],
                prev: ChunkCoefficients, fresh=None, w_init=None, dgd=True) -> ChunkWrites:
  """A chunk's writes with DGD's decay term (``_pseudo_values``); with document boundaries,
  ``fresh [C]`` marks the tokens whose gradient is taken at the reset state ``w_init`` instead
  of ``w_grad`` (``_selected_writes``)."""
  cw, outputs = _selected_writes(memory, objective, w_grad, k, v, lr, fresh, w_init, dgd)
  return _pseudo_values(cw, outputs, lr, w0, p0, prev, w_init,
                        same=w_grad is w0 and fresh is None, dgd=dgd)


def _pseudo_values(cw: ChunkWrites, outputs: Weights, lr: Array, w0: Weights,
                   p0: Optional[Weights], prev: ChunkCoefficients, w_init: Optional[Weights],
                   same: bool, dgd=True) -> ChunkWrites:
  """``cw`` with DGD's pseudo-values.

  Layer l's decay term at token s is ``−lr_s h_sᵀ (h_s W_{s−1})``, an outer product with the key
  ``h_s`` (its input at the gradient's reference) and the pseudo-value ``w_s = −lr_s h_s
  W_{s−1}``. ``W_{s−1}`` is linear in the earlier pseudo-values (``prev``: the coefficients of the
  state before each write), so they solve a unit lower triangular system, as in the delta rule's
  UT transform: ``(I + A) w = −lr ⊙ known``, ``A[s, j] = lr_s (γ_{s−1}/γ_j) (h_s · h_j)`` for
  j < s and ``known`` the part of ``h_s W_{s−1}`` that does not involve w (with document
  boundaries it includes ``prev.init[s] h_s w_init``). ``same``: every key is the layer's input
  at ``w0``, so ``h @ w0`` is ``outputs``. Each layer's ``lr`` is its ``layer_rates``.
  """
  pseudo, rates = {}, layer_rates(lr, cw.keys, dgd)
  for name, h in cw.keys.items():
    lr = rates[name]
    x = h @ h.T
    hw0 = outputs[name] if same else h @ w0[name]
    known = prev.gamma[:, None] * hw0 + (prev.write * x) @ cw.writes[name]
    if p0 is not None:
      known = known + prev.carry[:, None] * (h @ p0[name])
    if w_init is not None:
      known = known + prev.init[:, None] * (h @ w_init[name])
    system = lr[:, None] * prev.decay * x
    pseudo[name] = -unit_lower_solve(system, lr[:, None] * known)
  return ChunkWrites(cw.keys, cw.writes, pseudo, w_init)


def _pick(a: tuple[ChunkWrites, Weights], b: tuple[ChunkWrites, Weights],
          mask: Array) -> tuple[ChunkWrites, Weights]:
  """``(writes, outputs)`` of ``a``, those of ``b`` for the tokens where ``mask [C]``."""
  pick = lambda x, y: {n: jnp.where(mask[:, None], y[n], x[n]) for n in x}
  (cw_a, out_a), (cw_b, out_b) = a, b
  return ChunkWrites(pick(cw_a.keys, cw_b.keys), pick(cw_a.writes, cw_b.writes)), pick(out_a,
                                                                                       out_b)


def _selected_writes(memory: Memory, objective: Objective, w_grad: Weights, k: Array, v: Array,
                     lr: Array, fresh=None, w_init=None, dgd=False
                     ) -> tuple[ChunkWrites, Weights]:
  """``_chunk_writes`` at ``w_grad``, or, for the tokens where ``fresh [C]``, at ``w_init`` (the
  first gradient chunk of a document: its gradient reference is the reset state)."""
  part = _chunk_writes(memory, objective, w_grad, k, v, lr, dgd)
  if fresh is None:
    return part
  cw, outputs = _pick(part, _chunk_writes(memory, objective, w_init, k, v, lr, dgd), fresh)
  return cw._replace(init=w_init), outputs


def _prepare_coefficients(log_decay: Array, momentum: Optional[Array], dgd: bool, read: str,
                          start=0, row_scale: Optional[Array] = None,
                          reset: Optional[Array] = None, live: Optional[Array] = None
                          ) -> tuple[ChunkCoefficients, Optional[ChunkCoefficients]]:
  """A chunk's coefficients of the state after each write, and (for DGD's system or a read
  before the write) of the state before each write; ``reset [C]``: document boundaries."""
  coef = chunk_coefficients(log_decay, momentum, start, dgd, row_scale, reset, live)
  return coef, previous_rows(coef, reset) if decay_term(dgd) or read == "before_write" else None


def _weights_at(w0: Weights, p0: Optional[Weights], cw: ChunkWrites, coef: ChunkCoefficients,
                row) -> tuple[Weights, Optional[Weights]]:
  """Memory and momentum after token ``row`` (int scalar, may be traced) of a chunk."""
  take = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, row, axis=0,
                                                                        keepdims=False)
  get = lambda tree, name: None if tree is None else tree[name]
  w = {name: chunk_end_weights(w0[name], cw.keys[name], cw.writes[name], take(coef.write),
                               take(coef.gamma), get(p0, name), take(coef.carry),
                               get(cw.pseudo, name), take(coef.decay), get(cw.init, name),
                               take(coef.init)) for name in w0}
  p = None if p0 is None else {
      name: chunk_end_weights(p0[name], cw.keys[name], cw.writes[name], take(coef.mom_write),
                              take(coef.mom_carry)) for name in p0}
  return w, p


def _chunk_read(memory: Memory, q: Array, coef: ChunkCoefficients, w0: Weights,
                p0: Optional[Weights], cw: ChunkWrites) -> Array:
  """Every token's read at the weights of ``coef``'s rows (the dual form); q ``[C, K]``."""
  get = lambda tree, name: None if tree is None else tree[name]

  def matmul(name, h):
    return chunk_matmul(h, w0[name], cw.keys[name], cw.writes[name], coef.write, coef.gamma,
                        get(p0, name), coef.carry, get(cw.pseudo, name), coef.decay,
                        get(cw.init, name), coef.init)

  return memory.forward(matmul, q)


def chunk_writes(memory: Memory, objective: Objective, w_grad: Weights, w0: Weights,
                 p0: Optional[Weights], chunk: tuple, dgd: bool, fresh=None,
                 w_init=None) -> ChunkWrites:
  """The writes of one prepared chunk ``(q, k, v, lr, coef, prev)`` (``_prepare_coefficients``):
  gradients at ``w_grad`` (at ``w_init`` where ``fresh``), the chunk's running state starting
  from ``w0``/``p0`` (and ``w_init`` at its resets)."""
  _, kc, vc, lrc, _, prev = chunk[:6]
  if decay_term(dgd):
    return _dgd_writes(memory, objective, w_grad, kc, vc, lrc, w0, p0, prev, fresh, w_init, dgd)
  cw = _selected_writes(memory, objective, w_grad, kc, vc, lrc, fresh, w_init, dgd)[0]
  return cw if w_init is None else cw._replace(init=w_init)


def chunk_read(memory: Memory, chunk: tuple, y: tuple, read: str) -> Array:
  """Every token's read of one prepared chunk, from ``y = (w0, p0, writes)``."""
  return _chunk_read(memory, chunk[0], chunk[5] if read == "before_write" else chunk[4], *y)


def chunk_update(memory: Memory, objective: Objective, w0: Weights, p0: Optional[Weights],
                 k: Array, v: Array, lr: Array, log_decay: Array, momentum: Optional[Array], *,
                 dgd: bool = False, read: str = "after_write", reset: Optional[Array] = None,
                 fresh: Optional[Array] = None, live: Optional[Array] = None,
                 w_init: Optional[Weights] = None):
  """One whole chunk of ``chunk_start_scan`` for one slice, its coefficients included.

  For callers that scan over chunks themselves (HOPE, whose keys and values come from memories
  written by the previous chunk). Gradients are taken at ``w0``. With document boundaries (a
  buffer chunk of ``chunk_start_scan_packed``'s layout): ``reset``, ``fresh``, ``live`` ``[C]``
  and the reset state ``w_init``, as there.

  Returns:
    ``((weights, momentum_state) after the chunk, reader)``: ``chunk_output(memory, q, reader)``
    gives the chunk's reads.
  """
  coef, prev = _prepare_coefficients(log_decay, momentum, dgd, read, reset=reset, live=live)
  cw = chunk_writes(memory, objective, w0, w0, p0, (None, k, v, lr, coef, prev), dgd, fresh,
                    w_init)
  state = _weights_at(w0, p0, cw, coef, k.shape[0] - 1)
  return state, (prev if read == "before_write" else coef, w0, p0, cw)


def chunk_output(memory: Memory, q: Array, reader: tuple) -> Array:
  """The reads ``[C, V]`` of a chunk at queries ``q [C, K]`` from ``chunk_update``'s reader."""
  return _chunk_read(memory, q, *reader)


def _positions(row_scale: Optional[Array], t: int, offset=0) -> Optional[Array]:
  """``row_scale [..., C]`` laid out over ``t`` tokens whose first is at position ``offset`` of
  its chunk: ``[..., t]`` (None passes through)."""
  if row_scale is None:
    return None
  return jnp.take(row_scale, (jnp.arange(t) + offset) % row_scale.shape[-1], axis=-1)


def chunk_start_scan(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                     lr: Array, log_decay: Array, momentum: Optional[Array], weights: Weights,
                     momentum_state: Optional[Weights], chunk_size: int, batch_ndim: int = 0,
                     dgd: bool = False, read: str = "after_write", params: Optional[dict] = None,
                     row_scale: Optional[Array] = None):
  """The parallel form of ``recurrent_scan(..., grad_chunk=chunk_size)`` (same arguments/returns).

  Within a chunk every gradient is taken at the chunk-start weights, so each per-token weight is
  ``ChunkCoefficients``-linear in the start weights, start momentum and per-token gradient
  factors; the read of token t (after its own write) runs the memory's forward pass with
  ``chunk_matmul`` for every layer. When the objective's gradient does not depend on the memory
  (``dot``), the result equals the online recurrence for every chunk size. With ``dgd`` every
  layer's decay term joins the writes (``_dgd_writes``); with ``row_scale`` (``[*batch, C]``)
  the writes are row-scaled (``ChunkCoefficients``). Returns ``(o, weights, momentum_state)``:
  chunks are aligned with the call (``chunk_start_scan_offset`` continues a chunk that an earlier
  call began).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, chunk_size)

  def prepare(chunk):  # gate coefficients do not depend on the state: all chunks at once
    qc, kc, vc, lrc, gc, mc, rc = chunk
    return (qc, kc, vc, lrc) + _prepare_coefficients(gc, mc, dgd, read, row_scale=rc)

  def body(carry, chunk, consts):  # sequential: only what the next chunk's state needs
    mem, (w0, p0) = bind(memory, consts[0]), carry
    cw = chunk_writes(mem, objective, w0, w0, p0, chunk, dgd)
    return _weights_at(w0, p0, cw, chunk[4], chunk[1].shape[0] - 1), (w0, p0, cw)

  def finish(chunk, y, consts):  # parallel over chunks: token t reads its own weights (dual form)
    return chunk_read(bind(memory, consts[0]), chunk, y, read)

  positions = _positions(row_scale, q.shape[batch_ndim])
  (weights, momentum_state), o = scan_chunks(body, (weights, momentum_state),
                                             (q, k, v, lr, log_decay, momentum, positions),
                                             chunk_size, prepare=prepare, finish=finish,
                                             batch_ndim=batch_ndim, consts=(params,))
  return o, weights, momentum_state


def chunk_start_scan_offset(memory: Memory, objective: Objective, q: Array, k: Array, v: Array,
                            lr: Array, log_decay: Array, momentum: Optional[Array],
                            weights: Weights, momentum_state: Optional[Weights],
                            chunk_start: Weights, offset, chunk_size: int, batch_ndim: int = 0,
                            dgd: bool = False, read: str = "after_write",
                            params: Optional[dict] = None, row_scale: Optional[Array] = None,
                            accumulated: Optional[Weights] = None):
  """``chunk_start_scan`` continuing a chunk: the first token is ``offset`` tokens into a chunk
  whose start weights (its gradient reference) are ``chunk_start``. ``offset`` may be traced.

  The sequence is placed ``offset`` slots into a buffer of whole chunks; the slots around it are
  placeholders that write nothing (lr 0, zero keys), decay nothing (g 0) and keep the momentum
  (η 1). The first chunk takes its gradients at ``chunk_start`` and receives the momentum at slot
  ``offset``; the final state is read at the last real token, not at the end of the buffer.
  Costs at most 2C − 1 extra slots. With ``row_scale`` the chunk's accumulated writes take the
  momentum's place (``ChunkCoefficients``): ``accumulated`` (None: zeros) enters the first chunk
  at slot ``offset``, and every later chunk starts from zero.

  Returns:
    ``(o, weights, momentum_state, chunk_start, offset, accumulated)`` after the last token: the
    last three are the state of the chunk the next token belongs to (``recurrent_scan``'s
    convention; ``accumulated`` None without ``row_scale``).
  """
  if (momentum is None) != (momentum_state is None):
    raise ValueError("momentum and momentum_state must both be given or both be None")
  check_read(read)
  check_row_scale(row_scale, momentum, dgd, chunk_size)
  c, t = chunk_size, q.shape[batch_ndim]
  n = -(-(t + c - 1) // c)
  scaled = row_scale is not None
  if scaled:  # the accumulated writes ride in the momentum's slot (there is no momentum)
    momentum_state = jax.tree.map(jnp.zeros_like, weights) if accumulated is None else accumulated

  def place(x, fill):
    if x is None:
      return None
    buffer = jnp.full(x.shape[:batch_ndim] + (n * c,) + x.shape[batch_ndim + 1:], fill, x.dtype)
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=batch_ndim)
    buffer = buffer.reshape(x.shape[:batch_ndim] + (n, c) + x.shape[batch_ndim + 1:])
    return jnp.moveaxis(buffer, batch_ndim, 0)  # [N, *batch, C, ...]

  # The buffer's chunks are the sequence's: slot s of every chunk is position s.
  positions = None if not scaled else jnp.broadcast_to(row_scale, (n,) + row_scale.shape)
  xs = (place(q, 0), place(k, 0), place(v, 0), place(lr, 0), place(log_decay, 0),
        place(momentum, 1), positions)

  def prepare(start, chunk):
    qc, kc, vc, lrc, gc, mc, rc = chunk
    return (qc, kc, vc, lrc) + _prepare_coefficients(gc, mc, dgd, read, start, rc)

  last = offset + t - 1  # the final state: after the last real token, row last % c of its chunk
  batch_shape = q.shape[:batch_ndim]
  first = jnp.broadcast_to((jnp.arange(n) == 0).reshape((n,) + (1,) * batch_ndim),
                           (n,) + batch_shape)  # [N, *batch]: the chunk that continues

  def body(carry, x, consts):
    mem, (w0, p0, ref), (is_first, chunk) = bind(memory, consts), carry, x
    w_grad = jax.tree.map(lambda a, b: jnp.where(is_first, a, b), ref, w0)
    cw = chunk_writes(mem, objective, w_grad, w0, p0, chunk, dgd)
    at_last = _weights_at(w0, p0, cw, chunk[4], last % c)
    w1, p1 = _weights_at(w0, p0, cw, chunk[4], c - 1)
    if scaled:  # a new chunk accumulates from zero
      p1 = jax.tree.map(jnp.zeros_like, p1)
    return (w1, p1, ref), ((w0, p0, cw), at_last)

  # Momentum arrives at slot `offset` of the first chunk (slot 0 of the others). One scan over
  # all chunks, the first selected by a mask: peeling the first chunk off before the scan gave
  # wrong gradients under jit (batched, jaxlib 0.10.2 CPU), right ones eagerly.
  starts = jnp.where(jnp.arange(n) == 0, offset, 0)
  chunks = jax.vmap(lambda start, ch: batched(lambda x: prepare(start, x), batch_ndim)(ch))(
      starts, xs)
  step = batched(body, batch_ndim)
  _, (ys, at_last) = jax.lax.scan(lambda carry, x: step(carry, x, params),
                                  (weights, momentum_state, chunk_start), (first, chunks))
  read_chunk = batched(lambda ch, y, cs: chunk_read(bind(memory, cs), ch, y, read), batch_ndim)
  o = jax.vmap(read_chunk, in_axes=(0, 0, None))(chunks, ys, params)
  o = jnp.moveaxis(o, 0, batch_ndim)
  o = o.reshape(o.shape[:batch_ndim] + (n * c,) + o.shape[batch_ndim + 2:])
  o = jax.lax.dynamic_slice_in_dim(o, offset, t, axis=batch_ndim)

  pick = lambda tree: jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, last // c, axis=0, keepdims=False), tree)
  weights, momentum_state = pick(at_last)
  w0 = pick(ys[0])
  new_offset = (offset + t) % c
  # The next token's chunk: a new one, the first (whose start weights are chunk_start), or w0.
  ref = jax.tree.map(lambda a, b: jnp.where(last // c == 0, a, b), chunk_start, w0)
  chunk_start = jax.tree.map(lambda a, b: jnp.where(new_offset == 0, a, b), weights, ref)
  accumulated = None
  if scaled:
    accumulated = jax.tree.map(lambda x: jnp.where(new_offset == 0, 0, x), momentum_state)
    momentum_state = None
  return o, weights, momentum_state, chunk_start, new_offset, accumulated
