"""Log-likelihoods of continuations under an LM: the primitive of perplexity and zero-shot scoring."""

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
