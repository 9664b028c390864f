"""Titans' TPU kernels (Pallas, Mosaic lowering) in phases (``titans_phases.py``).

The same six kernels as ``kernel_gpu_titans`` (``nlx_titans_fwd_coef`` with momentum only) with
the delta rule's TPU tiling (``kernel_tpu._Tiles``): several chunks per grid step, lane-dense
``[4, m·C]`` gate rows (the coefficient column γ, c travels in the same row layout), head-strided
BlockSpecs on ``[B, Tp, H·D]`` when K, V and the value block are multiples of 128. Grids:
coefficients and gradient (batch·head, step), parallel; state kernels (batch·head, value block,
step), the step axis sequential with the memory and the momentum in VMEM scratch buffers; output
and ``Pᵀ dO`` (batch·head, step, value block), parallel.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import titans_phases as tp
from pallas_kernels.chunked_memory.chunk import GATE_CHANNELS, State, last_row
from pallas_kernels.chunked_memory.kernel_tpu import _SEMANTICS, _Tiles, _pcall

Array = jax.Array
KIND = "titans"


def titans_forward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, w0: Array, p0: Optional[Array], *, chunk: int, last: int,
                   block_v: int, interpret: bool = False, debug: bool = False,
                   heads: int = 0, per_step: int = 1, segmented: bool = False):
  """Same contract as ``kernel_gpu_titans.titans_forward`` (coef in the lane-dense row layout
  ``[BH, steps, 4, m·C]``), tiled as ``kernel_tpu.delta_forward``."""
  del gates_row  # the gates reach the kernels as lane-dense rows built from the column
  t = _Tiles(q, v, chunk, heads, per_step, block_v)
  bh_count, dk, dv, n_chunks, nv, steps = t.bh, t.dk, t.dv, t.n_chunks, t.nv, t.steps
  dt, f32 = q.dtype, jnp.float32
  momentum = p0 is not None
  n_st = 2 if momentum else 1
  gt = t.gate_rows(gates_col)
  last_of = lambda n, j: last_row(n * t.m + j, n_chunks, chunk, last)
  cost = lambda phase: lay.phase_cost(phase, bh_count, n_chunks, chunk, dk, dv, dt, KIND,
                                      momentum)

  coef = None
  if momentum:
    def coef_kernel(g_ref, coef_ref):
      n = pl.program_id(1)

      def body(j, rows):
        return rows + t.gates_back(tp.coefficients(*t.gates_of(g_ref, j), last_of(n, j),
                                                     segmented), j)

      coef_ref[...] = t.loop(body, jnp.zeros((GATE_CHANNELS, t.rows), f32))

    coef = _pcall(coef_kernel, jax.ShapeDtypeStruct(gt.shape, f32), (bh_count, steps),
                  [t.gates("bn")], t.gates("bn"), ("parallel", "parallel"),
                  "nlx_titans_fwd_coef", interpret, debug, cost("coef"))(gt)

  def state_kernel(*refs):
    if momentum:
      (k_ref, v_ref, g_ref, coef_ref, s0_ref, p0_ref, s_starts, p_starts, s_fin, p_fin,
       s_ref, p_ref) = refs
    else:
      k_ref, v_ref, g_ref, s0_ref, s_starts, s_fin, s_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
      s_ref[...] = s0_ref[...]
      if momentum:
        p_ref[...] = p0_ref[...]

    def body(j, state):
      s, p = state
      s_starts[j] = s
      if momentum:
        p_starts[j] = p
      return tp.state_step(t.rows_of(k_ref, j), t.rows_of(v_ref, j), t.gates_of(g_ref, j, False),
                           t.gates_of(coef_ref, j, False) if momentum else None, s, p,
                           last_of(n, j), dt, segmented)

    s1, p1 = t.loop(body, (s_ref[...], p_ref[...] if momentum else None))
    s_ref[...] = s1
    if momentum:
      p_ref[...] = p1

    @pl.when(n == steps - 1)
    def _():
      s_fin[...] = s1
      if momentum:
        p_fin[...] = p1

  starts_shape = jax.ShapeDtypeStruct((bh_count, n_chunks, dk, dv), f32)
  state_shape = jax.ShapeDtypeStruct(w0.shape, f32)
  gates3 = [t.gates("bvn")] * n_st
  outs = _pcall(
      state_kernel, [starts_shape] * n_st + [state_shape] * n_st, (bh_count, nv, steps),
      [t.seq("bvn"), t.seq("bvn", True)] + gates3 + [t.state()] * n_st,
      [t.starts("bvn")] * n_st + [t.state()] * n_st, _SEMANTICS, "nlx_titans_fwd_state",
      interpret, debug, cost("state"), [pltpu.VMEM((dk, block_v), f32)] * n_st)(
          *((k, v, gt, coef, w0, p0) if momentum else (k, v, gt, w0)))
  starts = State(outs[0], outs[1] if momentum else None)
  final = State(outs[n_st], outs[n_st + 1] if momentum else None)

  def out_kernel(*refs):
    if momentum:
      q_ref, k_ref, v_ref, g_ref, s_ref, p_ref, o_ref = refs
    else:
      q_ref, k_ref, v_ref, g_ref, s_ref, o_ref = refs
    n = pl.program_id(1)

    def body(j, carry):
      o = tp.output(t.rows_of(q_ref, j), t.rows_of(k_ref, j), t.rows_of(v_ref, j),
                    *t.gates_of(g_ref, j), s_ref[j], p_ref[j] if momentum else None,
                    last_of(n, j), scale, dt, segmented)
      t.put_rows(o_ref, j, o)
      return carry

    t.loop(body)

  seqov = t.seq("bnv", True)
  o = _pcall(out_kernel, jax.ShapeDtypeStruct(v.shape, dt), (bh_count, steps, nv),
             [t.seq("bnv"), t.seq("bnv"), seqov, t.gates("bnv")] + [t.starts("bnv")] * n_st,
             seqov, ("parallel",) * 3, "nlx_titans_fwd_out", interpret, debug, cost("out"))(
                 q, k, v, gt, *[x for x in starts if x is not None])
  return o, final, starts, coef


def titans_backward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                    gates_row: Array, starts: State, coef: Optional[Array], d_o: Array,
                    d_final: State, *, chunk: int, last: int, block_v: int,
                    interpret: bool = False, debug: bool = False, heads: int = 0,
                    per_step: int = 1, segmented: bool = False):
  """Same contract as ``kernel_gpu_titans.titans_backward``, tiled as ``titans_forward``; the
  gradient kernel holds the whole V (no partial sums)."""
  t = _Tiles(q, v, chunk, heads, per_step, block_v)
  bh_count, dk, dv, n_chunks, nv, steps = t.bh, t.dk, t.dv, t.n_chunks, t.nv, t.steps
  dt, f32 = q.dtype, jnp.float32
  momentum = starts.momentum is not None
  n_st = 2 if momentum else 1
  gt = t.gate_rows(gates_col)
  last_of = lambda n, j: last_row(n * t.m + j, n_chunks, chunk, last)
  cost = lambda phase: lay.phase_cost(phase, bh_count, n_chunks, chunk, dk, dv, dt, KIND,
                                      momentum)

  def dvl_kernel(q_ref, k_ref, g_ref, do_ref, dvl_ref):
    n = pl.program_id(1)

    def body(j, carry):
      t.put_rows(dvl_ref, j, tp.dv_local(
          t.rows_of(q_ref, j), t.rows_of(k_ref, j), *t.gates_of(g_ref, j), t.rows_of(do_ref, j),
          last_of(n, j), momentum, scale, dt, segmented))
      return carry

    t.loop(body)

  seqov = t.seq("bnv", True)
  dvl = _pcall(dvl_kernel, jax.ShapeDtypeStruct(v.shape, f32), (bh_count, steps, nv),
               [t.seq("bnv"), t.seq("bnv"), t.gates("bnv"), seqov], seqov, ("parallel",) * 3,
               "nlx_titans_bwd_dvl", interpret, debug, cost("dvl"))(q, k, gt, d_o)

  rev = lambda i: steps - 1 - i

  def state_kernel(*refs):
    if momentum:
      (q_ref, k_ref, g_ref, coef_ref, dvl_ref, do_ref, dsf_ref, dpf_ref, ds_ends, dp_ends,
       ds_init, dp_init, ds_ref, dp_ref) = refs
    else:
      q_ref, k_ref, g_ref, dvl_ref, do_ref, dsf_ref, ds_ends, ds_init, ds_ref = refs
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
      ds_ref[...] = dsf_ref[...]
      if momentum:
        dp_ref[...] = dpf_ref[...]

    def body(j, d_state):
      d_s1, d_p1 = d_state
      ds_ends[j] = d_s1
      if momentum:
        dp_ends[j] = d_p1
      return tp.state_step_bwd(
          t.rows_of(q_ref, j), t.rows_of(k_ref, j), t.gates_of(g_ref, j, False),
          t.gates_of(coef_ref, j, False) if momentum else None, t.rows_of(dvl_ref, j),
          t.rows_of(do_ref, j), d_s1, d_p1, last_of(rev(i), j), scale, dt, segmented)

    d_s0, d_p0 = t.loop(body, (ds_ref[...], dp_ref[...] if momentum else None), reverse=True)
    ds_ref[...] = d_s0
    if momentum:
      dp_ref[...] = d_p0

    @pl.when(i == steps - 1)
    def _():
      ds_init[...] = d_s0
      if momentum:
        dp_init[...] = d_p0

  sk, sv = t.seq("bvn", reverse=True), t.seq("bvn", True, reverse=True)
  g3 = [t.gates("bvn", reverse=True)] * n_st
  outs = _pcall(
      state_kernel,
      [jax.ShapeDtypeStruct(starts.memory.shape, f32)] * n_st
      + [jax.ShapeDtypeStruct(d_final.memory.shape, f32)] * n_st,
      (bh_count, nv, steps), [sk, sk] + g3 + [sv, sv] + [t.state()] * n_st,
      [t.starts("bvn", reverse=True)] * n_st + [t.state()] * n_st, _SEMANTICS,
      "nlx_titans_bwd_state", interpret, debug, cost("bwd_state"),
      [pltpu.VMEM((dk, block_v), f32)] * n_st)(
          *((q, k, gt, coef, dvl, d_o, d_final.memory, d_final.momentum) if momentum
            else (q, k, gt, dvl, d_o, d_final.memory)))
  d_ends = State(outs[0], outs[1] if momentum else None)
  d_initial = State(outs[n_st], outs[n_st + 1] if momentum else None)

  def grad_kernel(*refs):
    if momentum:
      (q_ref, k_ref, v_ref, g_ref, s_ref, p_ref, do_ref, dse_ref, dpe_ref,
       dq_ref, dk_ref, dv_ref, dg_ref) = refs
    else:
      (q_ref, k_ref, v_ref, g_ref, s_ref, do_ref, dse_ref, dq_ref, dk_ref, dv_ref,
       dg_ref) = refs
    n = pl.program_id(1)

    def body(j, d_gates):
      d_ch = tp.grad(t.rows_of(q_ref, j), t.rows_of(k_ref, j), t.rows_of(v_ref, j),
                     *t.gates_of(g_ref, j), s_ref[j], p_ref[j] if momentum else None,
                     t.rows_of(do_ref, j), dse_ref[j], dpe_ref[j] if momentum else None,
                     last_of(n, j), scale, dt, segmented)
      for ref, x in ((dq_ref, d_ch.q), (dk_ref, d_ch.k), (dv_ref, d_ch.v)):
        t.put_rows(ref, j, x)
      return d_gates + t.gates_back(d_ch.gates_col, j)

    dg_ref[...] = t.loop(body, jnp.zeros((GATE_CHANNELS, t.rows), f32))

  sds = lambda x: jax.ShapeDtypeStruct(x.shape, f32)
  seqk, seqv = t.seq("bn"), t.seq("bn", True, False)
  whole = [t.starts("bn", whole_v=True)] * n_st
  dq, dk_, dv_, dg = _pcall(
      grad_kernel, [sds(q), sds(k), sds(v), sds(gt)], (bh_count, steps),
      [seqk, seqk, seqv, t.gates("bn")] + whole + [seqv] + whole,
      [seqk, seqk, seqv, t.gates("bn")], ("parallel", "parallel"), "nlx_titans_bwd_grad",
      interpret, debug, cost("grad"))(
          q, k, v, gt, *[x for x in starts if x is not None], d_o,
          *[x for x in d_ends if x is not None])
  dgc = dg.swapaxes(-1, -2).reshape(gates_col.shape)  # back from the lane-dense rows
  dgr = jnp.zeros(gates_row.shape, f32)
  return dq, dk_, dv_, dgc, dgr, d_initial
