"""Log-likelihoods under an LM: of continuations (``Scorer``, the primitive of zero-shot scoring)
and of whole documents, each read apart from the others in packed rows (``DocumentScorer``, the
primitive of perplexity over documents)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Scorer:
  """Scores ``(context ids, continuation ids)`` pairs with a model, batched and jitted.

  Sequences are right-padded to a power-of-two length (at most ``max_len``, keeping the last
  tokens of longer ones) so that few shapes compile; ``one_shape``: every batch is padded to
  ``max_len + 1`` tokens (one compilation, for models that compile slowly).
  """

  def __init__(self, model, max_len: int = 1024, batch_size: int = 8, one_shape: bool = False):
    self.graphdef, self.params = nnx.split(model)
    self.max_len, self.batch_size, self.one_shape = max_len, batch_size, one_shape
    graphdef = self.graphdef

    @jax.jit
    def token_logprobs(params, tokens):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      logp = -optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      greedy = jnp.argmax(logits, -1) == tokens[:, 1:]
      return logp, greedy

    self._token_logprobs = token_logprobs

  def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy decode)`` per pair."""
    # Batches of similar lengths pad less; the answers come back in the order of ``pairs``.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [None] * len(pairs)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
        out[i] = result
    return out

  def _score_batch(self, pairs):
    seqs, spans = [], []
    for context, continuation in pairs:
      if not continuation:
        raise ValueError("an empty continuation cannot be scored")
      seq = (list(context) + list(continuation))[-(self.max_len + 1):]
      if len(seq) < 2:
        seq = [0] + seq
      seqs.append(seq)
      spans.append(min(len(continuation), len(seq) - 1))
    length = max(len(s) for s in seqs)
    padded_len = min(1 << (length - 1).bit_length(), self.max_len + 1)
    padded_len = self.max_len + 1 if self.one_shape else max(padded_len, length)
    tokens = np.zeros((self.batch_size, padded_len), np.int32)
    for row, seq in enumerate(seqs):
      tokens[row, :len(seq)] = seq
    logp, greedy = jax.device_get(self._token_logprobs(self.params, tokens))
    results = []
    for row, (seq, span) in enumerate(zip(seqs, spans)):
      end = len(seq) - 1  # targets are positions 1..len-1 -> logp index 0..len-2
      sl = slice(end - span, end)
      results.append((float(logp[row, sl].sum()), bool(greedy[row, sl].all())))
    return results


def document_pieces(ids: Sequence[int], seq_len: int) -> list[list[int]]:
  """The pieces of one document's ``ids`` that a window of ``seq_len + 1`` tokens scores.

  Piece ``k`` is ``ids[k·seq_len : k·seq_len + seq_len + 1]``: each token but the document's
  first is the target of exactly one piece (a piece's first token is its context only). A
  document of at most ``seq_len + 1`` tokens is one piece; a longer one loses the context before
  each cut, as windows of the unpacked stream do.
  """
  if len(ids) < 2:
    return []
  return [list(ids[k:k + seq_len + 1]) for k in range(0, len(ids) - 1, seq_len)]


def pack_pieces(pieces: Sequence[Sequence[int]], width: int):
  """Rows of ``width`` tokens holding ``pieces`` in order (next fit), with segment ids.

  Returns:
    ``(tokens [R, width], segment_ids [R, width], places)``: int32 arrays (piece ``i`` of a row
    has id ``i``; the padding after the last piece has its own id) and, per piece, its
    ``(row, offset)``.
  """
  rows, places, used = [], [], width
  for piece in pieces:
    if not 2 <= len(piece) <= width:
      raise ValueError(f"a piece of {len(piece)} tokens does not fit rows of width={width} "
                       "(allowed: 2 .. width)")
    if used + len(piece) > width:
      rows.append([])
      used = 0
    places.append((len(rows) - 1, used))
    rows[-1].append(piece)
    used += len(piece)
  tokens = np.zeros((len(rows), width), np.int32)
  segment_ids = np.zeros((len(rows), width), np.int32)
  for r, row in enumerate(rows):
    segment_ids[r] = len(row)  # the padding's id
    offset = 0
    for i, piece in enumerate(row):
      tokens[r, offset:offset + len(piece)] = piece
      segment_ids[r, offset:offset + len(piece)] = i
      offset += len(piece)
  return tokens, segment_ids, places


class DocumentScorer:
  """Scores whole documents, each read apart from the others (packed rows with segment ids).

  Each document (its ids, usually its tokens and the end-of-document id) is cut into the pieces
  of ``document_pieces``; the pieces are packed into rows of ``seq_len + 1`` tokens and the model
  reads each row with segment ids (``model(tokens, segment_ids=ids)``), so that no piece
  conditions on another. ``packed=False`` gives each piece a row of its own and calls the model
  with the tokens alone (the reference; any model): the scores are the same.
  """

  def __init__(self, model, seq_len: int, batch_size: int = 8, packed: bool = True):
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    self.graphdef, self.params = nnx.split(model)
    self.seq_len, self.batch_size, self.packed = seq_len, batch_size, packed
    graphdef = self.graphdef

    @jax.jit
    def token_logprobs(params, tokens, segment_ids):
      model = nnx.merge(graphdef, params)
      if segment_ids is None:
        logits = model(tokens[:, :-1])
      else:
        logits = model(tokens[:, :-1], segment_ids=segment_ids[:, :-1])
      return -optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

    self._token_logprobs = token_logprobs

  def score(self, documents: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
    """``(sum of log p(token | the tokens before it in its piece), targets)`` per document: every
    token but the first is a target."""
    pieces, owner = [], []
    for d, ids in enumerate(documents):
      for piece in document_pieces(list(ids), self.seq_len):
        pieces.append(piece)
        owner.append(d)
    width = self.seq_len + 1
    if self.packed:
      tokens, segment_ids, places = pack_pieces(pieces, width)
    else:
      tokens = np.zeros((len(pieces), width), np.int32)
      for i, piece in enumerate(pieces):
        tokens[i, :len(piece)] = piece
      segment_ids, places = None, [(i, 0) for i in range(len(pieces))]
    logp = np.zeros((len(tokens), self.seq_len), np.float64)
    for start in range(0, len(tokens), self.batch_size):
      stop = min(start + self.batch_size, len(tokens))
      rows = np.zeros((self.batch_size, width), np.int32)  # one shape: the last batch is padded
      rows[:stop - start] = tokens[start:stop]
      ids = None
      if segment_ids is not None:
        ids = np.zeros_like(rows)
        ids[:stop - start] = segment_ids[start:stop]
      out = jax.device_get(self._token_logprobs(self.params, rows, ids))
      logp[start:stop] = out[:stop - start]
    totals = [[0.0, 0] for _ in documents]
    for piece, d, (row, offset) in zip(pieces, owner, places):
      totals[d][0] += float(logp[row, offset:offset + len(piece) - 1].sum())
      totals[d][1] += len(piece) - 1
    return [(float(s), int(n)) for s, n in totals]
