"""Titans' GPU kernels (Pallas, Triton lowering) in phases (``titans_phases.py``).

Forward: ``nlx_titans_fwd_coef`` (momentum only; one program per (batch·head, chunk): the write
coefficients γ and c), ``nlx_titans_fwd_state`` (one program per (batch·head, value block): the
chunk walk carrying the memory and the momentum, storing both at every chunk's start) and
``nlx_titans_fwd_out`` (one program per (batch·head, chunk, value block)). Backward:
``nlx_titans_bwd_dvl`` (``Pᵀ dO``, parallel), ``nlx_titans_bwd_state`` (the reverse walk
carrying ``dS`` and ``dP``, storing them at every chunk's end) and ``nlx_titans_bwd_grad``
(``titans_phases.grad``, parallel over (batch·head, chunk, value block); q, k and gate gradients
are partial sums over value blocks). Same layouts as ``kernel_gpu``'s phase kernels.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import titans_phases as tp
from pallas_kernels.chunked_memory.chunk import State, last_row

Array = jax.Array
KIND = "titans"


def _f32(x):
  return x.astype(jnp.float32)


def _kw(launch, phase, num_warps, num_stages, interpret, debug):
  warps, stages = (launch or {}).get(phase, (num_warps, num_stages))
  return dict(interpret=interpret, debug=debug,
              compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages))


def titans_forward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, w0: Array, p0: Optional[Array], *, chunk: int, last: int,
                   block_v: int, num_warps: int = 4, num_stages: int = 1,
                   interpret: bool = False, debug: bool = False,
                   launch: Optional[dict] = None, segmented: bool = False):
  """Titans' forward pass as two or three kernels on the kernels' layout (``layout.py``).

  Returns:
    ``(o [BH, Tp, V] in q's dtype, final State [BH, K, V], start states State [BH, N, K, V],
    coef [BH, Tp, 4] float32 or None)``; the start states and coef are the backward's residuals.
  """
  bh_count, tp_len, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp_len // chunk, dv // block_v
  dt, f32 = q.dtype, jnp.float32
  momentum = p0 is not None
  kw = lambda phase: _kw(launch, phase, num_warps, num_stages, interpret, debug)
  cost = lambda phase: lay.phase_cost(phase, bh_count, n_chunks, chunk, dk, dv, dt, KIND,
                                      momentum)
  last_of = lambda n: last_row(n, n_chunks, chunk, last)

  coef = None
  if momentum:
    def coef_kernel(gc_ref, gr_ref, coef_ref):
      bh, n = pl.program_id(0), pl.program_id(1)
      rows = pl.ds(n * chunk, chunk)
      coef_ref[bh, rows, :] = tp.coefficients(gc_ref[bh, rows, :], gr_ref[bh, n, :, :],
                                              last_of(n), segmented)

    coef = pl.pallas_call(
        coef_kernel, grid=(bh_count, n_chunks), name="nlx_titans_fwd_coef",
        out_shape=jax.ShapeDtypeStruct(gates_col.shape, f32), cost_estimate=cost("coef"),
        **kw("fwd_coef"))(gates_col, gates_row)

  def state_kernel(*refs):
    if momentum:
      (k_ref, v_ref, gc_ref, coef_ref, s0_ref, p0_ref, s_starts, p_starts, s_fin,
       p_fin) = refs
    else:
      k_ref, v_ref, gc_ref, s0_ref, s_starts, s_fin = refs
    bh, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)

    def body(n, state):
      rows = pl.ds(n * chunk, chunk)
      s, p = state
      s_starts[bh, n, :, cols] = s
      if momentum:
        p_starts[bh, n, :, cols] = p
      return tp.state_step(_f32(k_ref[bh, rows, :]), _f32(v_ref[bh, rows, cols]),
                           gc_ref[bh, rows, :], coef_ref[bh, rows, :] if momentum else None,
                           s, p, last_of(n), dt, segmented)

    start = (s0_ref[bh, :, cols], p0_ref[bh, :, cols] if momentum else None)
    s1, p1 = jax.lax.fori_loop(0, n_chunks, body, start)
    s_fin[bh, :, cols] = s1
    if momentum:
      p_fin[bh, :, cols] = p1

  starts_shape = jax.ShapeDtypeStruct((bh_count, n_chunks, dk, dv), f32)
  state_shape = jax.ShapeDtypeStruct(w0.shape, f32)
  n_st = 2 if momentum else 1
  args = (k, v, gates_col) + ((coef, w0, p0) if momentum else (w0,))
  outs = pl.pallas_call(
      state_kernel, grid=(bh_count, nv), name="nlx_titans_fwd_state",
      out_shape=[starts_shape] * n_st + [state_shape] * n_st, cost_estimate=cost("state"),
      **kw("fwd_state"))(*args)
  starts = State(outs[0], outs[1] if momentum else None)
  final = State(outs[n_st], outs[n_st + 1] if momentum else None)

  def out_kernel(*refs):
    if momentum:
      q_ref, k_ref, v_ref, gc_ref, gr_ref, s_ref, p_ref, o_ref = refs
    else:
      q_ref, k_ref, v_ref, gc_ref, gr_ref, s_ref, o_ref = refs
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * block_v, block_v)
    o = tp.output(_f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]), _f32(v_ref[bh, rows, cols]),
                  gc_ref[bh, rows, :], gr_ref[bh, n, :, :], s_ref[bh, n, :, cols],
                  p_ref[bh, n, :, cols] if momentum else None, last_of(n), scale, dt,
                  segmented)
    o_ref[bh, rows, cols] = o.astype(o_ref.dtype)

  o = pl.pallas_call(
      out_kernel, grid=(bh_count, n_chunks, nv), name="nlx_titans_fwd_out",
      out_shape=jax.ShapeDtypeStruct(v.shape, dt), cost_estimate=cost("out"),
      **kw("fwd_out"))(q, k, v, gates_col, gates_row,
                       *((starts.memory, starts.momentum) if momentum else (starts.memory,)))
  return o, final, starts, coef


def titans_backward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                    gates_row: Array, starts: State, coef: Optional[Array], d_o: Array,
                    d_final: State, *, chunk: int, last: int, block_v: int,
                    num_warps: int = 4, num_stages: int = 1, interpret: bool = False,
                    debug: bool = False, launch: Optional[dict] = None,
                    grad_block_v: Optional[int] = None, segmented: bool = False):
  """Titans' backward pass as three kernels, from ``titans_forward``'s residuals.

  Returns:
    ``(dq, dk, dv, d_gates_col, d_gates_row, d_initial State)``, float32, shaped like the inputs.
  """
  bh_count, tp_len, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp_len // chunk, dv // block_v
  dt, f32 = q.dtype, jnp.float32
  momentum = starts.momentum is not None
  kw = lambda phase: _kw(launch, phase, num_warps, num_stages, interpret, debug)
  cost = lambda phase: lay.phase_cost(phase, bh_count, n_chunks, chunk, dk, dv, dt, KIND,
                                      momentum)
  last_of = lambda n: last_row(n, n_chunks, chunk, last)

  def dvl_kernel(q_ref, k_ref, gc_ref, gr_ref, do_ref, dvl_ref):
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * block_v, block_v)
    dvl_ref[bh, rows, cols] = tp.dv_local(
        _f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]), gc_ref[bh, rows, :],
        gr_ref[bh, n, :, :], _f32(do_ref[bh, rows, cols]), last_of(n), momentum, scale, dt,
        segmented)

  dvl = pl.pallas_call(
      dvl_kernel, grid=(bh_count, n_chunks, nv), name="nlx_titans_bwd_dvl",
      out_shape=jax.ShapeDtypeStruct(v.shape, f32), cost_estimate=cost("dvl"),
      **kw("bwd_dvl"))(q, k, gates_col, gates_row, d_o)

  def state_kernel(*refs):
    if momentum:
      (q_ref, k_ref, gc_ref, coef_ref, dvl_ref, do_ref, dsf_ref, dpf_ref, ds_ends, dp_ends,
       ds_init, dp_init) = refs
    else:
      q_ref, k_ref, gc_ref, dvl_ref, do_ref, dsf_ref, ds_ends, ds_init = refs
    bh, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)

    def body(i, d_state):
      n = n_chunks - 1 - i
      rows = pl.ds(n * chunk, chunk)
      d_s1, d_p1 = d_state
      ds_ends[bh, n, :, cols] = d_s1
      if momentum:
        dp_ends[bh, n, :, cols] = d_p1
      return tp.state_step_bwd(
          _f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]), gc_ref[bh, rows, :],
          coef_ref[bh, rows, :] if momentum else None, dvl_ref[bh, rows, cols],
          _f32(do_ref[bh, rows, cols]), d_s1, d_p1, last_of(n), scale, dt, segmented)

    start = (dsf_ref[bh, :, cols], dpf_ref[bh, :, cols] if momentum else None)
    d_s0, d_p0 = jax.lax.fori_loop(0, n_chunks, body, start)
    ds_init[bh, :, cols] = d_s0
    if momentum:
      dp_init[bh, :, cols] = d_p0

  n_st = 2 if momentum else 1
  ends_shape = jax.ShapeDtypeStruct(starts.memory.shape, f32)
  init_shape = jax.ShapeDtypeStruct(d_final.memory.shape, f32)
  args = ((q, k, gates_col, coef, dvl, d_o, d_final.memory, d_final.momentum) if momentum
          else (q, k, gates_col, dvl, d_o, d_final.memory))
  outs = pl.pallas_call(
      state_kernel, grid=(bh_count, nv), name="nlx_titans_bwd_state",
      out_shape=[ends_shape] * n_st + [init_shape] * n_st, cost_estimate=cost("bwd_state"),
      **kw("bwd_state"))(*args)
  d_ends = State(outs[0], outs[1] if momentum else None)
  d_initial = State(outs[n_st], outs[n_st + 1] if momentum else None)

  gbv = grad_block_v or block_v
  nvg = dv // gbv

  def grad_kernel(*refs):
    if momentum:
      (q_ref, k_ref, v_ref, gc_ref, gr_ref, s_ref, p_ref, do_ref, dse_ref, dpe_ref,
       dq_ref, dk_ref, dv_ref, dgc_ref) = refs
    else:
      (q_ref, k_ref, v_ref, gc_ref, gr_ref, s_ref, do_ref, dse_ref,
       dq_ref, dk_ref, dv_ref, dgc_ref) = refs
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * gbv, gbv)
    d_ch = tp.grad(_f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]),
                   _f32(v_ref[bh, rows, cols]), gc_ref[bh, rows, :], gr_ref[bh, n, :, :],
                   s_ref[bh, n, :, cols], p_ref[bh, n, :, cols] if momentum else None,
                   _f32(do_ref[bh, rows, cols]), dse_ref[bh, n, :, cols],
                   dpe_ref[bh, n, :, cols] if momentum else None, last_of(n), scale, dt,
                   segmented)
    dq_ref[vb, bh, rows, :] = d_ch.q
    dk_ref[vb, bh, rows, :] = d_ch.k
    dv_ref[bh, rows, cols] = d_ch.v
    dgc_ref[vb, bh, rows, :] = d_ch.gates_col

  per_block = lambda x: jax.ShapeDtypeStruct((nvg,) + x.shape, f32)
  args = ((q, k, v, gates_col, gates_row, starts.memory, starts.momentum, d_o, d_ends.memory,
           d_ends.momentum) if momentum else
          (q, k, v, gates_col, gates_row, starts.memory, d_o, d_ends.memory))
  dq, dk_, dv_, dgc = pl.pallas_call(
      grad_kernel, grid=(bh_count, n_chunks, nvg), name="nlx_titans_bwd_grad",
      out_shape=[per_block(q), per_block(k), jax.ShapeDtypeStruct(v.shape, f32),
                 per_block(gates_col)], cost_estimate=cost("grad"), **kw("bwd_grad"))(*args)
  dq, dk_, dgc = (x.sum(0) if nvg > 1 else x[0] for x in (dq, dk_, dgc))
  dgr = jnp.zeros(gates_row.shape, f32)  # titans_phases.grad puts the gates' gradient in the column
  return dq, dk_, dv_, dgc, dgr, d_initial
