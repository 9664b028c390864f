"""Softmax attention: causal, RoPE, grouped-query, optional sliding window and persistent tokens.

Attention is the non-parametric memory of docs/EQUATIONS.md §1 (no write: the KV cache is the
memory). The cache is a ring of ``L`` slots (``L = window`` for sliding-window attention, else
``max_seq_len``); each slot remembers the absolute position of its key, so one masking rule serves
training, prefill and decoding. Persistent-memory tokens (Titans) are learned vectors projected to
keys and values that every query sees.

Packed documents (``segments``, ``nlx.nn.mixer``): a query sees only the keys of its own
document (persistent tokens excepted), RoPE runs at the positions inside the documents, and each
cache slot keeps its key's document number, so that calls in pieces mask across calls alike.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.params import Dense, normal, param
from nlx.nn.registry import register
from nlx.nn.rope import rope
from nlx.nn.segments import Segments

Array = jax.Array
# Queries attend in blocks of this many (each block's scores [B, H, block, S] are recomputed in the
# backward pass), so long sequences need O(block · S) memory instead of O(T · S).
QUERY_BLOCK = 1024


class KVCache(NamedTuple):
  """Keys/values ``[B, L, H_kv, D]`` (RoPE applied), each slot's position ``[L]`` (−1: empty) and
  each slot's running document number ``[B, L]`` (−1: empty; None in a cache without it)."""

  k: Array
  v: Array
  slot_pos: Array
  slot_doc: Optional[Array] = None


def attend(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
           window: Optional[int] = None, prefix: Optional[tuple[Array, Array]] = None,
           segment: Optional[int] = None, query_block: int = QUERY_BLOCK,
           q_doc: Optional[Array] = None, k_doc: Optional[Array] = None) -> Array:
  """``attend_block`` over blocks of ``query_block`` queries (one block when T is at most that):
  ``lax.map`` over the blocks, each rematerialised in the backward pass. Same arguments and
  result as ``attend_block``."""
  b, t, h, d = q.shape
  if t <= query_block:
    return attend_block(q, k, v, q_pos, k_pos, window, prefix, segment, q_doc, k_doc)
  n = -(-t // query_block)
  pad = n * query_block - t  # padded queries repeat the last position; their rows are dropped
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_pos = jnp.concatenate([q_pos, jnp.broadcast_to(q_pos[-1:], (pad,))])
  blocks = jnp.moveaxis(q.reshape(b, n, query_block, h, d), 1, 0)
  xs = (blocks, q_pos.reshape(n, query_block))
  if q_doc is not None:
    q_doc = jnp.pad(q_doc, ((0, 0), (0, pad)), mode="edge")
    xs += (jnp.moveaxis(q_doc.reshape(b, n, query_block), 1, 0),)
  one = jax.checkpoint(lambda qi, pi, di=None: attend_block(qi, k, v, pi, k_pos, window, prefix,
                                                            segment, di, k_doc))
  o = jax.lax.map(lambda xs: one(*xs), xs)
  return jnp.moveaxis(o, 0, 1).reshape(b, n * query_block, h, d)[:, :t]


def attend_block(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                 window: Optional[int] = None, prefix: Optional[tuple[Array, Array]] = None,
                 segment: Optional[int] = None, q_doc: Optional[Array] = None,
                 k_doc: Optional[Array] = None) -> Array:
  """Masked softmax attention with grouped-query heads (all queries at once).

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, S, H_kv, D]`` with ``H_kv`` dividing H.
    q_pos: ``[T]`` and k_pos: ``[S]`` absolute positions; key j is visible to query i when
      ``0 <= k_pos[j] <= q_pos[i]`` and, with a window, ``q_pos[i] − k_pos[j] < window``.
    prefix: optional ``(k_p, v_p)`` ``[B, P, H_kv, D]`` visible to every query (persistent tokens).
    segment: if given, key j is visible to query i only within the same segment of this many
      positions (``k_pos[j] // segment == q_pos[i] // segment``; Titans MAC).
    q_doc, k_doc: optional ``[B, T]`` and ``[B, S]`` document numbers (packed documents): key j
      is visible to query i of row b only if ``k_doc[b, j] == q_doc[b, i]`` (prefix excepted).

  Returns:
    ``[B, T, H, D]`` in q's dtype (computed in float32, or float64 for float64 inputs).
  """
  b, t, h, d = q.shape
  visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
  if window is not None:
    visible &= q_pos[:, None] - k_pos[None, :] < window
  if segment is not None:
    visible &= q_pos[:, None] // segment == k_pos[None, :] // segment
  if q_doc is not None:
    visible = visible[None] & (q_doc[:, :, None] == k_doc[:, None, :])  # [B, T, S]
  if prefix is not None:
    k, v = jnp.concatenate([prefix[0], k], 1), jnp.concatenate([prefix[1], v], 1)
    visible = jnp.concatenate([jnp.ones(visible.shape[:-1] + (prefix[0].shape[1],), bool),
                               visible], -1)
  hkv = k.shape[2]
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(b, t, hkv, h // hkv, d).astype(dtype)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(dtype)) * d**-0.5
  scores = jnp.where(visible if visible.ndim == 2 else visible[:, None, None], scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(dtype))
  return o.reshape(b, t, h, d).astype(q.dtype)


def write_cache(cache: KVCache, k: Array, v: Array, positions: Array,
                docs: Optional[Array] = None) -> KVCache:
  """Writes the keys/values of ``positions`` (``[T]``) into their slots ``position mod L``, and
  their document numbers ``docs [B, T]`` when the cache keeps them (``slot_doc``)."""
  size = cache.k.shape[1]
  k, v, positions = k[:, -size:], v[:, -size:], positions[-size:]  # older ones fall out anyway
  slots = positions % size
  slot_doc = cache.slot_doc
  if slot_doc is not None:
    if docs is None:
      raise ValueError("write_cache: docs [B, T] is required for a cache with slot_doc")
    slot_doc = slot_doc.at[:, slots].set(docs[:, -size:].astype(slot_doc.dtype))
  return KVCache(cache.k.at[:, slots].set(k.astype(cache.k.dtype)),
                 cache.v.at[:, slots].set(v.astype(cache.v.dtype)),
                 cache.slot_pos.at[slots].set(positions.astype(cache.slot_pos.dtype)), slot_doc)


def last_doc(cache: KVCache, pos: Array | int) -> Array:
  """``[B]``: the document number of the token before ``pos`` (0 before the first token)."""
  size = cache.slot_pos.shape[0]
  pos = jnp.asarray(pos, jnp.int32)
  return jnp.where(pos > 0, cache.slot_doc[:, (pos - 1) % size], 0)


class Attention(Mixer):
  """Multi-head causal softmax attention with RoPE (Transformer++; SWA of Samba and Titans).

  Args:
    cfg: uses d_model, n_heads, n_kv_heads, head_dim, rope_theta, max_seq_len.
    window: sliding window (None: full causal attention).
    n_persistent: learned persistent tokens seen by every query (Titans).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, window: Optional[int] = None,
               n_persistent: int = 0):
    d, h, hkv, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dk
    self.window, self.rope_theta, self.max_seq_len = window, cfg.rope_theta, cfg.max_seq_len
    self.heads, self.kv_heads, self.head_dim = h, hkv, dh
    self.q = Dense((d,), (h, dh), ("embed", "heads", "head_dim"), rngs=rngs)
    self.k = Dense((d,), (hkv, dh), ("embed", "kv_heads", "head_dim"), rngs=rngs)
    self.v = Dense((d,), (hkv, dh), ("embed", "kv_heads", "head_dim"), rngs=rngs)
    self.o = Dense((h, dh), (d,), ("heads", "head_dim", "embed"), rngs=rngs)
    self.persistent = (param(rngs, normal(1.0), (n_persistent, d), ("persistent", "embed"))
                       if n_persistent else None)

  def cache_size(self, max_len: int) -> int:
    return max_len if self.window is None else min(self.window, max_len)

  def init_state(self, batch_size: int, max_len: int) -> KVCache:
    size = self.cache_size(max_len)
    shape = (batch_size, size, self.kv_heads, self.head_dim)
    return KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.full((size,), -1, jnp.int32),
                   jnp.full((batch_size, size), -1, jnp.int32))

  def prefix(self, batch_size: int, dtype) -> Optional[tuple[Array, Array]]:
    if self.persistent is None:
      return None
    p = self.persistent[...].astype(dtype)
    k, v = self.k(p), self.v(p)  # no RoPE: persistent tokens have no position
    expand = lambda x: jnp.broadcast_to(x[None], (batch_size,) + x.shape)
    return expand(k), expand(v)

  def __call__(self, x: Array, state: Optional[KVCache] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None) -> tuple[Array, Optional[KVCache]]:
    b, t, _ = x.shape
    positions = pos + jnp.arange(t, dtype=jnp.int32)
    rope_pos = positions if segments is None else segments.positions
    q = rope(self.q(x), rope_pos, self.rope_theta)
    k = rope(self.k(x), rope_pos, self.rope_theta)
    v = self.v(x)
    q_doc = None if segments is None else segments.doc
    if state is None:
      keys, values, k_pos, k_doc = k, v, positions, q_doc
    else:
      if q_doc is None:  # one document, continuing the row's last one
        q_doc = jnp.broadcast_to(last_doc(state, pos)[:, None], (b, t))
      keys = jnp.concatenate([state.k.astype(k.dtype), k], 1)
      values = jnp.concatenate([state.v.astype(v.dtype), v], 1)
      k_pos = jnp.concatenate([state.slot_pos, positions])
      k_doc = jnp.concatenate([state.slot_doc, q_doc], 1)
      state = write_cache(state, k, v, positions, q_doc)
    o = attend(q, keys, values, positions, k_pos, self.window, self.prefix(b, x.dtype),
               q_doc=q_doc, k_doc=k_doc)
    return self.o(o), state


def transformer(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Attention:
  """Transformer++'s mixer: full causal attention, or sliding-window with ``cfg.window``."""
  return Attention(cfg, rngs=rngs, window=cfg.window)


def sliding_window(cfg: ModelConfig, *, rngs: nnx.Rngs, n_persistent: int = 0) -> Attention:
  """Sliding-window attention of the hybrids (Samba, Titans); ``cfg.window`` is required."""
  if cfg.window is None:
    raise ValueError(f"model.window=None is not allowed for family {cfg.family!r}: it needs a "
                     "sliding window (an int >= 1)")
  return Attention(cfg, rngs=rngs, window=cfg.window, n_persistent=n_persistent)


register("transformer", transformer,
         description="Transformer++: RoPE, grouped-query causal softmax attention, SwiGLU")
