"""Packed documents in HOPE when the output memory has chunks of its own: ``memory_chunk_size``
S < ``hope_chunk_size`` C (S divides C). ``nlx.nn.hope.SelfModifyingTitans._packed`` and
``_continue`` (with document boundaries) call ``documents``; S = C keeps their one-pass buffer.

A document alone writes its components (the k, v, (q), η, α memories) in chunks of C and its
output memory in sub-chunks of S, both counted from its first token. Nothing the components
compute depends on the output memory: every token's write inputs (q, k, v, the rate η', log α)
come from the components' state at the start of the token's chunk of C. So a packed sequence runs
in two passes, each in ``nlx.memory.core.document_slots``' buffer at its own chunk size:

1. the components, in buffer chunks of C: a document's first chunk may start anywhere and
   straddle two buffer chunks (its tokens, ``fresh``, read, make their targets and take their
   gradients at the initial memories; a reset restores them), its later chunks are aligned with
   buffer chunks. The pass gives every token's write inputs, gathered back to token order;
2. the output memory, in buffer chunks of S: the same layout at chunk size S, so that its
   sub-chunks start at the document's first token plus multiples of S, as alone (a document's
   first sub-chunk straddles as above; every chunk of C starts a sub-chunk since S divides C).

Buffers: ``buffer_chunks(T, C)·C`` and ``buffer_chunks(T, S)·S`` slots (under 2T + 2C and
2T + 2S; exactly T for S = 1), against the first alone for S = C; the stateful path adds one
chunk to each. Buffer chunks that hold placeholders only in every row are skipped
(``jax.lax.cond``, ``skip_empty``; the one-pass buffer uses it too). The cost against S = C: the two memory groups write in
two scans instead of one (as the sub-chunk path without documents writes the output memory apart
from the components), and the write inputs (q, k, v ``[B, T, H, dk]``, η', log α ``[B, T, H]``)
go through memory between the passes. (A single layout that starts every document on a buffer
chunk would make each buffer chunk a plain chunk, but its static worst case, T one-token
documents, is T chunks of C slots: C times the sequence, and T chunk states kept for the
backward pass.)
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from nlx.memory import core

Array = jax.Array


def time_major(a: Optional[Array]) -> Optional[Array]:
  return None if a is None else jnp.moveaxis(a, 1, 0)


def batch_major(a: Optional[Array]) -> Optional[Array]:
  return None if a is None else jnp.moveaxis(a, 0, 1)


def place(x: Optional[Array], slots: Array, size: int, fill=0) -> Optional[Array]:
  """``x [B, T, ...]`` put at ``slots [B, T]`` of a buffer ``[B, size, ...]`` filled with
  ``fill`` (None passes through)."""
  if x is None:
    return None
  return jax.vmap(lambda xs, ss: core.place_at_slots(xs, ss, size, fill))(x, slots)


def _split(tree, lo: int) -> tuple:
  """Stacked memories ``{name: [B, H', ...]}`` -> (heads ``:lo``, heads ``lo:``); None -> Nones."""
  if tree is None:
    return None, None
  return jax.tree.map(lambda x: x[:, :lo], tree), jax.tree.map(lambda x: x[:, lo:], tree)


def join(a, b):
  """Two groups of stacked memories ``{name: [B, H', ...]}`` joined on the head axis."""
  return None if a is None else jax.tree.map(lambda x, y: jnp.concatenate([x, y], 1), a, b)


def documents(mixer, start: tuple, seqs: tuple, reset: Array, live: Array, extra: int = 0,
              chunk_of: Optional[Callable[[Array, int], Array]] = None) -> tuple:
  """A packed sequence in the two passes of the module docstring.

  Args:
    mixer: the ``SelfModifyingTitans``.
    start: ``(weights, momentum)`` of every memory, stacked as ``HopeState.memories`` holds them
      (components, then the output memory); the state before the first token, which starts a
      chunk of C (and so a sub-chunk of S).
    seqs: ``(q, k, v [B, L, H, dk], momentum [B, L, H] or None)``, the mixer's inputs.
    reset: ``[B, L]`` bool, document starts; live: ``[B, L]`` bool, false at tokens that only
      fill the row (they write nothing).
    extra: buffer chunks beyond those the tokens need.
    chunk_of: ``(slots [B, L], size) -> [B]``: the buffer chunk, in a pass's layout, whose start
      state to return (None: none).

  Returns:
    ``(o [B, L, H, dk], picked)``: ``picked`` the stacked ``(weights, momentum)`` at those
    buffer chunks' starts, or None.
  """
  heads = len(mixer.names) * mixer.heads
  (w_c, w_m), (p_c, p_m) = _split(start[0], heads), _split(start[1], heads)
  inputs, comps = _pass(functools.partial(_components, mixer), (w_c, p_c), seqs, (0, 0, 0, 1),
                        reset, live, mixer.chunk, extra, chunk_of)
  o, out = _pass(functools.partial(_output, mixer), (w_m, p_m), inputs + (seqs[3],),
                 (0, 0, 0, 0, 0, 1), reset, live, mixer.cfg.memory_chunk_size, extra, chunk_of)
  return o, None if chunk_of is None else (join(comps[0], out[0]), join(comps[1], out[1]))


def _pass(body, carry, xs: tuple, fills: tuple, reset: Array, live: Array, size: int,
          extra: int, chunk_of) -> tuple:
  """``body`` over the buffer chunks of ``size`` slots of ``xs`` (``[B, L, ...]``, placeholders
  ``fills``) with the flags ``(reset, fresh, live)``: ``(ys [B, L, ...], picked or None)``."""
  b, length = reset.shape
  slots, _, fresh = core.batched(lambda r: core.document_slots(r, 0, size), 1)(reset)
  n = core.buffer_chunks(length, size) + extra
  placed = tuple(place(x, slots, n * size, fill) for x, fill in zip(xs, fills))
  placed += tuple(place(f, slots, n * size, False) for f in (reset, fresh, live))
  chunks = jax.tree.map(lambda a: time_major(a).reshape((n, size) + a.shape[:1] + a.shape[2:]),
                        placed)
  step = skip_empty(body)
  if chunk_of is None:
    _, ys = jax.lax.scan(step, carry, chunks)
    picked = None
  else:
    target = chunk_of(slots, size)

    def pick(both, x):  # keeps each row's state at the start of its buffer chunk `target`
      (state, kept), (i, chunk) = both, x
      hit = lambda a: jnp.reshape(i == target, (b,) + (1,) * (a.ndim - 1))
      kept = jax.tree.map(lambda a, k: jnp.where(hit(a), a, k), state, kept)
      state, y = step(state, chunk)
      return (state, kept), y

    (_, picked), ys = jax.lax.scan(pick, (carry, carry), (jnp.arange(n), chunks))
  gather = lambda y: jax.vmap(lambda a, s: a[s])(
      batch_major(y.reshape((n * size,) + y.shape[2:])), slots)
  return jax.tree.map(gather, ys), picked


def skip_empty(body):
  """``body`` (batch-major) on a time-major buffer chunk ``[size, B, ...]``, rematerialised in
  the backward pass, and skipped when no row has a token in the chunk (its last flag, ``live``):
  such a chunk holds placeholders only, which write nothing; its outputs are never read."""
  def run(carry, chunk):
    carry, y = body(carry, jax.tree.map(batch_major, chunk))
    return carry, jax.tree.map(time_major, y)

  run = jax.checkpoint(run)

  def step(carry, chunk):
    shapes = jax.eval_shape(run, carry, chunk)[1]
    skip = lambda carry, chunk: (carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                     shapes))
    return jax.lax.cond(jnp.any(chunk[-1]), run, skip, carry, chunk)

  return step


def _tile(x: Optional[Array], n: int) -> Optional[Array]:
  return None if x is None else jnp.tile(x, (1, 1, n) + (1,) * (x.ndim - 3))


def _components(mixer, carry, chunk):
  """A buffer chunk ``[B, C, ...]`` of the first pass: the components' reads (at the initial
  memories where ``fresh``) make the write inputs ``(q, k, v, lr, log_alpha)``; then the
  components' write (``SelfModifyingTitans.write`` with the flags)."""
  (w, p), (q, k, v, momentum, reset, fresh, live) = carry, chunk
  n = len(mixer.names)
  init = _split(mixer._initial(q.shape[0])[0], n * mixer.heads)[0]
  q, k, v, lr, log_alpha = mixer._derive(w, q, k, v, momentum, init, fresh)
  lr = jnp.where(live[:, :, None], lr, 0.0)
  log_alpha = None if log_alpha is None else jnp.where(live[:, :, None], log_alpha, 0.0)
  target = jnp.where(fresh[:, :, None, None], mixer._targets(init, v, n),
                     mixer._targets(w, v, n))
  (w, p), _ = mixer.write(w, p, _tile(k, n), target, _tile(lr, n), _tile(log_alpha, n),
                          _tile(momentum, n), (reset, fresh, live), init)
  return (w, p), (q, k, v, lr, log_alpha)


def _output(mixer, carry, chunk):
  """A buffer chunk ``[B, S, ...]`` of the second pass: the output memory's targets (at the
  initial memory where ``fresh``), write and reads."""
  (w, p), (q, k, v, lr, log_alpha, momentum, reset, fresh, live) = carry, chunk
  init = _split(mixer._initial(q.shape[0])[0], len(mixer.names) * mixer.heads)[1]
  target = jnp.where(fresh[:, :, None, None], mixer._targets(init, v, 1), mixer._targets(w, v, 1))
  (w, p), reader = mixer.write(w, p, k, target, lr, log_alpha, momentum, (reset, fresh, live),
                               init)
  return (w, p), mixer.output(q, reader)
