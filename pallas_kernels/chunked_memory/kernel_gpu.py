"""GPU kernels (Pallas, Triton lowering) for the chunked associative-memory update.

Why Triton rather than Mosaic GPU: the per-chunk algebra (``chunk.py``) is a few small matmuls
and masked elementwise work on ``[C, C]`` tiles held in registers, which Pallas's Triton
lowering expresses directly (``lax.dot_general`` → ``tt.dot``) and which runs on every NVIDIA
GPU Triton supports, Hopper included. Pallas's Mosaic GPU lowering targets Hopper/Blackwell
warpgroup programming (TMA, wgmma, explicit pipelining): faster at the peak, but it lowers a much
smaller set of primitives (in jax 0.10.2 not even a plain ``dot_general`` at lane semantics), so
the shared chunk code could not run there unchanged. Triton is also what flash-linear-attention
uses, which makes the side-by-side benchmark a like-for-like comparison.

The delta rule and linear attention run as the phase kernels of ``phases.py`` (Titans' are in
``kernel_gpu_titans``): parallel kernels take one program per (batch·head, chunk[, value block]);
the sequential ones one program per (batch·head, value block), walking the chunks with the
``[K, block_v]`` state in registers (value columns of a linear memory never mix). Gradients of
q, k and the gates are partial sums over value blocks, added up here.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import phases
from pallas_kernels.chunked_memory.chunk import last_row

Array = jax.Array


def _f32(x):
  return x.astype(jnp.float32)


def _params(num_warps: int, num_stages: int):
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def delta_forward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                  gates_row: Array, w0: Array, *, chunk: int, last: int, block_v: int,
                  num_warps: int = 4, num_stages: int = 1, interpret: bool = False,
                  debug: bool = False, segmented: bool = False, launch: Optional[dict] = None,
                  kind: str = "delta_rule"):
  """The delta rule's forward pass as three kernels (``phases.py``); ``kind="linear_attention"``:
  the same without the UT kernel (``u = V``, ``W = None``).

  ``launch``: ``{phase: (num_warps, num_stages)}`` per kernel ("fwd_ut", "fwd_state", …; the
  table of ``ops.gpu_launch``); phases it lacks use ``num_warps``/``num_stages``.

  Returns:
    ``(o [BH, Tp, V] in q's dtype, final state [BH, K, V], start states [BH, N, K, V], w
    [BH, Tp, K] in q's dtype or None)``; the starts and w are the backward pass's residuals.
  """
  delta = kind == "delta_rule"
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp // chunk, dv // block_v
  dt = q.dtype
  kw = lambda phase: dict(interpret=interpret, debug=debug, compiler_params=_params(
      *(launch or {}).get(phase, (num_warps, num_stages))))

  def ut_kernel(k_ref, v_ref, gc_ref, gr_ref, w_ref, u0_ref):
    bh, n = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(n * chunk, chunk)
    w, u0 = phases.ut(_f32(k_ref[bh, rows, :]), _f32(v_ref[bh, rows, :]), gc_ref[bh, rows, :],
                      gr_ref[bh, n, :, :], last_row(n, n_chunks, chunk, last), segmented, dt)
    w_ref[bh, rows, :] = w.astype(w_ref.dtype)
    u0_ref[bh, rows, :] = u0.astype(u0_ref.dtype)

  w, u0 = None, v
  if delta:
    w, u0 = pl.pallas_call(
      ut_kernel, grid=(bh_count, n_chunks), name="nlx_delta_rule_fwd_ut",
      out_shape=[jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)],
      cost_estimate=lay.phase_cost("ut", bh_count, n_chunks, chunk, dk, dv, dt),
      **kw("fwd_ut"))(
          k, v, gates_col, gates_row)

  def state_kernel(*refs):
    if delta:
      w_ref, u0_ref, k_ref, gc_ref, s0_ref, starts_ref, u_ref, final_ref = refs
    else:
      (u0_ref, k_ref, gc_ref, s0_ref, starts_ref, final_ref), w_ref, u_ref = refs, None, None
    bh, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)

    def body(n, s):
      rows = pl.ds(n * chunk, chunk)
      starts_ref[bh, n, :, cols] = s
      u, s1 = phases.state_step(_f32(w_ref[bh, rows, :]) if delta else None,
                                _f32(u0_ref[bh, rows, cols]), _f32(k_ref[bh, rows, :]),
                                gc_ref[bh, rows, :], s, last_row(n, n_chunks, chunk, last),
                                segmented, dt)
      if delta:
        u_ref[bh, rows, cols] = u.astype(u_ref.dtype)
      return s1

    final_ref[bh, :, cols] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[bh, :, cols])

  f32 = jnp.float32
  starts_shape = jax.ShapeDtypeStruct((bh_count, n_chunks, dk, dv), f32)
  outs = pl.pallas_call(
      state_kernel, grid=(bh_count, nv), name=f"nlx_{kind}_fwd_state",
      out_shape=[starts_shape] + ([jax.ShapeDtypeStruct(v.shape, dt)] if delta else [])
      + [jax.ShapeDtypeStruct(w0.shape, f32)],
      cost_estimate=lay.phase_cost("state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      **kw("fwd_state"))(*(((w,) if delta else ()) + (u0, k, gates_col, w0)))
  starts, u, final = outs if delta else (outs[0], v, outs[1])

  def out_kernel(q_ref, k_ref, gc_ref, gr_ref, starts_ref, u_ref, o_ref):
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * block_v, block_v)
    o = phases.output(_f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]), gc_ref[bh, rows, :],
                      gr_ref[bh, n, :, :], starts_ref[bh, n, :, cols], _f32(u_ref[bh, rows, cols]),
                      last_row(n, n_chunks, chunk, last), scale, segmented, dt)
    o_ref[bh, rows, cols] = o.astype(o_ref.dtype)

  o = pl.pallas_call(
      out_kernel, grid=(bh_count, n_chunks, nv), name=f"nlx_{kind}_fwd_out",
      out_shape=jax.ShapeDtypeStruct(v.shape, dt),
      cost_estimate=lay.phase_cost("out", bh_count, n_chunks, chunk, dk, dv, dt),
      **kw("fwd_out"))(
          q, k, gates_col, gates_row, starts, u)
  return o, final, starts, w


def delta_backward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, starts: Array, w: Array, d_o: Array, d_final: Array, *,
                   chunk: int, last: int, block_v: int, num_warps: int = 4, num_stages: int = 1,
                   interpret: bool = False, debug: bool = False, segmented: bool = False,
                   launch: Optional[dict] = None, grad_block_v: Optional[int] = None,
                   kind: str = "delta_rule"):
  """The delta rule's backward pass as three kernels (``phases.py``); ``kind="linear_attention"``
  (``w`` None): without the ``Pᵀ dO`` kernel, which only the UT pullback needs.

  ``grad_block_v``: the value block of the per-chunk gradient kernel (None: ``block_v``); it
  needs the most shared memory of all (``ptx.py``), so it may take narrower blocks.

  Returns:
    ``(dq, dk, dv, d_gates_col, d_gates_row, d_initial)``, float32, shaped like the inputs.
  """
  bh_count, tp, dk = q.shape
  dv = v.shape[-1]
  n_chunks, nv = tp // chunk, dv // block_v
  dt = q.dtype
  f32 = jnp.float32
  kw = lambda phase: dict(interpret=interpret, debug=debug, compiler_params=_params(
      *(launch or {}).get(phase, (num_warps, num_stages))))

  def dvl_kernel(q_ref, k_ref, gc_ref, gr_ref, do_ref, dvl_ref):
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * block_v, block_v)
    dvl_ref[bh, rows, cols] = phases.dv_local(
        _f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]), gc_ref[bh, rows, :],
        gr_ref[bh, n, :, :], _f32(do_ref[bh, rows, cols]), scale, segmented, dt)

  delta = kind == "delta_rule"
  dvl = None
  if delta:
    dvl = pl.pallas_call(
      dvl_kernel, grid=(bh_count, n_chunks, nv), name="nlx_delta_rule_bwd_dvl",
      out_shape=jax.ShapeDtypeStruct(v.shape, f32),
      cost_estimate=lay.phase_cost("dvl", bh_count, n_chunks, chunk, dk, dv, dt),
      **kw("bwd_dvl"))(
          q, k, gates_col, gates_row, d_o)

  def state_kernel(*refs):
    if delta:
      q_ref, k_ref, w_ref, gc_ref, dvl_ref, do_ref, dfin_ref, dends_ref, dinit_ref = refs
    else:
      q_ref, k_ref, gc_ref, do_ref, dfin_ref, dends_ref, dinit_ref = refs
    bh, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)

    def body(i, d_s1):
      n = n_chunks - 1 - i
      rows = pl.ds(n * chunk, chunk)
      dends_ref[bh, n, :, cols] = d_s1
      return phases.state_step_bwd(
          _f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]),
          _f32(w_ref[bh, rows, :]) if delta else None, gc_ref[bh, rows, :],
          dvl_ref[bh, rows, cols] if delta else None, _f32(do_ref[bh, rows, cols]), d_s1,
          last_row(n, n_chunks, chunk, last), scale, segmented, dt)

    dinit_ref[bh, :, cols] = jax.lax.fori_loop(0, n_chunks, body, dfin_ref[bh, :, cols])

  d_ends, d_initial = pl.pallas_call(
      state_kernel, grid=(bh_count, nv), name=f"nlx_{kind}_bwd_state",
      out_shape=[jax.ShapeDtypeStruct(starts.shape, f32), jax.ShapeDtypeStruct(d_final.shape, f32)],
      cost_estimate=lay.phase_cost("bwd_state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      **kw("bwd_state"))(
          *((q, k, w, gates_col, dvl, d_o, d_final) if delta else (q, k, gates_col, d_o, d_final)))

  def grad_kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, starts_ref, do_ref, dends_ref,
                  dq_ref, dk_ref, dv_ref, dgc_ref):
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(n * chunk, chunk), pl.ds(vb * gbv, gbv)
    d_ch = phases.grad(_f32(q_ref[bh, rows, :]), _f32(k_ref[bh, rows, :]),
                       _f32(v_ref[bh, rows, cols]), gc_ref[bh, rows, :], gr_ref[bh, n, :, :],
                       starts_ref[bh, n, :, cols], _f32(do_ref[bh, rows, cols]),
                       dends_ref[bh, n, :, cols], last_row(n, n_chunks, chunk, last), scale,
                       segmented, dt, kind)
    dq_ref[vb, bh, rows, :] = d_ch.q
    dk_ref[vb, bh, rows, :] = d_ch.k
    dv_ref[bh, rows, cols] = d_ch.v
    dgc_ref[vb, bh, rows, :] = d_ch.gates_col

  # One program per (batch·head, chunk, value block of ``grad_block_v``); q, k and gate
  # gradients are partial sums over the value blocks, added up here (none with one block).
  gbv = grad_block_v or block_v
  nvg = dv // gbv
  per_block = lambda x: jax.ShapeDtypeStruct((nvg,) + x.shape, f32)
  dq, dk_, dv_, dgc = pl.pallas_call(
      grad_kernel, grid=(bh_count, n_chunks, nvg), name=f"nlx_{kind}_bwd_grad",
      out_shape=[per_block(q), per_block(k), jax.ShapeDtypeStruct(v.shape, f32),
                 per_block(gates_col)],
      cost_estimate=lay.phase_cost("grad", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      **kw("bwd_grad"))(q, k, v, gates_col, gates_row, starts, d_o, d_ends)
  dq, dk_, dgc = (x.sum(0) if nvg > 1 else x[0] for x in (dq, dk_, dgc))
  dgr = jnp.zeros(gates_row.shape, f32)  # phases.grad puts the gates' gradient in the column
  return dq, dk_, dv_, dgc, dgr, d_initial
