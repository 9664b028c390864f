"""Inner rates bounded by how alike a chunk's keys are (``titans_memory(rate="gram")``).

A chunk of C chunk-start gradients on a linear memory moves the weights by ``Σ_j lr_j k_j k_jᵀ``
at once. Bounding every ``lr_j`` by ``0.5 / C`` keeps that step below 0.5 when all C keys are
equal, but it also writes a key seen once with at most ``0.5 / C`` of its error, which is what
keeps a chunked Titans memory at C = 16 from binding a key to its value on MQAR
(docs/EQUATIONS.md §5, docs/RESULTS.md). Here each token's rate is divided by how much of its key
the chunk has already written:

    s_t = Σ_{j ≤ t, j in t's chunk} |k_t · k_j|,    lr'_t = lr_t / max(1, s_t),

so distinct (orthogonal, unit-norm) keys keep their full rate, and C equal keys step
``lr·(1 + 1/2 + … + 1/C) = lr·H_C`` in all. Equal keys look like the worst case: gradient ascent
on the largest eigenvalue of ``Σ_j lr'_j k_j k_jᵀ`` over unit keys stays under H_C
(``tests/ops/test_titans_gram_rate.py``; a numerical search, not a proof). So
``lr_max = 0.5 / H_C`` (0.148 at C = 16, 0.105 at C = 64, against 0.031 and 0.0078; H_C is
``nlx.nn.neural_memory_config.chunk_step_units``) keeps a chunk's step below about 0.5. The sum
is causal (a token's rate never depends on a later key) and is taken over the token's gradient
chunk only: chunks aligned with the call's start (or continuing a chunk of ``offset`` tokens
that an earlier call began, whose keys ``keys`` carries) and with each document's first token
(``reset``). ``s`` is a step-size bound, not part of the model's function: no gradient flows
through it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nlx.memory.recurrent import chunk_positions

Array = jax.Array


def gram_rates(lr: Array, k: Array, chunk_size: int, offset=None, keys: Optional[Array] = None,
               reset: Optional[Array] = None) -> tuple[Array, Array]:
  """The gram rates ``lr'`` of the module docstring, and the keys of the chunk left in progress.

  Args:
    lr: ``[B, T, H]``; k: ``[B, T, H, K]``.
    chunk_size: C, the gradient chunk.
    offset: None (a chunk starts at the call's first token), an int or ``[B]`` int array: tokens
      of the first chunk that an earlier call wrote.
    keys: ``[B, H, C, K]`` or None (zeros): the keys of that chunk, slot i holding its i-th token
      (slots from ``offset`` on are ignored).
    reset: ``[B, T]`` bool or None: a document (and a chunk) starts at each true token.

  Returns:
    ``(lr' [B, T, H] in lr's dtype, keys [B, H, C, K])``, the latter the keys of the chunk in
    progress after the call (slot i for its i-th token, zeros past its length), float32 or wider.
  """
  b, t, h, dk = k.shape
  c = chunk_size
  dtype = jnp.promote_types(k.dtype, jnp.float32)
  k = jax.lax.stop_gradient(k).astype(dtype)
  off = jnp.broadcast_to(jnp.asarray(0 if offset is None else offset, jnp.int32), (b,))
  prev = (jnp.zeros((b, c, h, dk), dtype) if keys is None else
          jnp.moveaxis(jax.lax.stop_gradient(keys).astype(dtype), 1, 2))
  # ext[:, :C] holds the earlier call's keys so that slot i sits at C − offset + i, just before
  # the call's first token (index C): a token's chunk is then a run of ext ending at it.
  roll = jax.vmap(lambda x, s: jnp.roll(x, s, axis=0))
  ext = jnp.concatenate([roll(prev, c - off), k], axis=1)  # [B, C + T, H, K]
  rows = jnp.zeros((b, t), bool) if reset is None else jnp.asarray(reset).astype(bool)
  position = jax.vmap(lambda r, o: chunk_positions(r, o, c))(rows, off)  # [B, T]

  def add(d, s):  # the key d tokens back, where it is in the token's chunk
    other = jax.lax.dynamic_slice_in_dim(ext, c - d, t, axis=1)
    dot = jnp.abs(jnp.sum(k * other, axis=-1))  # [B, T, H]
    return s + jnp.where((d <= position)[..., None], dot, 0.0)

  s = jax.lax.fori_loop(0, c, add, jnp.zeros((b, t, h), dtype))
  rate = (lr.astype(dtype) / jnp.maximum(1.0, s)).astype(lr.dtype)
  n = (position[:, -1] + 1) % c  # [B]: tokens of the chunk left in progress
  tail = roll(ext[:, t:], n)  # slot i <- ext[C + T − n + i]
  tail = jnp.where((jnp.arange(c)[None, :] < n[:, None])[..., None, None], tail, 0.0)
  return rate, jnp.moveaxis(tail, 2, 1)
