"""Titans' neural memory: gradient descent with momentum and decay, gradients at the chunk start.

``titans_memory`` writes any memory (``"linear"``, ``"mlp"``, TTT's inner models) by a gradient
step on ``½‖M(k) − v‖²`` taken at the state at the start of the token's chunk (Titans LMM,
TTT-Linear/TTT-MLP with ``position_scale``). Its three forms (``impl``):

* reference, token by token: ``nlx/memory/recurrent.py::recurrent_scan`` with
  ``grad_chunk=chunk_size`` (``impl="recurrent"``);
* chunked: the chunk-start dual form, ``nlx/memory/chunk_start.py::chunk_start_scan`` (chunks
  aligned with the call) and ``chunk_start_scan_offset`` (a call that continues a chunk an
  earlier call began);
* kernel: ``pallas_kernels/chunked_memory`` with kind ``"titans"`` (linear memory only;
  ``_titans_pallas`` below splits a call into the whole chunks the kernels take, and
  ``_titans_pallas_packed`` runs a packed batch, with ``reset``, in ``document_slots``' buffer).

``gradient_memory`` is the body shared with ``nlx.ops.dgd`` (``dgd_memory`` is this op plus
DGD's decay term): validation, dispatch and layout, and the ``TitansState`` that lets a sequence
split anywhere across calls equal one call.
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from nlx.memory import core
from nlx.memory.linear import LinearMemory
from nlx.memory.objectives import DOT, L2, Objective
from nlx.ops.common import compute_dtype, heads_first, resolve_impl
from nlx.ops.validation import (check_continuation, check_gate, check_memory_params,
                                check_memory_state, check_options, check_position_scale,
                                check_reset, check_reset_state, check_sequences, check_state,
                                resolve_memory)
from pallas_kernels.chunked_memory import ops as pallas_ops

Array = jax.Array
# ``_titans_pallas_packed``: the kernels' buffer has T + T/PACKED_SLACK slots (in whole chunks)
# when a packed batch's layout fits, else the worst layout's (about 2T); 0: always the latter.
PACKED_SLACK = 4

RATES = ("plain", "normalized", "gram")  # titans_memory's ``rate``


class TitansState(NamedTuple):
  """State of ``titans_memory``: the memory weights and, with momentum, the momentum (surprise).

  ``memory`` is ``[B, H, K, V]`` for the linear memory, or ``{"w2": [B, H, K, hidden],
  "w1": [B, H, hidden, V]}`` for the MLP memory; ``momentum`` has the same structure, or is None.

  ``chunk_start`` and ``offset`` say where the next token falls in its gradient chunk: ``offset``
  tokens of it (int, 0 ≤ offset < chunk_size; may be a traced int32 scalar) were written by an
  earlier call, whose start weights (the chunk's gradient reference) are ``chunk_start`` (same
  structure as ``memory``). ``titans_memory`` returns them, so a sequence split anywhere across
  calls (prefill, then token-by-token decoding) equals one call. None means a chunk starts now.

  ``accumulated`` (only with ``titans_memory``'s ``position_scale``): the chunk in progress's
  writes summed before the position scale (``A`` of ``nlx.memory.core``; same structure as
  ``memory``; zeros when a chunk starts now). The weights of a position-scaled chunk are not a
  function of the previous weights alone, so continuing a chunk needs it. None otherwise.

  ``keys`` (only with ``titans_memory``'s ``rate="gram"``): ``[B, H, chunk_size, K]``, the keys
  of the chunk in progress (slot i its i-th token, zeros past ``offset``), on which the rates of
  the chunk's later tokens depend (``nlx.memory.rates``). None otherwise.
  """

  memory: Union[Array, dict]
  momentum: Optional[Union[Array, dict]] = None
  chunk_start: Optional[Union[Array, dict]] = None
  offset: Optional[Union[int, Array]] = None
  accumulated: Optional[Union[Array, dict]] = None
  keys: Optional[Array] = None


def titans_memory(q: Array, k: Array, v: Array, *, lr: Array, momentum: Optional[Array] = None,
                  g: Optional[Array] = None, memory: Union[str, core.Memory] = "linear",
                  initial_state=None, chunk_size: int = 64, read: str = "after_write",
                  impl: str = "auto", position_scale: Optional[Array] = None,
                  memory_params: Optional[dict] = None, reset: Optional[Array] = None,
                  reset_state=None, rate: str = "plain") -> tuple[Array, TitansState]:
  """Titans neural memory: gradient descent with momentum and decay on ``½‖M(k) − v‖²``.

  For token t in a chunk whose start state is ``M_c``: ``G_t = ∇ℓ(M_c; k_t, v_t)``,
  ``P_t = η_t P_{t−1} − lr_t G_t`` (η = 0 without momentum), ``M_t = exp(g_t) M_{t−1} + P_t``,
  ``o_t = M_t(q_t)``. Gradients at the chunk-start state are part of the model (as in Titans and
  TTT): the chunk size changes the result, the recurrent reference follows the same rule, and
  ``chunk_size=1`` is exact online gradient descent. TTT-Linear/TTT-MLP: no momentum, no decay,
  ``memory=TTTMemory(...)`` with its LayerNorm in ``memory_params`` and TTT's ``1/(i+1)``
  schedule in ``position_scale``; Titans LMM: momentum and decay. q is used as given (no scale).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; lr: ``[B, T, H]`` inner learning rate;
    momentum: ``[B, T, H]`` η in [0, 1] or None; g: ``[B, T, H]`` log-decay (≤ 0) or None.
    memory: "linear" (``M(x) = Sᵀx``), "mlp" (``MLPMemory()``: ``x + W1 σ(W2 x)``, K == V) or a
      ``Memory`` instance (e.g. ``nlx.memory.deep.TTTMemory``).
    initial_state: a ``TitansState``, or the memory alone (momentum then starts at zero).
      Linear: ``[B, H, K, V]`` (zeros if None). MLP: required (see ``MLPMemory.init_state``).
    chunk_size: the chunk of the chunk-start gradients (a modelling choice), aligned with the
      start of the sequence. Splitting a sequence across calls anywhere reproduces one call when
      each call gets the previous call's ``TitansState`` (which carries the chunk in progress).
    read: "after_write" (``o_t = M_t(q_t)``) or "before_write" (``o_t = M_{t−1}(q_t)``).
    impl: "auto" | "chunked" (dual form) | "recurrent" | "pallas".
    position_scale: ``[chunk_size]`` ``c`` or None (``c ≡ 1``): TTT's schedule inside a chunk.
      Without momentum only. The token at position i of its chunk (i = 0..C−1; a final partial
      chunk of r tokens uses ``c_0..c_{r−1}``) reads ``M_t = γ_t M_c + c_i Σ_{j≤t} (γ_t/γ_j) U_j``
      with ``U_j = −lr_j G_j`` and γ the decay since the chunk start ``M_c``; the chunk's last
      token's weights are the next chunk's start. ``c_i = 1/(i+1)`` (TTT: ``token_idx``) steps by
      the mean of the chunk's gradients so far. Differentiable (TTT learns an offset on it).
      The returned state carries the chunk's accumulated writes (``TitansState.accumulated``).
    memory_params: the memory's fixed (not written) parameters, per head, shared by the batch:
      ``{name: [H, *shape]}`` for ``memory.param_shapes`` (``TTTMemory``: the LayerNorm's
      ``scale`` and ``shift``, ``[H, V]``), or None for memories without any. Differentiable.
    reset: ``[B, T]`` bool (or 0/1 integer) or None: document boundaries of a packed batch.
      Where ``reset[b, t]``, row b's memory is set to ``reset_state`` and its momentum (and
      accumulated writes) to zero before token t's decay and write, and a gradient chunk starts
      at token t: each document's chunks are aligned with its first token, so each document runs
      exactly as if alone from ``reset_state`` (a reset at t = 0 discards ``initial_state``).
      The returned ``TitansState.offset`` is then ``[B]`` (the rows' chunks differ). Forms:
      recurrent, and chunked (``nlx/memory/packed.py::chunk_start_scan_packed``: as many
      chunks as without boundaries, each taking its gradients twice, since a document's gradient
      chunk may straddle two of them; with ``position_scale``, ``read="after_write"`` only:
      "auto" and "chunked" run the recurrent form for "before_write"); the kernels for the
      linear memory read after the write, in a call that starts a chunk
      (``_titans_pallas_packed``).
    reset_state: the memory a reset restores, shaped like ``initial_state``'s memory (the model's
      learned initial memory); None: zeros (linear memory only).
    rate: ``"plain"`` (the equation above) or ``"normalized"``: each layer l of the memory steps
      at ``lr_t / max(1, ‖h_l‖²)``, ``h_l`` its input at the gradient's reference state (the key
      itself for a linear memory and an MLP's first layer, unit-norm in nlx's models: their
      rate is unchanged). With gradients at one state per chunk, an MLP memory's hidden layer,
      whose input grows with the weights, can otherwise step far beyond the chunk bound of
      unit-norm keys and diverge (docs/RELIABILITY.md); not in the Titans paper.
      ``"gram"``: token t's rate is ``lr_t / max(1, Σ_j |k_t · k_j|)`` over the keys j ≤ t of
      its gradient chunk (``nlx.memory.rates``: distinct keys keep their full rate, C equal keys
      step ``lr·H_C`` in all, so the chunk bound is ``0.5 / H_C`` instead of ``0.5 / C``), and
      an MLP memory's layers then step as with ``"normalized"``. No gradient flows through the
      sum. The returned state carries the chunk in progress's keys (``TitansState.keys``), which
      a call that continues a chunk needs. Not in the Titans paper.

  Returns:
    ``(o [B, T, H, V], TitansState)``.
  """
  if rate not in RATES:
    raise ValueError(f"rate={rate!r} is not one of {RATES}")
  keys = initial_state.keys if isinstance(initial_state, TitansState) else None
  if rate == "gram":
    return _gram(q, k, v, lr, momentum, g, memory, initial_state, chunk_size, read, impl,
                 position_scale, memory_params, reset, reset_state)
  if keys is not None:
    raise ValueError("initial_state.keys is given but rate is not 'gram'; it belongs to a "
                     "rate='gram' call (pass the same rate)")
  dgd = False
  if rate == "normalized":
    if isinstance(resolve_memory(memory), LinearMemory):  # h = k: a per-token rate
      b, t, h, _, _ = check_sequences(q, k, v)
      check_gate("lr", lr, b, t, h, required=True)
      norm = jnp.sum(jnp.square(k.astype(jnp.promote_types(k.dtype, jnp.float32))), axis=-1)
      lr = (lr / jnp.maximum(1.0, norm)).astype(lr.dtype)
    else:
      dgd = "normalized"
  return gradient_memory(q, k, v, lr, momentum, g, memory, L2, initial_state, chunk_size, read,
                         impl, dgd=dgd, kernel=_titans_pallas, position_scale=position_scale,
                         memory_params=memory_params, reset=reset, reset_state=reset_state,
                         packed_kernel=_titans_pallas_packed)


def _gram(q, k, v, lr, momentum, g, memory, initial_state, chunk_size, read, impl,
          position_scale, memory_params, reset, reset_state):
  """``titans_memory(rate="gram")``: the gram rates (``nlx.memory.rates``), then the plain
  (linear) or normalised (MLP) step, with the chunk in progress's keys in the state."""
  b, t, h, dk, _ = check_sequences(q, k, v)
  check_gate("lr", lr, b, t, h, required=True)
  check_options(chunk_size, impl)
  check_reset(reset, b, t)
  state = initial_state if isinstance(initial_state, TitansState) else TitansState(initial_state)
  offset, keys = state.offset, state.keys
  if isinstance(offset, numbers.Integral) and offset == 0:
    offset = None
  if offset is not None and keys is None:
    raise ValueError("rate='gram' continues a chunk (initial_state.offset is given) but "
                     "initial_state.keys is None: pass the TitansState that the previous "
                     "rate='gram' call returned")
  if keys is not None:
    check_state("initial_state.keys", keys, (b, h, chunk_size, dk))
  lr, keys = core.gram_rates(lr, k, chunk_size, offset, keys, reset)
  linear = isinstance(resolve_memory(memory), LinearMemory)
  o, state = titans_memory(q, k, v, lr=lr, momentum=momentum, g=g, memory=memory,
                           initial_state=state._replace(keys=None), chunk_size=chunk_size,
                           read=read, impl=impl, position_scale=position_scale,
                           memory_params=memory_params, reset=reset, reset_state=reset_state,
                           rate="plain" if linear else "normalized")
  return o, state._replace(keys=keys)


def _titans_pallas(q, k, v, lr, momentum, g, state, offset, chunk_size):
  """``titans_memory`` on the kernels, which take whole chunks aligned with their call.

  A chunk in progress (static ``offset``) is finished by the XLA form; whole chunks run on the
  kernel; a final partial chunk runs as a second kernel call, so that the state at its start
  (the returned ``chunk_start``) is known.
  """
  t = q.shape[1]
  piece = lambda x, a, b: None if x is None else x[:, a:b]
  call = lambda a, b, st, impl: titans_memory(
      piece(q, a, b), piece(k, a, b), piece(v, a, b), lr=piece(lr, a, b),
      momentum=piece(momentum, a, b), g=piece(g, a, b), initial_state=st,
      chunk_size=chunk_size, impl=impl)
  if offset:  # finish the chunk in progress, then continue on the kernel
    head = min(chunk_size - offset, t)
    o1, state = call(0, head, state, "chunked")
    if head == t:
      return o1, state
    o2, state = call(head, t, state, "pallas")
    return jnp.concatenate([o1, o2], axis=1), state
  whole = t - t % chunk_size
  if whole not in (0, t):
    o1, state = call(0, whole, state, "pallas")
    o2, state = call(whole, t, state, "pallas")
    return jnp.concatenate([o1, o2], axis=1), state
  weights, mom = (state.memory, state.momentum) if isinstance(state, TitansState) else (state,
                                                                                       None)
  o, w, p = pallas_ops.chunked_memory("titans", q, k, v, beta=lr, g=g, momentum=momentum,
                                      initial_state=weights, initial_momentum=mom,
                                      chunk_size=chunk_size)
  if whole == t:
    return o, TitansState(w, p, w, 0)
  start = jnp.zeros_like(w) if weights is None else weights.astype(w.dtype)
  return o, TitansState(w, p, start, t)


def _segment_log_decay(g: Array, reset: Array) -> Array:
  """``ζ [B, T, H]``: ``ζ_t = exp(Σ_{r≤l≤t} g_l)`` from the last reset ``r ≤ t``, zero before
  the first (a segmented cumulative sum, no differences of long sums)."""
  flags = jnp.broadcast_to(reset[:, :, None], g.shape)

  def combine(a, b):
    (x1, f1), (x2, f2) = a, b
    return jnp.where(f2, x2, x1 + x2), f1 | f2

  total, seen = jax.lax.associative_scan(combine, (g, flags), axis=1)
  return jnp.where(seen, jnp.exp(jnp.where(seen, total, 0.0)), 0.0)


def _titans_pallas_packed(q, k, v, lr, momentum, g, weights, mom, reset, reset_state,
                          chunk_size):
  """``titans_memory`` with ``reset`` on the kernels, in a call that starts a chunk.

  A document's gradient chunks are aligned with its first token, the kernels' chunks with the
  call. ``core.document_slots`` places the tokens in a buffer where every later gradient chunk
  of a document starts a kernel chunk (placeholders, ``live`` false, fill the gaps) and a
  document's first one, which may straddle two kernel chunks, is marked ``fresh``. The kernels
  restart from zero at a reset; the reset state ``S₀`` enters linearly: the state is
  ``S̃_t + ζ_t S₀`` with ``ζ_t`` the decay since the last reset (zero before one), so the kernel
  carries ``S̃`` with values ``v − ρ_t k_t S₀`` (``ρ_t``: ``ζ`` at the token's gradient
  reference: 1 when fresh, else ``ζ`` just before its gradient chunk), and ``ζ_t q_t S₀`` is
  added to the outputs. The returned ``chunk_start`` (the gradient reference of the last
  token's chunk) of a stale chunk comes from a second forward call that stops where that chunk
  starts (its buffer chunk's start); XLA drops it when the state is not used. The buffer has
  T + T/4 slots (rounded to chunks) when the batch's layout fits, else the worst case's.
  """
  b, t, h, _ = q.shape
  c = chunk_size
  reset = jnp.asarray(reset).astype(bool)
  f32 = jnp.float32
  log_decay = jnp.zeros((b, t, h), f32) if g is None else g.astype(f32)
  zeta = _segment_log_decay(log_decay, reset)  # [B, T, H]
  slots, positions, fresh = core.batched(lambda r: core.document_slots(r, 0, c), 1)(reset)
  first = jnp.arange(t)[None, :] - positions  # each token's gradient chunk's first token
  before = jnp.take_along_axis(zeta, jnp.maximum(first - 1, 0)[..., None], axis=1)
  rho = jnp.where(fresh[..., None], 1.0, jnp.where((first > 0)[..., None], before, 0.0))
  v_in = v
  if reset_state is not None:
    s0 = reset_state.astype(f32)
    v_in = (v.astype(f32) - rho[..., None] * jnp.einsum("bthk,bhkv->bthv", k.astype(f32), s0)
            ).astype(v.dtype)
  stop = (slots[:, -1] // c) * c  # the last token's buffer chunk: its gradient chunk's start

  def kernels(small):
    """The buffer (``small``: ``core.small_buffer_chunks``') through the kernels: ``(o, memory,
    momentum, the memory at ``stop``)``."""
    size = (core.small_buffer_chunks(t, c, PACKED_SLACK) if small else
            core.buffer_chunks(t, c)) * c
    place = lambda x, fill=0: None if x is None else jax.vmap(
        lambda xs, ss: core.place_at_slots(xs, ss, size, fill))(x, slots)
    live = place(jnp.ones((b, t), bool), False)
    inputs = dict(q=place(q), k=place(k), v=place(v_in))
    gates = dict(beta=place(lr), g=place(g), momentum=place(momentum))
    run = lambda live_: pallas_ops.chunked_memory(
        "titans", **inputs, **gates, initial_state=weights, initial_momentum=mom, chunk_size=c,
        reset=place(reset, False), fresh=place(fresh, False), live=live_)
    o, w, p = run(live)
    _, cut, _ = run(live & (jnp.arange(size)[None, :] < stop[:, None]))
    return jax.vmap(lambda ob, sb: ob[sb])(o, slots), w, p, cut

  # The buffer is sized for the worst layout (documents of C + 1 tokens: about 2T slots); most
  # layouts (documents much longer than a chunk) need a quarter more slots at most, so a buffer
  # of that size runs instead when the batch fits in it (both compiled, one run).
  o, w, p, cut = core.with_small_buffer(reset, (c,), kernels, PACKED_SLACK)
  last_first = first[:, -1]
  zeta_before = jnp.where((last_first > 0)[:, None], jnp.take_along_axis(
      zeta, jnp.maximum(last_first - 1, 0)[:, None, None], axis=1)[:, 0], 0.0)  # [B, H]
  if reset_state is not None:
    o = (o.astype(f32) + zeta[..., None] * jnp.einsum("bthk,bhkv->bthv", q.astype(f32), s0)
         ).astype(o.dtype)
    w = w + zeta[:, -1, :, None, None] * s0
    cut = cut + zeta_before[..., None, None] * s0
  reset_w = jnp.zeros_like(w) if reset_state is None else s0
  start = jnp.where(fresh[:, -1, None, None, None], reset_w, cut)
  offset = ((positions[:, -1] + 1) % c).astype(jnp.int32)
  return o, TitansState(w, p, start, offset)


def gradient_memory(q, k, v, lr, momentum, g, memory, objective: Objective, initial_state,
                    chunk_size: int, read: str, impl: str, *, dgd, kernel: Callable,
                    position_scale=None, memory_params=None, reset=None,
                    reset_state=None, packed_kernel: Optional[Callable] = None
                    ) -> tuple[Array, TitansState]:
  """The body of ``titans_memory`` and ``dgd_memory``: validation, dispatch, layout.

  ``dgd``: False (Titans), "normalized" (Titans at normalised rates), True or "proximal" (DGD;
  each layer's rate: ``core.layer_rates``).
  ``kernel``: the op's ``impl="pallas"`` path, ``(q, k, v, lr, momentum, g, initial_state,
  offset, chunk_size) -> (o, TitansState)`` (``offset``: None when a chunk starts now);
  ``packed_kernel``: the same with ``reset``, ``(q, k, v, lr, momentum, g, weights,
  momentum_state, reset, reset_state, chunk_size)`` (None: the kernels take no boundaries).
  """
  b, t, h, dk, dv = check_sequences(q, k, v)
  check_gate("lr", lr, b, t, h, required=True)
  check_gate("momentum", momentum, b, t, h, required=False)
  check_gate("g", g, b, t, h, required=False)
  impl = check_options(chunk_size, impl)
  core.check_read(read)
  mem = resolve_memory(memory)
  check_position_scale(position_scale, chunk_size, momentum, dgd)
  parts = (tuple(initial_state)[:5] if isinstance(initial_state, TitansState)
           else (initial_state, None, None, None, None))
  weights, mom, start, offset, acc = check_memory_state(mem, parts, b, h, dk, dv, chunk_size)
  check_memory_params(mem, memory_params, h, dk, dv,
                      0 if weights is None else mem.hidden_dim(weights))
  start, offset, acc = check_continuation(momentum, position_scale, mom, start, offset, acc)
  check_reset(reset, b, t)
  w_reset = check_reset_state(mem, reset, reset_state, weights, b, h, dk, dv)
  per_row = getattr(offset, "shape", ()) == (b,)  # rows continue different chunks
  reason = None
  if per_row:
    reason = ("the titans/DGD kernels do not implement rows that continue different chunks "
              "(initial_state.offset [B])")
  elif position_scale is not None:
    reason = "the kernels do not implement position_scale"
  elif not isinstance(mem, LinearMemory):
    reason = "the kernels implement linear memories only"
  elif read != "after_write":
    reason = "the kernels read after the write only"
  elif core.decay_term(dgd) and (objective is not DOT or momentum is not None):
    reason = ("the kernels implement DGD only as the gated delta rule (objective='dot', a linear "
              "memory, no momentum)")
  elif offset is not None and not isinstance(offset, numbers.Integral):
    reason = ("initial_state.offset is a traced array; the kernels need to know statically how "
              "many tokens finish the chunk in progress")
  elif reset is not None and offset:
    reason = ("the kernels take reset (document boundaries) only in a call that starts a chunk "
              "(initial_state.offset 0 or None)")
  elif reset is not None and core.decay_term(dgd) and w_reset is not None:
    reason = ("the DGD kernels (the delta rule's) restart from zero at a reset: reset_state must "
              "be None")
  if (reset is not None and position_scale is not None and read != "after_write" and
      impl != "pallas"):
    impl = "recurrent"  # the position-scaled packed chunked form reads after the write only
  impl = resolve_impl(impl, "delta_rule" if core.decay_term(dgd) else "titans", q, k, v,
                      chunk_size, reason)
  if impl == "pallas" and reset is not None:
    linear = lambda x: None if x is None else x["w"]
    return packed_kernel(q, k, v, lr, momentum, g, linear(weights), linear(mom), reset,
                         linear(w_reset), chunk_size)
  if impl == "pallas":
    return kernel(q, k, v, lr, momentum, g, initial_state, offset, chunk_size)

  cdt = compute_dtype(q.dtype)
  cast = lambda x: None if x is None else jnp.asarray(x, cdt)
  castt = lambda tree: None if tree is None else jax.tree.map(cast, tree)
  if weights is None:
    weights = {"w": jnp.zeros((b, h, dk, dv), cdt)}
  weights = castt(weights)
  if momentum is not None and mom is None:
    mom = jax.tree.map(jnp.zeros_like, weights)
  mom = castt(mom) if momentum is not None else None
  start, acc = castt(start), castt(acc)
  gates = [None if x is None else jnp.moveaxis(cast(x), 2, 1) for x in (lr, g, momentum)]
  lr_, g_, m_ = gates
  if g_ is None:
    g_ = jnp.zeros_like(lr_)
  per_slice = lambda x: jnp.broadcast_to(cast(x), (b,) + x.shape)  # [H, ...] -> [B, H, ...]
  params = None if memory_params is None else jax.tree.map(per_slice, memory_params)
  scale = None if position_scale is None else jnp.broadcast_to(cast(position_scale),
                                                               (b, h, chunk_size))

  seqs = [heads_first(cast(x)) for x in (q, k, v)]
  args = (mem, objective, *seqs, lr_, g_, m_, weights, mom)
  options = dict(batch_ndim=2, dgd=dgd, read=read, params=params, row_scale=scale)
  aligned = offset is None and t % chunk_size == 0
  if reset is not None or (per_row and impl == "recurrent"):
    rows = (None if reset is None else
            jnp.broadcast_to(jnp.asarray(reset).astype(bool)[:, None, :], (b, h, t)))
    w_reset = (jax.tree.map(jnp.zeros_like, weights) if w_reset is None else
               castt(w_reset))
    offsets = jnp.broadcast_to(jnp.asarray(0 if offset is None else offset, jnp.int32).reshape(
        (-1, 1)), (b, h))
    if start is None:
      start = weights
    if impl == "recurrent":
      if rows is None:
        rows = jnp.zeros((b, h, t), bool)
      o, w, p, start, acc = core.recurrent_scan(*args, grad_chunk=chunk_size, offset=offsets,
                                                chunk_start=start, accumulated=acc, reset=rows,
                                                reset_weights=w_reset, **options)
      positions = core.batched(lambda r, o_: core.chunk_positions(r, o_, chunk_size), 2)(
          rows, offsets)
      offset = ((positions[..., -1] + 1) % chunk_size).astype(jnp.int32)
    else:
      # A call that starts a chunk (no state) has a static offset 0: the smallest buffer.
      o, w, p, start, offset = core.chunk_start_scan_packed(
          *args, start, 0 if offset is None else offsets, chunk_size, rows, w_reset,
          batch_ndim=2, dgd=dgd, read=read, params=params, row_scale=scale, accumulated=acc)
      if scale is not None:  # the accumulated writes rode in the momentum's place
        p, acc = None, p
    offset = offset[:, 0]
  elif impl == "recurrent":
    o, w, p, start, acc = core.recurrent_scan(*args, grad_chunk=chunk_size,
                                              offset=0 if offset is None else offset,
                                              chunk_start=start, accumulated=acc, **options)
    offset = ((0 if offset is None else offset) + t) % chunk_size
  elif aligned:  # the fast path: chunks aligned with the call, whole chunks
    o, w, p = core.chunk_start_scan(*args, chunk_size, **options)
    start, offset = w, 0
    acc = None if scale is None else jax.tree.map(jnp.zeros_like, w)
  elif per_row:  # rows continue different chunks: the offset form row by row
    def row(q1, k1, v1, lr1, g1, m1, w1, p1, s1, off, a1, params1, scale1):
      return core.chunk_start_scan_offset(mem, objective, q1, k1, v1, lr1, g1, m1, w1, p1, s1,
                                          off, chunk_size, batch_ndim=1, dgd=dgd, read=read,
                                          params=params1, row_scale=scale1, accumulated=a1)
    o, w, p, start, offset, acc = jax.vmap(row)(*seqs, lr_, g_, m_, weights, mom, start, offset,
                                                acc, params, scale)
  else:
    o, w, p, start, offset, acc = core.chunk_start_scan_offset(
        *args, weights if start is None else start, 0 if offset is None else offset, chunk_size,
        accumulated=acc, **options)
  if isinstance(mem, LinearMemory):
    w, p, start, acc = (None if x is None else x["w"] for x in (w, p, start, acc))
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), TitansState(w, p, start, offset, acc)
