"""HOPE: self-modifying Titans followed by the Continuum Memory System; and Hope-attention.

Self-modifying Titans (docs/EQUATIONS.md §4, Eqs. 83–93). Per head, memories ``M_□`` (□ ∈ {k, v,
η, α} and, with ``hope_adaptive_q``, q) generate the inputs of the write, and the output memory
``M_mem`` is written and read:

    k_t = M_k(x^k_t)   v_t = M_v(x^v_t)   q_t = x^q_t            (x^□ = SiLU(conv(x W_□)), as in
    η_t = η_max · sigmoid(mean M_η(x^k_t) + b_η)                 Titans; q, k L2-normalised)
    α_t = sigmoid(mean M_α(x^k_t) + b_α)
    v̂_□ = M_□(v_t)       (each memory makes its own target, □ ∈ {k, v, η, α, mem};
                          v_t L2-normalised too, `hope_normalize_v`: see ModelConfig)
    M_□ ← M_□ (α_t I − η_t k_t k_tᵀ) − η_t ∇ ½‖M_□(k_t) − v̂_□‖²   (DGD with weight decay, Eq. 88)
    y_t = M_mem(q_t)      (after token t's write; ``hope_read="before_write"``: before it)

with Titans-style momentum on the write (``hope_momentum``: momentum gate m_t, the write's rate
then η_t(1 − m_t), an average of the writes, as in ``nlx.nn.neural_memory``) and everything
chunk-wise: within a chunk of ``hope_chunk_size`` tokens every k, v, η, α, v̂ comes from the
memories' state at the end of the previous chunk, and every gradient is taken there (Eqs. 90–91).
``memory_chunk_size`` is the output memory's chunk: its gradients and its own targets v̂_mem come
from the state at the start of each of its (sub-)chunks.

Every write is ``nlx.ops.dgd_memory``'s (``hope_dgd="off"``: ``titans_memory``'s) chunk step,
``nlx.memory.core.chunk_update``: on an MLP memory each layer's decay term takes the layer's own
input as key and touches only that layer (docs/EQUATIONS.md, choice 2); per chunk, the decay acts
on the running state and only the gradient term on the chunk-start state (Eq. 93). The rate is
DGD's proximal ``η/(1 + η‖h_l‖²)`` per layer (``hope_dgd="arxiv"``: ``η' = η/(1+η)`` for the
unit-norm key, bounded for the hidden layer's input; choice 1) or η ("neurips"), on both terms. All memories of a chunk
are written in one call, stacked on the head axis (they share the key k_t), inside one scan over
chunks whose body is rematerialised in the backward pass (only chunk-boundary states are kept).

The dot-product objective (``hope_objective="dot"``) on a linear memory is Eq. 92,
``M ← M(αI − η k kᵀ) + η v̂ kᵀ``, the gated delta rule with target v̂: without momentum, with
``S = Mᵀ`` (``[K, V]``, the ops' layout), ``nlx.ops.delta_rule(q, k, v=α·v̂, beta=η'/α, g=log α,
scale=1)`` (tests/nn/test_hope.py).

Stateful use: the state carries the conv state, every memory's weights (and momentum) at the
start of the chunk in progress, and the inputs of that chunk's tokens so far; a call runs them
again with its own tokens, so a sequence split anywhere across calls (prefill, then token-by-token
decoding) equals one call for every ``hope_chunk_size``.

Hope-attention (``hope_attention``): the softmax attention of Transformer++ followed by CMS.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.memory import DOT, L2, LINEAR, MLPMemory, core
from nlx.nn import hope_packed
from nlx.nn.attention import transformer
from nlx.nn.cms import CMS
from nlx.nn.config import ModelConfig
from nlx.nn.hope_packed import batch_major as _batch_major, place as _place
from nlx.nn.hope_packed import time_major as _time_major
from nlx.nn.mixer import Mixer
from nlx.nn.mlp import SwiGLU
from nlx.nn.norms import l2_normalize
from nlx.nn.params import Dense, normal, param
from nlx.nn.qkv import QKV, OutputGate
from nlx.nn.registry import register

Array = jax.Array


def read(memory: core.Memory, weights: dict, x: Array) -> Array:
  """``M(x)`` without a write: weights ``{name: [B, H, in, out]}``, x ``[B, T, H, K]``; computed in
  float32, or float64 for float64 inputs (a cast to float32 there rounds the cotangents of
  higher-order gradients, e.g. the CMS's ``next_token`` objective, to float32)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  apply = lambda w, xh: memory.apply(w, xh.astype(dtype))
  return jax.vmap(jax.vmap(apply, in_axes=(0, 1), out_axes=1))(weights, x).astype(x.dtype)


class HopeState(NamedTuple):
  """The stateful API's state: the memories at the start of the chunk in progress, and the
  mixer inputs of that chunk's first ``offset`` tokens (they are written again, from the
  chunk-start state, when the chunk continues)."""

  conv: Optional[Array]             # [B, W − 1, channels] or None without conv
  memories: ops.TitansState         # the k, v, (q), η, α memories, then the output memory,
                                    # stacked on the head axis ([B, (n + 1)·H, ...])
  pending: tuple                    # (q, k, v [B, C − 1, H, dk], momentum [B, C − 1, H] or None)
  offset: Array                     # [B] int32: tokens of each row's chunk in progress, 0 ≤ · < C


def check_hope(cfg: ModelConfig) -> None:
  """Refuses HOPE settings that the memories cannot take, naming the field."""
  cfg.require("hope", expand_v=(cfg.expand_v == 1, "HOPE's memories map head_dim -> head_dim "
                                "(v̂ = M(v)); use expand_v = 1"))
  cfg.require("hope", memory_chunk_size=(cfg.hope_chunk % cfg.memory_chunk_size == 0,
                                         f"must divide hope_chunk_size={cfg.hope_chunk}"))


def memory_init_params(rngs: nnx.Rngs, heads: int, dk: int, hidden: int) -> nnx.Dict:
  """Learned initial weights of ``heads`` memories: identity (linear, ``hidden == 0``) or a
  fan-in residual MLP. Stored with the head axis folded into the rows (``[heads·in, out]``,
  logical axis ``memory_rows``) so that FSDP shards them whatever the head count."""
  if hidden == 0:
    eye = lambda key, shape, dtype: jnp.tile(jnp.eye(dk, dtype=dtype), (heads, 1))
    return nnx.Dict(w=param(rngs, eye, (heads * dk, dk), ("memory_rows", "head_dim_v")))
  return nnx.Dict(
      w2=param(rngs, normal(dk**-0.5), (heads * dk, hidden), ("memory_rows", "memory_mlp")),
      w1=param(rngs, normal(hidden**-0.5), (heads * hidden, dk), ("memory_rows", "head_dim")))


def memory_init_weights(params: nnx.Dict, dk: int, hidden: int) -> dict:
  """``memory_init_params`` as ``{name: [heads, in, out]}``."""
  rows = {"w": dk, "w2": dk, "w1": hidden}
  return {name: w[...].reshape((-1, rows[name]) + w.shape[1:]) for name, w in params.items()}


def _heads_first(x: Optional[Array]) -> Optional[Array]:
  """``[B, C, H, ...] -> [B, H, C, ...]`` (None passes through)."""
  return None if x is None else jnp.moveaxis(x, 2, 1)


def _heads(tree, lo: int, hi: Optional[int] = None):
  """The memories ``lo:hi`` of stacked weights ``{name: [B, H', ...]}`` (None passes through)."""
  return None if tree is None else jax.tree.map(lambda x: x[:, lo:hi], tree)


# ``model.hope_dgd`` -> the core's ``dgd``: "arxiv" is DGD's proximal step per layer, rate
# η/(1 + η‖h_l‖²) (docs/EQUATIONS.md, choice 1); "neurips" the raw η; "off" no decay term.
_DGD = {"arxiv": "proximal", "neurips": True, "off": False}


class SelfModifyingTitans(Mixer):
  """HOPE's sequence mixer; see the module docstring. Uses the ``hope_*`` fields of ``cfg``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    check_hope(cfg)
    d, h, dk = cfg.d_model, cfg.n_heads, cfg.dk
    self.cfg, self.heads, self.dk = cfg, h, dk
    self.chunk = cfg.hope_chunk
    self.names = tuple(n for n, on in (("k", cfg.hope_adaptive_k), ("v", cfg.hope_adaptive_v),
                                       ("q", cfg.hope_adaptive_q), ("eta", True),
                                       ("alpha", cfg.hope_weight_decay)) if on)
    self.memory = LINEAR if cfg.hope_memory == "linear" else MLPMemory("silu")
    self.hidden = 0 if cfg.hope_memory == "linear" else cfg.memory_expand * dk
    self.qkv = QKV(d, h, dk, dk, cfg.conv_size, rngs=rngs)
    self.memories_init = memory_init_params(rngs, (len(self.names) + 1) * h, dk, self.hidden)
    # b_η, b_α: η ≈ 0.12 η_max and α ≈ 0.993 at the start (the gates of Titans).
    self.gate_bias = param(rngs, lambda key, shape, dtype: jnp.broadcast_to(
        jnp.asarray([-2.0, 5.0], dtype)[:, None], shape), (2, h), ("gates", "heads"))
    self.momentum_gate = (Dense((d,), (h,), ("embed", "heads"), rngs=rngs, use_bias=True)
                          if cfg.hope_momentum else None)
    self.out = OutputGate(d, h, dk, rngs=rngs, eps=cfg.norm_eps)

  def initial_weights(self) -> dict:
    """The learned initial weights of every memory, ``{name: [(n + 1)·H, in, out]}``: the
    components (k, v, (q), η, α; n·H heads), then the output memory (H heads)."""
    return memory_init_weights(self.memories_init, self.dk, self.hidden)

  def _initial(self, batch_size: int) -> tuple:
    """``(weights, momentum)`` of every memory, stacked: the components, then the output memory.
    Memory states are float32 (what nlx.ops returns), whatever the compute dtype of the params."""
    weights = {name: jnp.broadcast_to(w.astype(jnp.promote_types(w.dtype, jnp.float32)),
                                      (batch_size,) + w.shape)
               for name, w in self.initial_weights().items()}
    momentum = jax.tree.map(jnp.zeros_like, weights) if self.cfg.hope_momentum else None
    return weights, momentum

  def init_state(self, batch_size: int, max_len: int) -> HopeState:
    del max_len
    dtype = jax.tree.leaves(self.initial_weights())[0].dtype
    seq = jnp.zeros((batch_size, self.chunk - 1, self.heads, self.dk), dtype)
    momentum = (jnp.zeros((batch_size, self.chunk - 1, self.heads), dtype)
                if self.momentum_gate is not None else None)
    return HopeState(self.qkv.init_state(batch_size), ops.TitansState(*self._initial(batch_size)),
                     (seq, seq, seq, momentum), jnp.zeros((batch_size,), jnp.int32))

  # -- the write of a group of memories ---------------------------------------------------------

  def _rate(self, eta: Array) -> Array:
    """The rate given to the write: η. With ``hope_dgd="arxiv"`` the write gives each layer the
    proximal rate ``η/(1 + η‖h_l‖²)`` itself (``_DGD``; η/(1+η) for a unit-norm key)."""
    return eta

  def write(self, weights: dict, momentum_state: Optional[dict], k: Array, target: Array,
            lr: Array, log_alpha: Optional[Array], momentum: Optional[Array],
            flags: Optional[tuple] = None, w_init: Optional[dict] = None):
    """One chunk of DGD (``hope_dgd="off"``: GD) on stacked memories, gradients at ``weights``.

    Args:
      weights, momentum_state: ``{name: [B, H', in, out]}`` (momentum_state None: no momentum).
      k, target: ``[B, C, H', dk]``; lr (the rate, η' or η), log_alpha, momentum: ``[B, C, H']``
        (log_alpha, momentum may be None).
      flags: packed documents, ``(reset, fresh, live)`` each ``[B, C]`` of a buffer chunk
        (``_packed``), with ``w_init`` the memories' initial weights (``{name: [B, H', in,
        out]}``); None without documents.

    Returns:
      ``((weights, momentum_state) after the chunk, reader)``; ``self.output(q, reader)`` reads.
    """
    dtype = jax.tree.leaves(weights)[0].dtype
    cast = lambda x: None if x is None else _heads_first(x.astype(dtype))
    g = jnp.zeros_like(lr) if log_alpha is None else log_alpha
    objective = L2 if self.cfg.hope_objective == "l2" else DOT
    options = dict(dgd=_DGD[self.cfg.hope_dgd], read=self.cfg.hope_read)
    args = (weights, momentum_state, cast(k), cast(target), cast(lr), cast(g), cast(momentum))
    if flags is None:
      step = lambda w, p, kc, vc, lrc, gc, mc: core.chunk_update(
          self.memory, objective, w, p, kc, vc, lrc, gc, mc, **options)
      return core.batched(step, 2)(*args)
    heads = lr.shape[2]
    per_head = lambda f: jnp.broadcast_to(f[:, None, :], (f.shape[0], heads, f.shape[1]))
    step = lambda w, p, kc, vc, lrc, gc, mc, rc, fc, lc, wi: core.chunk_update(
        self.memory, objective, w, p, kc, vc, lrc, gc, mc, reset=rc, fresh=fc, live=lc,
        w_init=wi, **options)
    return core.batched(step, 2)(*args, *map(per_head, flags), w_init)

  def output(self, q: Array, reader: tuple) -> Array:
    """A chunk's reads ``[B, C, H', dk]`` at queries ``[B, C, H', dk]`` (``reader``: from write)."""
    dtype = jax.tree.leaves(reader[1])[0].dtype
    o = core.batched(lambda qc, r: core.chunk_output(self.memory, qc, r), 2)(
        _heads_first(q.astype(dtype)), reader)
    return jnp.moveaxis(o, 1, 2)

  # -- one chunk --------------------------------------------------------------------------------

  def _chunk(self, carry, inputs):
    """One chunk ``[B, C, ...]``: reads and targets at the chunk-start state, then the writes.

    With packed documents (``inputs`` end with the flags ``(reset, fresh, live)`` of a buffer
    chunk, ``_packed``), a token in its document's first chunk (``fresh``) reads, makes its
    targets and takes its gradients at the memories' initial weights, a reset restores them
    (and zero momentum), and a placeholder (not ``live``) writes nothing.
    """
    weights, mom = carry
    q, k, v, momentum = inputs[:4]
    flags = inputs[4:] or None
    n, h, c = len(self.names), self.heads, q.shape[1]
    comps = _heads(weights, 0, n * h)
    w_init = None if flags is None else self._initial(q.shape[0])[0]
    q, k, v, lr, log_alpha = self._derive(comps, q, k, v, momentum, _heads(w_init, 0, n * h),
                                          None if flags is None else flags[1])
    targets = lambda w, copies: self._targets(w, v, copies)
    tile = lambda x, n: None if x is None else jnp.tile(x, (1, 1, n) + (1,) * (x.ndim - 3))
    sub = self.cfg.memory_chunk_size
    if flags is not None:  # packed documents, memory_chunk_size == C: one write of every memory
      fresh, live = flags[1][:, :, None, None], flags[2][:, :, None]
      lr = jnp.where(live, lr, 0.0)
      log_alpha = None if log_alpha is None else jnp.where(live, log_alpha, 0.0)
      target = jnp.where(fresh, targets(w_init, n + 1), targets(weights, n + 1))
      (weights, mom), reader = self.write(weights, mom, tile(k, n + 1), target, tile(lr, n + 1),
                                          tile(log_alpha, n + 1), tile(momentum, n + 1), flags,
                                          w_init)
      return (weights, mom), self.output(q, jax.tree.map(lambda x: x[:, n * h:], reader))
    if c <= sub:  # every memory in one write (the default: memory_chunk_size == hope_chunk_size)
      (weights, mom), reader = self.write(weights, mom, tile(k, n + 1), targets(weights, n + 1),
                                          tile(lr, n + 1), tile(log_alpha, n + 1),
                                          tile(momentum, n + 1))
      return (weights, mom), self.output(q, jax.tree.map(lambda x: x[:, n * h:], reader))
    # The output memory in sub-chunks of its own, each with its own start state and targets.
    (w_c, p_c), _ = self.write(comps, _heads(mom, 0, n * h), tile(k, n), targets(comps, n),
                               tile(lr, n), tile(log_alpha, n), tile(momentum, n))
    w_m, p_m, outs = _heads(weights, n * h), _heads(mom, n * h), []
    for lo in range(0, c, sub):
      piece = lambda x: None if x is None else x[:, lo:lo + sub]
      (w_m, p_m), reader = self.write(w_m, p_m, piece(k), self._targets(w_m, piece(v), 1),
                                      piece(lr), piece(log_alpha), piece(momentum))
      outs.append(self.output(piece(q), reader))
    return (hope_packed.join(w_c, w_m), hope_packed.join(p_c, p_m)), jnp.concatenate(outs, 1)

  def _derive(self, comps: dict, q: Array, k: Array, v: Array, momentum: Optional[Array],
              init: Optional[dict] = None, fresh: Optional[Array] = None) -> tuple:
    """The writes' inputs ``(q, k, v, lr, log_alpha)`` of a chunk ``[B, C, ...]`` from the reads
    of the components (k, v, (q), η, α memories) at ``comps``, or at ``init`` where ``fresh``
    ``[B, C]`` (packed documents); lr and log_alpha ``[B, C, H]`` (log_alpha None: α = 1)."""
    streams = {"k": k, "v": v, "q": q, "eta": k, "alpha": k}
    inputs_cat = jnp.concatenate([streams[name] for name in self.names], 2)
    reads = read(self.memory, comps, inputs_cat)
    if fresh is not None:
      reads = jnp.where(fresh[:, :, None, None], read(self.memory, init, inputs_cat), reads)
    out = dict(zip(self.names, jnp.split(reads, len(self.names), axis=2)))
    k = l2_normalize(out["k"]) if "k" in out else k
    v = out.get("v", v)
    v = l2_normalize(v) if self.cfg.hope_normalize_v else v
    q = l2_normalize(out["q"]) if "q" in out else q
    bias = self.gate_bias[...]
    eta = self.cfg.hope_lr * jax.nn.sigmoid(out["eta"].mean(-1) + bias[0])
    if momentum is not None:  # an EMA of the writes: a chunk steps at most C·η_max (ModelConfig)
      eta = eta * (1.0 - momentum)
    log_alpha = (jax.nn.log_sigmoid(out["alpha"].mean(-1) + bias[1]) if "alpha" in out
                 else None)
    return q, k, v, self._rate(eta), log_alpha

  def _targets(self, weights: dict, v: Array, copies: int) -> Array:
    """Every memory's own targets ``v̂ = M(v)`` at ``weights`` (``copies`` memories per head);
    ``v`` itself with ``hope_targets="value"``."""
    v = jnp.tile(v, (1, 1, copies, 1))
    return self._stop(v if self.cfg.hope_targets == "value" else read(self.memory, weights, v))

  def _stop(self, targets: Array) -> Array:
    return jax.lax.stop_gradient(targets) if self.cfg.hope_stop_gradient else targets

  def __call__(self, x: Array, state: Optional[HopeState] = None, pos: Array | int = 0,
               segments=None) -> tuple[Array, Optional[HopeState]]:
    """``segments`` (packed documents): every memory, its momentum and the chunks (the output
    memory's sub-chunks too) restart at each document's first token (``_packed``, ``_continue``),
    as if the document ran alone."""
    del pos
    reset = None if segments is None else segments.reset
    q, k, v, conv = self.qkv(x, None if state is None else state.conv, reset=reset)
    momentum = (jax.nn.sigmoid(self.momentum_gate(x)) if self.momentum_gate is not None
                else None)
    if reset is not None and state is None:
      return self.out(self._packed((q, k, v, momentum), reset).astype(x.dtype), x), None
    if state is None:
      _, o = core.scan_chunks(self._chunk_time_major, self._initial(x.shape[0]),
                              tuple(map(_time_major, (q, k, v, momentum))), self.chunk)
      return self.out(_batch_major(o).astype(x.dtype), x), None
    o, state = self._continue(state._replace(conv=conv), (q, k, v, momentum), reset)
    return self.out(o.astype(x.dtype), x), state

  def _packed(self, inputs: tuple, reset: Array) -> Array:
    """A whole packed sequence: ``(q, k, v, momentum)`` and ``reset [B, T]`` -> ``o``.

    Each document's chunks of ``hope_chunk_size`` tokens are aligned with its first token, as if
    it ran alone: the tokens go into a buffer of whole chunks (``core.document_slots``, the
    layout of ``nlx.ops.titans_memory``'s packed form) whose chunks each start at the state the
    previous one left, and a document's first chunk (which may straddle two buffer chunks) runs
    from the initial memories (``_chunk``'s flags). With ``memory_chunk_size`` < C the output
    memory's sub-chunks are aligned with the first token too: ``nlx.nn.hope_packed`` (two passes,
    a buffer at each chunk size).
    """
    c = self.chunk
    b, t = reset.shape
    reset = jnp.asarray(reset).astype(bool)
    if self.cfg.memory_chunk_size < c:
      return hope_packed.documents(self, self._initial(b), inputs, reset,
                                   jnp.ones((b, t), bool))[0]
    slots, _, fresh = core.batched(lambda r: core.document_slots(r, 0, c), 1)(reset)
    n = core.buffer_chunks(t, c)

    place = lambda x, fill=0: _place(x, slots, n * c, fill)

    q, k, v, momentum = inputs
    xs = (place(q), place(k), place(v), place(momentum, 1), place(reset, False),
          place(fresh, False), place(jnp.ones((b, t), bool), False))
    # Skipped where no row has a token (the flags' last, ``live``): the buffer is sized for the
    # worst layout, and its chunks after every row's last token hold placeholders only.
    _, o = core.scan_chunks(hope_packed.skip_empty(self._chunk), self._initial(b),
                            tuple(map(_time_major, xs)), c)
    return jax.vmap(lambda os, ss: os[ss])(_batch_major(o), slots)

  def _continue(self, state: HopeState, inputs: tuple,
                reset: Optional[Array]) -> tuple[Array, HopeState]:
    """Continues the chunk in progress of ``state`` with ``inputs`` (q, k, v ``[B, T, H, dk]``,
    momentum ``[B, T, H]`` or None) and document boundaries ``reset [B, T]`` (or None):
    ``(o [B, T, H, dk], state)``. Rows may be at different offsets (``HopeState.offset [B]``).

    Per row, the pending tokens of the chunk in progress and the new ones run as one packed
    sequence from the chunk-start memories (``_packed``'s buffer, plus the memories at every
    buffer chunk's start; without boundaries the buffer needs no padding, at most 2C − 1 extra
    slots; with boundaries and ``memory_chunk_size`` < C, ``nlx.nn.hope_packed``'s two buffers);
    the new state is the chunk the next token falls in: its start memories (the initial ones
    when it is its document's first chunk) and its tokens so far.
    """
    c, (b, t) = self.chunk, inputs[0].shape[:2]
    r = jnp.broadcast_to(jnp.asarray(state.offset, jnp.int32), (b,))
    length = c - 1 + t
    new_reset = jnp.zeros((b, t), bool) if reset is None else jnp.asarray(reset).astype(bool)

    def combine(pending, new):  # per row: pending[:r], then new from slot r, zeros after
      if new is None:
        return None
      row = lambda p, x, rr: jax.lax.dynamic_update_slice_in_dim(
          jnp.concatenate([p.astype(x.dtype), jnp.zeros_like(x)], 0), x, rr, 0)
      return jax.vmap(row)(pending, new, r)

    seqs = tuple(map(combine, state.pending, inputs))
    index = jnp.arange(length)[None, :]
    live = index < (r + t)[:, None]
    rows_reset = combine(jnp.zeros((b, c - 1), bool), new_reset)
    slots, positions, fresh = core.batched(lambda x: core.document_slots(x, 0, c), 1)(rows_reset)

    last = r + t - 1
    at = lambda a: jnp.take_along_axis(a, last[:, None], 1)[:, 0]
    nxt = (at(positions) + 1) % c  # the next token's position in its chunk
    first = jnp.where(nxt == 0, last + 1, last - at(positions))  # its chunk's first token
    first_fresh = jnp.where(nxt == 0, False,
                            jnp.take_along_axis(fresh, jnp.minimum(first, length - 1)[:, None],
                                                1)[:, 0])
    slot_of = lambda s, i: jnp.take_along_axis(s, jnp.minimum(i, length - 1)[:, None], 1)[:, 0]
    # The buffer chunk (``size`` slots, tokens at ``s``) that starts where that chunk starts.
    chunk_of = lambda s, size: jnp.where(nxt == 0, slot_of(s, last) // size + 1,
                                         slot_of(s, first) // size)
    if reset is not None and self.cfg.memory_chunk_size < c:
      o, starts = hope_packed.documents(self, tuple(state.memories[:2]), seqs, rows_reset, live,
                                        1, chunk_of)
    else:
      # One chunk more than the tokens need: the state after the last token.
      n = (core.buffer_chunks(length, c) if reset is not None else -(-length // c)) + 1
      place = lambda x, fill=0: _place(x, slots, n * c, fill)
      q, k, v, momentum = seqs
      xs = (place(q), place(k), place(v), place(momentum, 1))
      if reset is not None:  # without boundaries every token continues the carried chunk
        xs += (place(rows_reset, False), place(fresh, False), place(live, False))
      chunks = jax.tree.map(
          lambda a: _time_major(a).reshape((n, c) + a.shape[:1] + a.shape[2:]), xs)

      def body(carry, chunk):
        new, o = self._chunk_time_major(carry, chunk)
        return new, (o, carry)

      _, (o, starts) = jax.lax.scan(body, tuple(state.memories[:2]), chunks)
      o = _batch_major(o.reshape((n * c,) + o.shape[2:]))
      o = jax.vmap(lambda os, ss: os[ss])(o, slots)
      starts = jax.tree.map(lambda a: jax.vmap(lambda x, i: x[i], in_axes=(1, 0))(a, chunk_of(
          slots, c)), starts)
    o = jax.vmap(lambda x, j: jax.lax.dynamic_slice_in_dim(x, j, t, 0))(o, r)

    init = self._initial(b)
    pick = lambda a, i: jnp.where(first_fresh.reshape((b,) + (1,) * (a.ndim - 1)), i, a)
    memories = jax.tree.map(pick, starts, init)
    padded = lambda a: jnp.concatenate([a, jnp.zeros((b, c - 1) + a.shape[2:], a.dtype)], 1)
    pending = tuple(None if a is None else
                    jax.vmap(lambda x, j: jax.lax.dynamic_slice_in_dim(x, j, c - 1, 0))(
                        padded(a), first).astype(old.dtype)
                    for a, old in zip(seqs, state.pending))
    return o, HopeState(state.conv, ops.TitansState(*memories), pending, nxt.astype(jnp.int32))

  def _chunk_time_major(self, carry, chunk):
    """``_chunk`` on time-major inputs ``[C, B, ...]`` (the layout of ``core.scan_chunks``),
    rematerialised in the backward pass: a chunk keeps only its start state for it."""
    def run(carry, chunk):
      carry, o = self._chunk(carry, jax.tree.map(_batch_major, chunk))
      return carry, _time_major(o)

    return jax.checkpoint(run)(carry, chunk)


def cms_or_swiglu(cfg: ModelConfig, *, rngs: nnx.Rngs):
  """The MLP of HOPE blocks: the CMS, or (``cms=False``, the "w/o CMS" ablation) SwiGLU."""
  return CMS(cfg, rngs=rngs) if cfg.cms else SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs)


register("hope", SelfModifyingTitans, mlp=cms_or_swiglu, validate=check_hope,
         description="HOPE: self-modifying Titans (DGD, momentum, decay), then CMS")
register("hope_attention", transformer, mlp=cms_or_swiglu,
         description="Hope-attention: softmax attention, then CMS")
