"""Document boundaries of a packed batch, as every mixer takes them.

A packed row holds several documents one after another; ``segment_ids [B, T]`` (int) name them:
a new document starts where the id changes. The model turns the ids into ``Segments`` once and
hands them to every block, so that each mixer starts each document afresh:

* ``reset [B, T]`` (bool): the token starts a document; every recurrent state (memories,
  momenta, convolution windows, CMS levels and their step counters) restarts from its initial
  state before this token is written (the convention of ``nlx.ops``' ``reset``);
* ``positions [B, T]`` (int32): the token's position inside its document (RoPE restarts, and
  chunked memories count their chunks from the document's first token);
* ``doc [B, T]`` (int32): a running document number, equal for two tokens exactly when they
  belong to one document (attention masks across documents with it, and the KV cache keeps it).

``segment_ids=None`` (one document per row) is ``segments=None`` everywhere: the graph is the one
without packing.

Across calls (``LM.prefill``), ``Stream`` is what a row carries from one call to the next: the
id of its last token, the position of its next token in its document and the running document
number; the first call of a fresh state starts a document without a reset.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


class Segments(NamedTuple):
  """Per-token document structure of a call (see the module docstring)."""

  reset: Array      # [B, T] bool
  positions: Array  # [B, T] int32
  doc: Array        # [B, T] int32


class Stream(NamedTuple):
  """What a row carries across calls: the last token's id, the next token's position in its
  document (0 for a fresh state), and the last token's running document number."""

  last_id: Array    # [B] int32
  position: Array   # [B] int32
  doc: Array        # [B] int32


def fresh_stream(batch_size: int) -> Stream:
  """The ``Stream`` of a state before its first token."""
  zeros = jnp.zeros((batch_size,), jnp.int32)
  return Stream(zeros, zeros, zeros)


def check_segment_ids(segment_ids, tokens_shape) -> Array:
  """``segment_ids`` as ``[B, T]`` int32, or a ValueError naming the argument and the shape."""
  ids = jnp.asarray(segment_ids)
  if ids.shape != tuple(tokens_shape):
    raise ValueError(f"segment_ids has shape {ids.shape}; it must be [B, T] = "
                     f"{tuple(tokens_shape)}, the shape of tokens")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids has dtype {ids.dtype}; it must be an integer array "
                     "(a new document where the id changes)")
  return ids.astype(jnp.int32)


def from_ids(segment_ids: Array, stream: Optional[Stream] = None) -> tuple[Segments, Stream]:
  """``Segments`` of ``segment_ids [B, T]``, continuing ``stream`` (None: a fresh row).

  A token starts a document where its id differs from the previous token's; the first token of
  a call continues the stream's document when its id equals ``stream.last_id`` and the stream
  has begun (``position > 0``); a fresh stream's first token starts a document without a reset
  (there is nothing to forget).
  """
  ids = segment_ids.astype(jnp.int32)
  b, t = ids.shape
  stream = fresh_stream(b) if stream is None else stream
  first = (ids[:, 0] != stream.last_id) & (stream.position > 0)
  reset = jnp.concatenate([first[:, None], ids[:, 1:] != ids[:, :-1]], axis=1)
  doc = stream.doc[:, None] + jnp.cumsum(reset.astype(jnp.int32), axis=1)
  index = jnp.arange(t, dtype=jnp.int32)[None, :]
  # The index of each token's document start in this call, or -(stream position) when the
  # token's document began in an earlier call.
  start = jnp.where(reset, index, jnp.full_like(index, -1))
  start = jax.lax.cummax(start, axis=1)
  positions = jnp.where(start >= 0, index - start, index + stream.position[:, None])
  new_stream = Stream(ids[:, -1], positions[:, -1] + 1, doc[:, -1])
  return Segments(reset, positions, doc), new_stream
