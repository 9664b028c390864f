"""The kernels' algorithm in plain JAX: a ``lax.scan`` over chunks of ``chunk.chunk_step``.

``forward`` and ``backward`` are exactly what the kernels compute, on the kernels' layout
(``layout.py``): the forward pass keeps each chunk's start state, the backward pass runs the
chunks in reverse, recomputing each from its start state and pulling gradients back through it
(``chunk.chunk_vjp``), carrying the gradient of the state. ``chunked_memory_reference`` is the
same forward pass on the ``nlx.ops`` layout, differentiated by JAX (pure jnp, no custom rules):
the tests check the kernels' forward and hand-scheduled backward against it, and everything
against the token-by-token recurrence of ``nlx.ops``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import phases
from pallas_kernels.chunked_memory.chunk import Chunk, State, chunk_step, chunk_vjp, last_row

Array = jax.Array


def _chunks(q, k, v, gates_col, gates_row, lo: lay.Layout) -> Chunk:
  """One slice's inputs as chunk-major float32 arrays ``[N, C, …]`` / ``[N, 4, C]``."""
  n, c = lo.num_chunks, lo.chunk
  split = lambda x: x.astype(jnp.float32).reshape(n, c, x.shape[-1])
  return Chunk(split(q), split(k), split(v), split(gates_col), gates_row)


def forward(kind: str, scale: float, q: Array, k: Array, v: Array, gates_col: Array,
            gates_row: Array, w0: Array, p0: Optional[Array], lo: lay.Layout,
            segmented: bool = False):
  """Forward pass on the kernels' layout (``segmented``: the gates carry document boundaries).

  Returns:
    ``(o [BH, Tp, V] float32, final State [BH, K, V], start states State [BH, N, K, V])``.
  """

  def one(q, k, v, gc, gr, w, p):
    def body(state, x):
      index, ch = x
      last = last_row(index, lo.num_chunks, lo.chunk, lo.last)
      o, new = chunk_step(kind, scale, ch, state, last, segmented=segmented)
      return new, (o, state)

    xs = (jnp.arange(lo.num_chunks), _chunks(q, k, v, gc, gr, lo))
    final, (o, starts) = jax.lax.scan(body, State(w, p), xs)
    return o.reshape(lo.padded_len, -1), final, starts

  return jax.vmap(one)(q, k, v, gates_col, gates_row, w0, p0)


def backward(kind: str, scale: float, q: Array, k: Array, v: Array, gates_col: Array,
             gates_row: Array, starts: State, d_o: Array, d_final: State, lo: lay.Layout,
             segmented: bool = False):
  """Backward pass on the kernels' layout, from the forward pass's chunk start states.

  Returns:
    ``(dq, dk, dv, d_gates_col, d_gates_row, d_initial State)``, float32, shaped like the inputs.
  """

  def one(q, k, v, gc, gr, starts, d_o, d_final):
    def body(d_state, x):
      index, ch, start, d_oc = x
      last = last_row(index, lo.num_chunks, lo.chunk, lo.last)
      d_ch, d_start = chunk_vjp(kind, scale, ch, start, last, d_oc, d_state, segmented)
      return d_start, d_ch

    d_oc = d_o.astype(jnp.float32).reshape(lo.num_chunks, lo.chunk, -1)
    xs = (jnp.arange(lo.num_chunks), _chunks(q, k, v, gc, gr, lo), starts, d_oc)
    d_initial, d_ch = jax.lax.scan(body, d_final, xs, reverse=True)
    flat = lambda x: x.reshape(lo.padded_len, x.shape[-1])
    return flat(d_ch.q), flat(d_ch.k), flat(d_ch.v), flat(d_ch.gates_col), d_ch.gates_row, d_initial

  return jax.vmap(one)(q, k, v, gates_col, gates_row, starts, d_o, d_final)


def chunked_memory_reference(kind: str, q: Array, k: Array, v: Array, *,
                             beta: Optional[Array] = None, g: Optional[Array] = None,
                             momentum: Optional[Array] = None,
                             initial_state: Optional[Array] = None,
                             initial_momentum: Optional[Array] = None,
                             scale: Optional[float] = None,
                             chunk_size: int = 64, reset: Optional[Array] = None):
  """``ops.chunked_memory`` in plain differentiable JAX (same arguments and results)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if scale is None:
    scale = 1.0 if kind == "titans" else dk**-0.5
  lo = lay.Layout(b, t, h, chunk_size)
  gc, gr = lay.gates(beta, g, momentum, lo, reset)
  w0 = lay.states(initial_state, b, h, dk, dv)
  if reset is not None:
    w0 = lay.reset_at_start(w0, reset, h)
  p0 = None if momentum is None else lay.states(initial_momentum, b, h, dk, dv)
  o, final, _ = forward(kind, scale, lay.sequences(q, lo), lay.sequences(k, lo),
                        lay.sequences(v, lo), gc, gr, w0, p0, lo, reset is not None)
  unstate = lambda x: None if x is None else x.reshape(b, h, dk, dv)
  return lay.unsequences(o, lo).astype(q.dtype), unstate(final.memory), unstate(final.momentum)


def forward_phased(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, w0: Array, lo: lay.Layout, segmented: bool = False,
                   dtype=None):
  """The delta rule's forward pass in the three phases of ``phases.py`` (what the phase kernels
  run), on the kernels' layout.

  Returns:
    ``(o [BH, Tp, V] float32, final state [BH, K, V], start states [BH, N, K, V], w [BH, Tp, K],
    u [BH, Tp, V])``.
  """
  n, c = lo.num_chunks, lo.chunk
  lasts = last_row(jnp.arange(n), n, c, lo.last)
  split = lambda x: x.astype(jnp.float32).reshape(n, c, x.shape[-1])

  def one(q, k, v, gc, gr, s0):
    qc, kc, vc, gcc = split(q), split(k), split(v), split(gc)
    w, u0 = jax.vmap(lambda kk, vv, g1, g2, l: phases.ut(kk, vv, g1, g2, l, segmented, dtype))(
        kc, vc, gcc, gr, lasts)

    def body(s, x):
      wi, ui, ki, gi, li = x
      u, s1 = phases.state_step(wi, ui, ki, gi, s, li, segmented, dtype)
      return s1, (s, u)

    final, (starts, u) = jax.lax.scan(body, s0, (w, u0, kc, gcc, lasts))
    o = jax.vmap(lambda qq, kk, g1, g2, s, uu, l: phases.output(
        qq, kk, g1, g2, s, uu, l, scale, segmented, dtype))(qc, kc, gcc, gr, starts, u, lasts)
    flat = lambda x: x.reshape(lo.padded_len, x.shape[-1])
    return flat(o), final, starts, flat(w), flat(u)

  return jax.vmap(one)(q, k, v, gates_col, gates_row, w0)


def backward_phased(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                    gates_row: Array, starts: Array, w: Array, d_o: Array, d_final: Array,
                    lo: lay.Layout, segmented: bool = False, dtype=None):
  """The delta rule's backward pass in the phases of ``phases.py``, from ``forward_phased``'s
  start states and ``w``.

  Returns:
    ``(dq, dk, dv, d_gates_col, d_gates_row, d_initial)``, float32, shaped like the inputs.
  """
  n, c = lo.num_chunks, lo.chunk
  lasts = last_row(jnp.arange(n), n, c, lo.last)
  split = lambda x: x.astype(jnp.float32).reshape(n, c, x.shape[-1])

  def one(q, k, v, gc, gr, starts, w, d_o, d_final):
    qc, kc, vc, gcc, wc, doc = split(q), split(k), split(v), split(gc), split(w), split(d_o)
    dv_loc = jax.vmap(lambda qq, kk, g1, g2, dd: phases.dv_local(
        qq, kk, g1, g2, dd, scale, segmented, dtype))(qc, kc, gcc, gr, doc)

    def body(d_s1, x):
      qi, ki, wi, gi, dvi, doi, li = x
      return phases.state_step_bwd(qi, ki, wi, gi, dvi, doi, d_s1, li, scale, segmented,
                                   dtype), d_s1

    d_initial, d_ends = jax.lax.scan(body, d_final, (qc, kc, wc, gcc, dv_loc, doc, lasts),
                                     reverse=True)

    def grads(ch, s0, d_oc, d_s1, li):
      d_ch, _ = chunk_vjp("delta_rule", scale, ch, State(s0, None), li, d_oc,
                          State(d_s1, None), segmented, dtype)
      return d_ch

    d_ch = jax.vmap(grads)(Chunk(qc, kc, vc, gcc, gr), starts, doc, d_ends, lasts)
    flat = lambda x: x.reshape(lo.padded_len, x.shape[-1])
    return (flat(d_ch.q), flat(d_ch.k), flat(d_ch.v), flat(d_ch.gates_col), d_ch.gates_row,
            d_initial)

  return jax.vmap(one)(q, k, v, gates_col, gates_row, starts, w, d_o, d_final)
