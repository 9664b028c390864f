"""TPU kernels (Pallas, Mosaic lowering) for the chunked associative-memory update.

Same algorithm and per-chunk code as the GPU kernels (``chunk.py``), with TPU plumbing: the grid
is (batch·head, value block, chunk) with the chunk axis innermost and sequential
(``"arbitrary"``), so Pallas pipelines each chunk's tiles from HBM into VMEM while the previous
chunk computes; the ``[K, block_v]`` state lives in a VMEM scratch buffer across the chunk axis.
The backward kernel maps the chunk axis in reverse through its index maps. Tiles are ``[C, K]``,
``[C, block_v]``, ``[C, 4]`` (gate columns), ``[4, C]`` (gate rows) and ``[K, block_v]`` (states),
every one either lane-aligned or spanning its array's full trailing dimensions, as Mosaic requires.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import phases
from pallas_kernels.chunked_memory.chunk import GATE_CHANNELS, Chunk, State, chunk_step, chunk_vjp, last_row

Array = jax.Array
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _specs(dk: int, block_v: int, chunk: int, num_chunks: int, reverse: bool):
  """BlockSpecs of the sequence inputs (q, k, v, gate columns, gate rows) for grid (bh, vb, n)."""
  at = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)
  return [
      pl.BlockSpec((None, chunk, dk), lambda bh, vb, n: (bh, at(n), 0)),
      pl.BlockSpec((None, chunk, dk), lambda bh, vb, n: (bh, at(n), 0)),
      pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, at(n), vb)),
      pl.BlockSpec((None, chunk, GATE_CHANNELS), lambda bh, vb, n: (bh, at(n), 0)),
      pl.BlockSpec((None, GATE_CHANNELS, chunk),
                   lambda bh, vb, n: (bh * num_chunks + at(n), 0, 0)),
  ]


def _state_spec(dk: int, block_v: int):
  return pl.BlockSpec((None, dk, block_v), lambda bh, vb, n: (bh, 0, vb))


def _starts_spec(dk: int, block_v: int, num_chunks: int, reverse: bool):
  at = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)
  return pl.BlockSpec((None, None, dk, block_v), lambda bh, vb, n: (bh, at(n), 0, vb))


def _chunk(refs) -> Chunk:
  q_ref, k_ref, v_ref, gc_ref, gr_ref = refs
  f32 = lambda r: r[...].astype(jnp.float32)
  return Chunk(f32(q_ref), f32(k_ref), f32(v_ref), gc_ref[...], gr_ref[...])


def _call(kernel, out_shape, grid, in_specs, out_specs, scratch, name, interpret, debug, cost):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch, name=name, debug=debug, cost_estimate=cost,
      interpret=pltpu.InterpretParams() if interpret else False,
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS))


def forward(kind: str, scale: float, q: Array, k: Array, v: Array, gates_col: Array,
            gates_row: Array, w0: Array, p0: Optional[Array], *, chunk: int, last: int,
            block_v: int, save_states: bool, interpret: bool = False, debug: bool = False,
            segmented: bool = False):
  """Forward kernel; same contract as ``kernel_gpu.forward`` (``segmented`` included)."""
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  num_chunks = tp // chunk
  momentum = p0 is not None
  n_in = 7 if momentum else 6
  n_out = len(lay.forward_out_shapes(q, v, chunk, momentum, save_states))

  def kernel(*refs):
    ins, outs, scratch = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
    o_ref, final_refs = outs[0], outs[1:3 if momentum else 2]
    start_refs = outs[3 if momentum else 2:]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
      for s_ref, i_ref in zip(scratch, ins[5:]):
        s_ref[...] = i_ref[...]

    state = State(scratch[0][...], scratch[1][...] if momentum else None)
    for s_ref, x in zip(start_refs, state):
      s_ref[...] = x
    o, new = chunk_step(kind, scale, _chunk(ins[:5]), state,
                        last_row(n, num_chunks, chunk, last), segmented=segmented, dtype=q.dtype)
    o_ref[...] = o.astype(o_ref.dtype)
    for s_ref, x in zip(scratch, new):
      s_ref[...] = x

    @pl.when(n == num_chunks - 1)
    def _():
      for f_ref, x in zip(final_refs, new):
        f_ref[...] = x

  state_spec = _state_spec(dk, block_v)
  in_specs = _specs(dk, block_v, chunk, num_chunks, False) + [state_spec] * (n_in - 5)
  out_specs = [pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, n, vb))]
  out_specs += [state_spec] * (2 if momentum else 1)
  if save_states:
    out_specs += [_starts_spec(dk, block_v, num_chunks, False)] * (2 if momentum else 1)
  scratch = [pltpu.VMEM((dk, block_v), jnp.float32)] * (2 if momentum else 1)
  args = (q, k, v, gates_col, gates_row.reshape(-1, GATE_CHANNELS, chunk), w0)
  args += (p0,) if momentum else ()
  out_shape = lay.forward_out_shapes(q, v, chunk, momentum, save_states)
  cost = lay.cost_estimate(kind, args, out_shape, chunk, block_v, momentum, False)
  outs = _call(kernel, out_shape, (bh_count, dv // block_v, num_chunks), in_specs, out_specs,
               scratch, f"nlx_{kind}_fwd", interpret, debug, cost)(*args)
  return lay.split_forward_outs(outs, momentum, save_states)


def backward(kind: str, scale: float, q: Array, k: Array, v: Array, gates_col: Array,
             gates_row: Array, starts: State, d_o: Array, d_final: State, *, chunk: int,
             last: int, block_v: int, interpret: bool = False, debug: bool = False,
             segmented: bool = False):
  """Backward kernel; same contract as ``kernel_gpu.backward`` (``segmented`` included)."""
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  num_chunks = tp // chunk
  momentum = starts.momentum is not None
  n_states = 2 if momentum else 1
  n_in = 5 + 2 * n_states + 1
  shapes = lay.backward_out_shapes(q, v, chunk, block_v, momentum)

  def kernel(*refs):
    ins, outs, scratch = refs[:n_in], refs[n_in:n_in + len(shapes)], refs[n_in + len(shapes):]
    start_refs, do_ref = ins[5:5 + n_states], ins[5 + n_states]
    d_final_refs = ins[6 + n_states:]
    dq_ref, dk_ref, dv_ref, dgc_ref, dgr_ref = outs[:5]
    d_initial_refs = outs[5:]
    i = pl.program_id(2)
    n = num_chunks - 1 - i

    @pl.when(i == 0)
    def _():
      for s_ref, d_ref in zip(scratch, d_final_refs):
        s_ref[...] = d_ref[...]

    d_state = State(scratch[0][...], scratch[1][...] if momentum else None)
    start = State(start_refs[0][...], start_refs[1][...] if momentum else None)
    d_ch, d_start = chunk_vjp(kind, scale, _chunk(ins[:5]), start,
                              last_row(n, num_chunks, chunk, last),
                              do_ref[...].astype(jnp.float32), d_state, segmented)
    dq_ref[...], dk_ref[...], dv_ref[...] = d_ch.q, d_ch.k, d_ch.v
    dgc_ref[...], dgr_ref[...] = d_ch.gates_col, d_ch.gates_row
    for s_ref, x in zip(scratch, d_start):
      s_ref[...] = x

    @pl.when(i == num_chunks - 1)
    def _():
      for d_ref, x in zip(d_initial_refs, d_start):
        d_ref[...] = x

  rev = lambda n: num_chunks - 1 - n
  state_spec = _state_spec(dk, block_v)
  in_specs = _specs(dk, block_v, chunk, num_chunks, True)
  in_specs += [_starts_spec(dk, block_v, num_chunks, True)] * n_states
  in_specs += [pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, rev(n), vb))]
  in_specs += [state_spec] * n_states
  partial = lambda d: pl.BlockSpec((None, None, chunk, d), lambda bh, vb, n: (vb, bh, rev(n), 0))
  out_specs = [partial(dk), partial(dk),
               pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, rev(n), vb)),
               partial(GATE_CHANNELS),
               pl.BlockSpec((None, None, GATE_CHANNELS, chunk),
                            lambda bh, vb, n: (vb, bh * num_chunks + rev(n), 0, 0))]
  out_specs += [state_spec] * n_states
  flat_shapes = list(shapes)
  nv = dv // block_v
  flat_shapes[4] = jax.ShapeDtypeStruct((nv, bh_count * num_chunks, GATE_CHANNELS, chunk),
                                        jnp.float32)
  args = (q, k, v, gates_col, gates_row.reshape(-1, GATE_CHANNELS, chunk)) + tuple(
      x for x in starts if x is not None) + (d_o,) + tuple(x for x in d_final if x is not None)
  cost = lay.cost_estimate(kind, args, flat_shapes, chunk, block_v, momentum, True)
  outs = _call(kernel, flat_shapes, (bh_count, nv, num_chunks), in_specs, out_specs,
               [pltpu.VMEM((dk, block_v), jnp.float32)] * n_states, f"nlx_{kind}_bwd",
               interpret, debug, cost)(*args)
  dgr = outs[4].reshape(nv, bh_count, num_chunks, GATE_CHANNELS, chunk)
  return outs[0], outs[1], outs[2], outs[3], dgr, State(outs[5], outs[6] if momentum else None)


# --- The delta rule in phases (``phases.py``): parallel UT, lean sequential state, parallel output.


def _pcall(kernel, out_shape, grid, in_specs, out_specs, semantics, name, interpret, debug, cost,
           scratch=()):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=list(scratch), name=name, debug=debug, cost_estimate=cost,
      interpret=pltpu.InterpretParams() if interpret else False,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _f32(ref):
  return ref[...].astype(jnp.float32)


def delta_forward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                  gates_row: Array, w0: Array, *, chunk: int, last: int, block_v: int,
                  interpret: bool = False, debug: bool = False, segmented: bool = False,
                  kind: str = "delta_rule"):
  """Same contract as ``kernel_gpu.delta_forward`` (``kind`` included).

  Grids: UT (batch·head, chunk), both parallel; state (batch·head, value block, chunk), the chunk
  axis sequential with the state in a VMEM scratch; output (batch·head, chunk, value block), all
  parallel.
  """
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp // chunk, dv // block_v
  dt = q.dtype
  f32 = jnp.float32
  gr = gates_row.reshape(-1, GATE_CHANNELS, chunk)
  seq2 = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, n: (bh, n, 0))
  gr2 = pl.BlockSpec((None, GATE_CHANNELS, chunk), lambda bh, n: (bh * n_chunks + n, 0, 0))

  def ut_kernel(k_ref, v_ref, gc_ref, gr_ref, w_ref, u0_ref):
    n = pl.program_id(1)
    w, u0 = phases.ut(_f32(k_ref), _f32(v_ref), gc_ref[...], gr_ref[...],
                      last_row(n, n_chunks, chunk, last), segmented, dt)
    w_ref[...] = w.astype(w_ref.dtype)
    u0_ref[...] = u0.astype(u0_ref.dtype)

  delta = kind == "delta_rule"
  w, u0 = None, v
  if delta:
    w, u0 = _pcall(
        ut_kernel, [jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)],
        (bh_count, n_chunks), [seq2(dk), seq2(dv), seq2(GATE_CHANNELS), gr2],
        [seq2(dk), seq2(dv)], ("parallel", "parallel"), "nlx_delta_rule_fwd_ut",
        interpret, debug, lay.phase_cost("ut", bh_count, n_chunks, chunk, dk, dv, dt))(
            k, v, gates_col, gr)

  seq3 = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, vb, n: (bh, n, 0))
  seq3v = pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, n, vb))
  state3 = pl.BlockSpec((None, dk, block_v), lambda bh, vb, n: (bh, 0, vb))
  starts3 = pl.BlockSpec((None, None, dk, block_v), lambda bh, vb, n: (bh, n, 0, vb))

  def state_kernel(*refs):
    if delta:
      w_ref, u0_ref, k_ref, gc_ref, s0_ref, starts_ref, u_ref, final_ref, s_ref = refs
    else:
      u0_ref, k_ref, gc_ref, s0_ref, starts_ref, final_ref, s_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
      s_ref[...] = s0_ref[...]

    s = s_ref[...]
    starts_ref[...] = s
    u, s1 = phases.state_step(_f32(w_ref) if delta else None, _f32(u0_ref), _f32(k_ref),
                              gc_ref[...], s, last_row(n, n_chunks, chunk, last), segmented, dt)
    if delta:
      u_ref[...] = u.astype(u_ref.dtype)
    s_ref[...] = s1

    @pl.when(n == n_chunks - 1)
    def _():
      final_ref[...] = s1

  starts_shape = jax.ShapeDtypeStruct((bh_count, n_chunks, dk, dv), f32)
  u_shape = [jax.ShapeDtypeStruct(v.shape, dt)] if delta else []
  outs = _pcall(
      state_kernel, [starts_shape] + u_shape + [jax.ShapeDtypeStruct(w0.shape, f32)],
      (bh_count, nv, n_chunks),
      ([seq3(dk)] if delta else []) + [seq3v, seq3(dk), seq3(GATE_CHANNELS), state3],
      [starts3] + ([seq3v] if delta else []) + [state3], _SEMANTICS, f"nlx_{kind}_fwd_state",
      interpret, debug, lay.phase_cost("state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      [pltpu.VMEM((dk, block_v), f32)])(*(((w,) if delta else ()) + (u0, k, gates_col, w0)))
  starts, u, final = outs if delta else (outs[0], v, outs[1])

  seqo = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, n, vb: (bh, n, 0))
  seqov = pl.BlockSpec((None, chunk, block_v), lambda bh, n, vb: (bh, n, vb))
  gro = pl.BlockSpec((None, GATE_CHANNELS, chunk), lambda bh, n, vb: (bh * n_chunks + n, 0, 0))
  startso = pl.BlockSpec((None, None, dk, block_v), lambda bh, n, vb: (bh, n, 0, vb))

  def out_kernel(q_ref, k_ref, gc_ref, gr_ref, starts_ref, u_ref, o_ref):
    n = pl.program_id(1)
    o = phases.output(_f32(q_ref), _f32(k_ref), gc_ref[...], gr_ref[...], starts_ref[...],
                      _f32(u_ref), last_row(n, n_chunks, chunk, last), scale, segmented, dt)
    o_ref[...] = o.astype(o_ref.dtype)

  o = _pcall(out_kernel, jax.ShapeDtypeStruct(v.shape, dt), (bh_count, n_chunks, nv),
             [seqo(dk), seqo(dk), seqo(GATE_CHANNELS), gro, startso, seqov], seqov,
             ("parallel",) * 3, f"nlx_{kind}_fwd_out", interpret, debug,
             lay.phase_cost("out", bh_count, n_chunks, chunk, dk, dv, dt))(
                 q, k, gates_col, gr, starts, u)
  return o, final, starts, w


def delta_backward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, starts: Array, w: Array, d_o: Array, d_final: Array, *,
                   chunk: int, last: int, block_v: int, interpret: bool = False,
                   debug: bool = False, segmented: bool = False, kind: str = "delta_rule"):
  """Same contract as ``kernel_gpu.delta_backward`` (``kind`` included)."""
  delta = kind == "delta_rule"
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp // chunk, dv // block_v
  dt = q.dtype
  f32 = jnp.float32
  gr = gates_row.reshape(-1, GATE_CHANNELS, chunk)

  seqo = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, n, vb: (bh, n, 0))
  seqov = pl.BlockSpec((None, chunk, block_v), lambda bh, n, vb: (bh, n, vb))
  gro = pl.BlockSpec((None, GATE_CHANNELS, chunk), lambda bh, n, vb: (bh * n_chunks + n, 0, 0))

  def dvl_kernel(q_ref, k_ref, gc_ref, gr_ref, do_ref, dvl_ref):
    dvl_ref[...] = phases.dv_local(_f32(q_ref), _f32(k_ref), gc_ref[...], gr_ref[...],
                                   _f32(do_ref), scale, segmented, dt)

  dvl = None
  if delta:
    dvl = _pcall(dvl_kernel, jax.ShapeDtypeStruct(v.shape, f32), (bh_count, n_chunks, nv),
                 [seqo(dk), seqo(dk), seqo(GATE_CHANNELS), gro, seqov], seqov, ("parallel",) * 3,
                 "nlx_delta_rule_bwd_dvl", interpret, debug,
                 lay.phase_cost("dvl", bh_count, n_chunks, chunk, dk, dv, dt))(
                     q, k, gates_col, gr, d_o)

  rev = lambda n: n_chunks - 1 - n
  seq3 = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, vb, n: (bh, rev(n), 0))
  seq3v = pl.BlockSpec((None, chunk, block_v), lambda bh, vb, n: (bh, rev(n), vb))
  state3 = pl.BlockSpec((None, dk, block_v), lambda bh, vb, n: (bh, 0, vb))
  ends3 = pl.BlockSpec((None, None, dk, block_v), lambda bh, vb, n: (bh, rev(n), 0, vb))

  def state_kernel(*refs):
    if delta:
      q_ref, k_ref, w_ref, gc_ref, dvl_ref, do_ref, dfin_ref, dends_ref, dinit_ref, ds_ref = refs
    else:
      q_ref, k_ref, gc_ref, do_ref, dfin_ref, dends_ref, dinit_ref, ds_ref = refs
      w_ref = dvl_ref = None
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
      ds_ref[...] = dfin_ref[...]

    d_s1 = ds_ref[...]
    dends_ref[...] = d_s1
    d_s0 = phases.state_step_bwd(_f32(q_ref), _f32(k_ref), _f32(w_ref) if delta else None,
                                 gc_ref[...], dvl_ref[...] if delta else None, _f32(do_ref), d_s1,
                                 last_row(rev(i), n_chunks, chunk, last), scale, segmented, dt)
    ds_ref[...] = d_s0

    @pl.when(i == n_chunks - 1)
    def _():
      dinit_ref[...] = d_s0

  d_ends, d_initial = _pcall(
      state_kernel,
      [jax.ShapeDtypeStruct(starts.shape, f32), jax.ShapeDtypeStruct(d_final.shape, f32)],
      (bh_count, nv, n_chunks),
      ([seq3(dk), seq3(dk), seq3(dk), seq3(GATE_CHANNELS), seq3v, seq3v, state3] if delta else
       [seq3(dk), seq3(dk), seq3(GATE_CHANNELS), seq3v, state3]),
      [ends3, state3], _SEMANTICS, f"nlx_{kind}_bwd_state", interpret, debug,
      lay.phase_cost("bwd_state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      [pltpu.VMEM((dk, block_v), f32)])(
          *((q, k, w, gates_col, dvl, d_o, d_final) if delta else (q, k, gates_col, d_o, d_final)))

  seq2 = lambda d: pl.BlockSpec((None, chunk, d), lambda bh, n: (bh, n, 0))
  gr2 = pl.BlockSpec((None, GATE_CHANNELS, chunk), lambda bh, n: (bh * n_chunks + n, 0, 0))
  full2 = pl.BlockSpec((None, None, dk, dv), lambda bh, n: (bh, n, 0, 0))

  def grad_kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, starts_ref, do_ref, dends_ref,
                  dq_ref, dk_ref, dv_ref, dgc_ref):
    n = pl.program_id(1)
    d_ch = phases.grad(_f32(q_ref), _f32(k_ref), _f32(v_ref), gc_ref[...], gr_ref[...],
                       starts_ref[...], _f32(do_ref), dends_ref[...],
                       last_row(n, n_chunks, chunk, last), scale, segmented, dt, kind)
    dq_ref[...], dk_ref[...], dv_ref[...] = d_ch.q, d_ch.k, d_ch.v
    dgc_ref[...] = d_ch.gates_col

  sds = lambda x: jax.ShapeDtypeStruct(x.shape, f32)
  dq, dk_, dv_, dgc = _pcall(
      grad_kernel, [sds(q), sds(k), sds(v), sds(gates_col)], (bh_count, n_chunks),
      [seq2(dk), seq2(dk), seq2(dv), seq2(GATE_CHANNELS), gr2, full2, seq2(dv), full2],
      [seq2(dk), seq2(dk), seq2(dv), seq2(GATE_CHANNELS)], ("parallel", "parallel"),
      f"nlx_{kind}_bwd_grad", interpret, debug,
      lay.phase_cost("grad", bh_count, n_chunks, chunk, dk, dv, dt, kind))(
          q, k, v, gates_col, gr, starts, d_o, d_ends)
  dgr = jnp.zeros(gates_row.shape, f32)  # phases.grad puts the gates' gradient in the column
  return dq, dk_, dv_, dgc, dgr, d_initial
