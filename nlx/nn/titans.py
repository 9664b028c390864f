"""Titans: the long-term memory alone (LMM) and its three hybrids with attention (MAC, MAG, MAL).

All four use the same neural memory (``NeuralMemory``: a residual MLP memory per head, written by
gradient descent with momentum and decay through ``nlx.ops.titans_memory``) and attention with
learned persistent-memory tokens (docs/EQUATIONS.md §5):

* ``titans_lmm``: the memory as the mixer of every block.
* ``titans_mag`` (memory as a gate): ``y = RMSNorm(SWA(x)) ⊙ sigmoid(RMSNorm(LMM(x)))``, the
  attention a sliding window over ``[persistent | x]``.
* ``titans_mal`` (memory as a layer): blocks alternate LMM and sliding-window attention with
  persistent tokens (a two-block layer group).
* ``titans_mac`` (memory as context): the sequence is cut into segments of ``window`` tokens. For
  each token of a segment, the memory as it was at the segment start is read at a retrieval query
  (``h_t = M_seg(q_t)``); causal attention inside the segment runs over
  ``[persistent | h_{≤t} | x_{≤t}]``; its output y is written to the memory and the block returns
  ``RMSNorm(y) ⊙ sigmoid(RMSNorm(LMM(y)))`` (the paper's ``o = y ⊗ M(y)``).

Packed documents (``segments``, ``nlx.nn.mixer``): the attention masks across documents, the
memory restarts at each document (``NeuralMemory`` with ``segments``). MAC counts its segments
from each document's first token, reads a document's first segment from the initial memory and
restarts RoPE at each document, exactly as the document alone. A whole packed sequence runs one
scan step per segment of a buffer (``mac_slots``): a document of at least ``window`` tokens
starts at a buffer segment's start (placeholders pad the gap before it), so that each of its
later segments is one buffer segment whose start memory is the scan's carry; a shorter document
goes wherever the previous one ended, and where it straddles two buffer segments its queries
see its keys of the previous one (the carry keeps them).

A stateful MAC call (prefill, decoding) keeps the memory, the segment-start memory and the
current segment's keys as its state. Without packed documents it runs in pieces that each lie
inside one segment (``MemoryAsContext._stateful``): whole segments in parallel as above, and the
tokens that finish the state's segment in progress or start the one it leaves in progress in
parallel too (a few pieces of static sizes, attending to the cached keys), so that any split
of a sequence into calls returns exactly the outputs and state of the token-by-token path
(``MemoryAsContext._tokens``, the reference). A stateful call with segments runs token by
token: its rows' segments start at different places, and the memory cannot skip the
placeholders that would align them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.memory.packed import place_at_slots
from nlx.nn.attention import Attention, KVCache, attend, sliding_window, write_cache
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer, apply
from nlx.nn.neural_memory import MemoryState, NeuralMemory
from nlx.nn.norms import RMSNorm, l2_normalize
from nlx.nn.params import Dense
from nlx.nn.registry import register
from nlx.nn.rope import rope
from nlx.nn.segments import Segments

Array = jax.Array
# A stateful MAC call runs the tokens before its first whole segment and after its last (fewer
# than a segment each, counts known only at run time) in pieces of this radix's powers of tokens.
PIECE_RADIX = 8


def titans_lmm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> NeuralMemory:
  """The Titans long-term memory: MLP memory, momentum and decay."""
  return NeuralMemory(cfg, rngs=rngs, memory="mlp", activation="silu", lr_max=cfg.titans_lr,
                      momentum=True, decay=True)


def persistent_swa(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Attention:
  """Sliding-window attention with ``cfg.n_persistent`` persistent tokens."""
  return sliding_window(cfg, rngs=rngs, n_persistent=cfg.n_persistent)


class GatedOutput(nnx.Module):
  """``RMSNorm(y) ⊙ sigmoid(RMSNorm(m))``: how MAG and MAC combine attention and memory."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.norm_y = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)
    self.norm_m = RMSNorm((cfg.d_model,), ("embed",), rngs=rngs, eps=cfg.norm_eps)

  def __call__(self, y: Array, m: Array) -> Array:
    return self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m))


class MemoryAsGate(Mixer):
  """Titans MAG: sliding-window attention with persistent tokens, gated by the memory branch."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn = persistent_swa(cfg, rngs=rngs)
    self.memory = titans_lmm(cfg, rngs=rngs)
    self.combine = GatedOutput(cfg, rngs=rngs)

  def init_state(self, batch_size: int, max_len: int) -> tuple:
    return (self.attn.init_state(batch_size, max_len),
            self.memory.init_state(batch_size, max_len))

  def __call__(self, x: Array, state: Optional[tuple] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None):
    y, attn_state = self.attn(x, None if state is None else state[0], pos, segments)
    m, memory_state = apply(self.memory, x, None if state is None else state[1], pos, segments)
    return self.combine(y, m), None if state is None else (attn_state, memory_state)


class MACState(NamedTuple):
  memory: MemoryState   # the memory after the last token (conv state, weights, momentum)
  segment_weights: object  # the memory weights at the start of the current segment
  h_cache: KVCache      # keys/values of the retrieved tokens h of the current segment
  x_cache: KVCache      # keys/values of the input tokens of the current segment


class MemoryAsContext(Mixer):
  """Titans MAC over segments of ``cfg.window`` tokens (see the module docstring).

  A whole sequence (``state=None``) runs as a scan over segments, with packed documents over the
  segments of ``mac_slots``' buffer (``_packed``); a stateful call (the segment-start memory, the
  segment's keys and the memory state are the state) runs in pieces inside segments
  (``_stateful``), with packed documents token by token (``_tokens``). They agree for any
  ``memory_chunk_size``: the memory state carries its gradient chunk in progress.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    _check_mac(cfg)
    self.segment = cfg.window
    self.rope_theta = cfg.rope_theta
    self.heads, self.dk = cfg.n_heads, cfg.dk
    self.retrieve = Dense((cfg.d_model,), (cfg.n_heads, cfg.dk), ("embed", "heads", "head_dim"),
                          rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, n_persistent=cfg.n_persistent)
    self.memory = titans_lmm(cfg, rngs=rngs)
    self.combine = GatedOutput(cfg, rngs=rngs)

  def init_state(self, batch_size: int, max_len: int) -> MACState:
    memory = self.memory.init_state(batch_size, max_len)
    cache = self.attn.init_state(batch_size, self.segment)  # full attention, `segment` slots
    return MACState(memory, memory.memory.memory, cache, cache)

  def _initial(self, batch_size: int, dtype) -> MACState:
    """The state of a call without one, in ``dtype``'s precision where that is wider (float64)."""
    return jax.tree.map(lambda a: a.astype(jnp.promote_types(a.dtype, dtype))
                        if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        self.init_state(batch_size, self.segment))

  def _segment(self, carry: MACState, x: Array, positions: Array):
    """The parallel path: tokens ``x [B, s]`` at ``positions [s]``, one whole segment."""
    b, n, d = x.shape
    seg_w = carry.memory.memory.memory  # the memory at the segment start
    h = self.memory.read(seg_w, l2_normalize(jax.nn.silu(self.retrieve(x)))).reshape(b, n, d)
    attn = self.attn
    q = rope(attn.q(x), positions, self.rope_theta)
    kx, vx = rope(attn.k(x), positions, self.rope_theta), attn.v(x)
    kh, vh = rope(attn.k(h), positions, self.rope_theta), attn.v(h)
    o = attend(q, jnp.concatenate([kh, kx], 1), jnp.concatenate([vh, vx], 1), positions,
               jnp.concatenate([positions, positions]), prefix=attn.prefix(b, x.dtype),
               segment=self.segment)
    y = attn.o(o)
    m, memory = self.memory(y, carry.memory)
    return carry._replace(memory=memory, segment_weights=seg_w), self.combine(y, m)

  def _token(self, carry: MACState, x: Array, p: Array, doc_pos: Array,
             reset: Optional[Array], doc: Optional[Array]):
    """The token-by-token path: one token ``x [B, 1, d]`` at absolute position ``p`` (scalar),
    at ``doc_pos [B]`` inside its document ``doc [B]``, starting a document where ``reset [B]``
    (both None: no packed documents). The attention caches keep, as each slot's document
    number, the absolute position of its segment's first token (unique in a row), so that a
    query sees exactly the tokens of its own segment of its own document."""
    if reset is None:  # one document: a piece of one token
      return self._piece(carry, x, p)
    b = x.shape[0]
    at_start = doc_pos % self.segment == 0
    key = (p - doc_pos % self.segment)[:, None]  # [B, 1]
    pick = lambda c, u, w: jnp.where(c.reshape(c.shape + (1,) * (u.ndim - 1)), u, w)  # c: [B]
    current = carry.memory.memory.memory
    seg_w = jax.tree.map(lambda c, s: pick(at_start, c, s), current, carry.segment_weights)
    initial = self.memory.initial_memory(b).memory  # a document's first segment reads it
    seg_w = jax.tree.map(lambda i, s: pick(reset, i.astype(s.dtype), s), initial, seg_w)
    y, caches = self._attend_cached(carry, x, seg_w, doc_pos[:, None], p[None], key)
    one = Segments(reset[:, None], doc_pos[:, None], doc[:, None])
    m, memory = apply(self.memory, y, carry.memory, p, one)
    return MACState(memory, seg_w, *caches), self.combine(y, m)

  def _packed(self, x: Array, reset: Array) -> Array:
    """A whole packed sequence ``x [B, T, d]`` with document starts ``reset [B, T]`` (and the
    first token): one scan step per segment of ``mac_slots``' buffer, skipped where it holds
    placeholders only in every row (the buffer is sized for the worst layout)."""
    (b, t, d), s = x.shape, self.segment
    reset = jnp.asarray(reset)
    if reset.shape != (b, t):
      raise ValueError(f"segments.reset has shape {reset.shape}; it must be [B, T] = {(b, t)}, "
                       "the batch and length of x")
    reset = reset.astype(bool)
    slots, doc_pos = jax.vmap(lambda r: mac_slots(r, s))(reset)
    n = buffer_segments(t, s)
    place = lambda a, fill: jnp.moveaxis(jax.vmap(
        lambda xs, ss: place_at_slots(xs, ss, n * s, fill))(a, slots).reshape(
            (b, n, s) + a.shape[2:]), 1, 0)
    first = jnp.arange(t, dtype=jnp.int32) - doc_pos % s  # each token's segment: its first token
    xs = (jnp.arange(n, dtype=jnp.int32), place(x, 0), place(doc_pos, 0), place(first, -1),
          place(reset, False), place(jnp.ones((b, t), bool), False))
    memory = self._initial(b, x.dtype).memory
    initial = jax.tree.map(lambda i, w: i.astype(w.dtype),
                           self.memory.initial_memory(b).memory, memory.memory.memory)
    keys = jnp.zeros((b, s, self.attn.kv_heads, self.attn.head_dim), x.dtype)
    carry = (memory, (keys, keys, keys, keys, jnp.full((b, s), -1, jnp.int32)))
    shape = jax.ShapeDtypeStruct((b, s, d), x.dtype)

    # Rematerialised in the backward pass: a step keeps its carry only (its residuals, stacked
    # for every buffer segment, were 3x the unpacked scan's, and slower to move).
    body = jax.checkpoint(functools.partial(self._buffer_segment, initial))

    def step(carry, inputs):
      skip = lambda carry, inputs: (carry, jnp.zeros(shape.shape, shape.dtype))
      return jax.lax.cond(jnp.any(inputs[-1]), body, skip, carry, inputs)

    _, ys = jax.lax.scan(step, carry, xs)
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, n * s, d)
    return jax.vmap(lambda y, ss: y[ss])(ys, slots)

  def _buffer_segment(self, initial, carry, inputs):
    """Buffer segment ``j`` of ``_packed``: tokens ``x [B, s, d]`` at positions ``doc_pos`` in
    their documents, in the segments named by their first tokens ``first`` (-1: placeholder),
    starting documents where ``reset``. A token in its document's first segment reads the
    ``initial`` memory, any other the carry's (its segment starts this buffer segment); the
    queries see the keys of their own segment here and in the previous buffer segment."""
    j, x, doc_pos, first, reset, _ = inputs
    memory, (kh0, vh0, kx0, vx0, first0) = carry
    (b, s, d), attn = x.shape, self.attn
    r = l2_normalize(jax.nn.silu(self.retrieve(x)))
    fresh = (doc_pos < s).reshape(b, s, 1, 1)
    h = jnp.where(fresh, self.memory.read(initial, r), self.memory.read(memory.memory.memory, r))
    h = h.reshape(b, s, d)
    q = rope(attn.q(x), doc_pos, self.rope_theta)
    kx, vx = rope(attn.k(x), doc_pos, self.rope_theta), attn.v(x)
    kh, vh = rope(attn.k(h), doc_pos, self.rope_theta), attn.v(h)
    slots = j * s + jnp.arange(s, dtype=jnp.int32)
    cat = lambda xs: jnp.concatenate(xs, 1)
    o = attend(q, cat([kh0, kx0, kh, kx]), cat([vh0, vx0, vh, vx]), slots,
               jnp.concatenate([slots - s, slots - s, slots, slots]),
               prefix=attn.prefix(b, x.dtype), q_doc=first, k_doc=cat([first0, first0, first,
                                                                         first]))
    y = attn.o(o)
    m, new = apply(self.memory, y, memory, 0, Segments(reset, doc_pos, first))
    new = jax.tree.map(lambda a, c: a.astype(c.dtype), new, memory)
    return (new, (kh, vh, kx, vx, first)), self.combine(y, m)

  def __call__(self, x: Array, state: Optional[MACState] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None):
    b, t, d = x.shape
    if state is None and segments is not None:  # a whole packed sequence
      return self._packed(x, segments.reset), None
    if state is None:  # a whole sequence: one scan step per segment
      s = self.segment
      n_seg = -(-t // s)
      xs = jnp.pad(x, ((0, 0), (0, n_seg * s - t), (0, 0))).reshape(b, n_seg, s, d)

      def body(carry, inputs):
        xseg, start = inputs
        return self._segment(carry, xseg, start + jnp.arange(s, dtype=jnp.int32))

      starts = jnp.arange(n_seg, dtype=jnp.int32) * s
      _, ys = jax.lax.scan(body, self._initial(b, x.dtype), (jnp.moveaxis(xs, 1, 0), starts))
      return jnp.moveaxis(ys, 0, 1).reshape(b, n_seg * s, d)[:, :t], None

    if segments is None and t > 1:  # stateful, in pieces (one token: one step of ``_token``)
      return self._stateful(x, state, pos)
    return self._tokens(x, state, pos, segments)

  def _tokens(self, x: Array, state: Optional[MACState], pos: Array | int = 0,
              segments: Optional[Segments] = None):
    """The token-by-token path (``_token`` in a scan over T): a stateful call with packed
    documents (each document's segments count from its first token, wherever it starts), and
    the reference of ``_stateful``."""
    b, t, d = x.shape
    positions = pos + jnp.arange(t, dtype=jnp.int32)
    if segments is None:
      doc_pos, docs = jnp.broadcast_to(positions[:, None], (t, b)), None
    else:
      doc_pos, docs = jnp.moveaxis(segments.positions, 1, 0), (
          jnp.moveaxis(segments.reset, 1, 0), jnp.moveaxis(segments.doc, 1, 0))

    def step(carry, inputs):
      xt, p, dp, rd = inputs
      new, y = self._token(carry, xt[:, None], p, dp, *((None, None) if rd is None else rd))
      return jax.tree.map(lambda n, c: n.astype(c.dtype), new, carry), y[:, 0]

    initial = self._initial(b, x.dtype) if state is None else state
    new_state, ys = jax.lax.scan(step, initial,
                                 (jnp.moveaxis(x, 1, 0), positions, doc_pos, docs))
    return jnp.moveaxis(ys, 0, 1), None if state is None else new_state

  def _stateful(self, x: Array, state: MACState, pos: Array | int):
    """A stateful call without packed documents, in pieces that each lie inside one segment
    (``_piece``): the rest of the state's segment in progress (``head`` tokens), whole
    segments, and the start of a segment left in progress (``tail`` tokens).

    ``pos`` may be traced, so the pieces are taken or skipped by ``lax.cond``, in one scan
    whose step covers at most one segment: the head at the first step, a whole segment at each
    step between (the last of them skipped where the head took its tokens), the tail at the
    last step. Head and tail run as pieces of ``PIECE_RADIX``'s powers of tokens (each power up
    to ``PIECE_RADIX − 1`` times): each piece size compiles once.
    """
    (b, t, d), s = x.shape, self.segment
    pos = jnp.asarray(pos, jnp.int32)
    head = jnp.where(pos % s == 0, 0, jnp.minimum(s - pos % s, t))
    whole = (t - head) // s
    tail = t - head - whole * s
    bound, r = min(s - 1, t), PIECE_RADIX  # head and tail have at most ``bound`` tokens
    sizes = [r**k for k in range(bound.bit_length()) if r**k <= bound]
    dtype = jax.eval_shape(lambda c, xs: self._piece(c, xs, pos)[1], state, x[:, :1]).dtype

    def piece(carry, n, take):  # carry: (state, the next token, the step's first token, ys)
      def run(carry):
        memory, start, first, ys = carry
        new, y = self._piece(memory, jax.lax.dynamic_slice_in_dim(x, start, n, 1), pos + start)
        new = jax.tree.map(lambda a, c: a.astype(c.dtype), new, memory)
        return new, start + n, first, jax.lax.dynamic_update_slice_in_dim(ys, y, start - first, 1)
      return jax.lax.cond(take, run, lambda carry: carry, carry)

    def step(carry, inputs):
      count, take_whole = inputs  # count: head or tail tokens
      memory, start = carry
      carry = (memory, start, start, jnp.zeros((b, s, d), dtype))

      def pieces(carry):
        for n in reversed(sizes):
          digit = count // n % r
          carry, _ = jax.lax.scan(lambda c, i: (piece(c, n, i < digit), None), carry,
                                  jnp.arange(min(r - 1, bound // n), dtype=jnp.int32))
        return carry

      carry = jax.lax.cond(count > 0, pieces, lambda carry: carry, carry)
      if t >= s:
        carry = piece(carry, s, take_whole)
      return carry[:2], carry[3]

    n = t // s
    counts = jnp.concatenate([head[None], jnp.zeros((n,), jnp.int32), tail[None]])
    takes = jnp.concatenate([jnp.zeros((1,), bool), jnp.arange(n) < whole, jnp.zeros((1,), bool)])
    (new_state, _), ys = jax.lax.scan(step, (state, jnp.zeros((), jnp.int32)), (counts, takes))
    # Token i: the head's step 0, a whole segment's step 1 + (i − head) // s, or the tail's last.
    i = jnp.arange(t, dtype=jnp.int32)
    j = jnp.where(i < head, 0, jnp.where(i < head + whole * s, 1 + (i - head) // s, n + 1))
    first = jnp.where(j == 0, 0, jnp.where(j <= n, head + (j - 1) * s, head + whole * s))
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, (n + 2) * s, d)
    return jnp.take(ys, j * s + i - first, axis=1), new_state

  def _piece(self, carry: MACState, x: Array, p0: Array):
    """Tokens ``x [B, n, d]`` at positions ``p0 + [0, n)``, inside one segment, all at once (a
    token step without documents is a piece of one token). They read the memory at the segment start (the
    carry's memory where ``p0`` starts the segment, else ``segment_weights``) and attend to
    the caches' keys of their segment and to each other, causally; the memory takes their
    outputs and the caches their keys."""
    (b, n, d), s = x.shape, self.segment
    positions = p0 + jnp.arange(n, dtype=jnp.int32)
    key = jnp.broadcast_to(p0 - p0 % s, (b, n))  # the segment: its first position
    seg_w = jax.tree.map(lambda c, w: jnp.where(p0 % s == 0, c, w), carry.memory.memory.memory,
                         carry.segment_weights)
    y, caches = self._attend_cached(carry, x, seg_w, positions, positions, key)
    m, memory = self.memory(y, carry.memory)
    return MACState(memory, seg_w, *caches), self.combine(y, m)

  def _attend_cached(self, carry: MACState, x: Array, seg_w, rope_pos: Array, positions: Array,
                     key: Array):
    """The attention of a stateful call's tokens ``x [B, n, d]`` (``_token``, ``_piece``): each
    retrieves ``h`` from the segment-start memory ``seg_w`` and attends, causally, to the caches'
    keys and its own tokens' keys (``h`` and ``x``, RoPE at ``rope_pos``) of its segment
    (``key [B, n]``: the segment's first absolute position). Returns the attention's output
    ``y [B, n, d]`` and the caches with the tokens' keys added at ``positions [n]``."""
    b, n, d = x.shape
    h = self.memory.read(seg_w, l2_normalize(jax.nn.silu(self.retrieve(x)))).reshape(b, n, d)
    attn = self.attn
    q = rope(attn.q(x), rope_pos, self.rope_theta)
    kx, vx = rope(attn.k(x), rope_pos, self.rope_theta), attn.v(x)
    kh, vh = rope(attn.k(h), rope_pos, self.rope_theta), attn.v(h)
    h_cache, x_cache = carry.h_cache, carry.x_cache
    cat = lambda xs: jnp.concatenate(xs, 1)
    keys = cat([h_cache.k.astype(x.dtype), x_cache.k.astype(x.dtype), kh, kx])
    values = cat([h_cache.v.astype(x.dtype), x_cache.v.astype(x.dtype), vh, vx])
    k_pos = jnp.concatenate([h_cache.slot_pos, x_cache.slot_pos, positions, positions])
    k_doc = cat([h_cache.slot_doc, x_cache.slot_doc, key, key])
    o = attend(q, keys, values, positions, k_pos, prefix=attn.prefix(b, x.dtype), q_doc=key,
               k_doc=k_doc)
    return attn.o(o), (write_cache(h_cache, kh, vh, positions, key),
                       write_cache(x_cache, kx, vx, positions, key))


def mac_slots(reset: Array, segment: int) -> tuple[Array, Array]:
  """Where each token of a packed row goes in ``MemoryAsContext._packed``'s buffer.

  A document starts at index 0 and where ``reset [T]``. One of at least ``segment`` tokens
  starts at a buffer segment's start (placeholders pad the gap before it, fewer than
  ``segment``), so its later segments are whole buffer segments; a shorter one follows the
  previous token. Placeholders thus come only before a document's first token or after the
  last token: the memory's writes of them are undone by the next reset or never read.

  Returns:
    ``(slots, doc_pos)``, each ``[T]`` int32: the buffer slot and the position in the document.
  """
  t, s = reset.shape[-1], segment
  index = jnp.arange(t, dtype=jnp.int32)
  starts = reset | (index == 0)
  first = jax.lax.cummax(jnp.where(starts, index, 0), axis=0)
  following = jax.lax.cummin(jnp.where(starts, index, t), axis=0, reverse=True)
  end = jnp.concatenate([following[1:], jnp.full((1,), t, jnp.int32)])  # the next start after
  long = starts & (end - index >= s)
  last_long = jax.lax.cummax(jnp.where(long, index, 0), axis=0)
  before = jnp.concatenate([jnp.zeros((1,), jnp.int32), last_long[:-1]])  # buffer phase 0 there
  pad = jnp.where(long, -(index - before) % s, 0)
  return index + jnp.cumsum(pad), index - first


def buffer_segments(t: int, segment: int) -> int:
  """Buffer segments of ``mac_slots`` for ``t`` tokens in any layout (tight: documents of one
  token and of ``segment`` tokens, alternating). A document that pads (fewer than ``segment``
  slots) starts ``segment + 1`` tokens or more after the previous one that pads, and at least one
  token after the row's start, so at most ``⌊t/(segment + 1)⌋`` documents pad."""
  s = segment
  return -(-(t + (t // (s + 1)) * (s - 1)) // s)


def _check_mac(cfg: ModelConfig) -> None:
  cfg.require("titans_mac", window=(cfg.window is not None,
                                    "MAC needs its segment length in window (an int >= 1)"))
  cfg.require("titans_mac", expand_v=(cfg.n_heads * cfg.dv == cfg.d_model,
                                      "the retrieved tokens need n_heads * head_dim * expand_v "
                                      f"= d_model = {cfg.d_model}"))


def _check_window(name: str):
  def check(cfg: ModelConfig) -> None:
    cfg.require(name, window=(cfg.window is not None, "needs a sliding window (an int >= 1)"))
  return check


register("titans_lmm", titans_lmm, description="Titans LMM: the neural long-term memory alone")
register("titans_mag", MemoryAsGate, validate=_check_window("titans_mag"),
         description="Titans MAG: sliding-window attention gated by the memory")
register("titans_mal", titans_lmm, persistent_swa, validate=_check_window("titans_mal"),
         description="Titans MAL: memory layer, then sliding-window attention")
register("titans_mac", MemoryAsContext, validate=_check_mac,
         description="Titans MAC: attention over persistent, retrieved and segment tokens")
