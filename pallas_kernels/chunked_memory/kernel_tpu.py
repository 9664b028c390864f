"""TPU kernels (Pallas, Mosaic lowering) of the delta rule and linear attention in phases.

Same algorithm and per-chunk code as the GPU kernels (``phases.py``), with TPU plumbing: the
sequential kernels' grid is (batch·head, value block, step) with the step axis innermost and
sequential (``"arbitrary"``), so Pallas pipelines each step's tiles from HBM into VMEM while the
previous step computes; the ``[K, block_v]`` state lives in a VMEM scratch buffer across the step
axis, and the backward maps the step axis in reverse through its index maps. The parallel
kernels mark every grid axis ``"parallel"``. Tiles come from ``_Tiles``: several chunks per grid
step, lane-dense ``[4, m·C]`` gate rows and head-strided q/k/v/o. Every tile is either
lane-aligned or spans its array's full trailing dimensions, as Mosaic requires. Titans' kernels
(``kernel_tpu_titans``) use the same ``_Tiles``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import phases
from pallas_kernels.chunked_memory.chunk import GATE_CHANNELS, last_row

Array = jax.Array
_SEMANTICS = ("parallel", "parallel", "arbitrary")


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


class _Tiles:
  """Where a phase kernel's tiles come from (TPU).

  * Head-strided (``heads > 0``): q, k, v, o and their gradients stay in the ops' memory order,
    ``[B, Tp, H·D]`` (a free reshape of ``[B, Tp, H, D]``), and each BlockSpec's index map picks
    batch ``bh // H`` and the lane block of head ``bh % H``: no XLA transpose in or out. Mosaic
    needs the lane block (D or the value block) to be a multiple of 128 for this.
  * Otherwise (``heads == 0``): ``[B·H, Tp, D]`` from ``layout.sequences``.
  * ``per_step`` chunks per grid step: every sequence tile is ``[per_step·C, D]``, gate rows
    ``[per_step, 4, C]``, start states ``[per_step, K, block_v]``; the kernel walks the step's
    chunks in a loop (fewer grid steps, larger DMAs).
  """

  def __init__(self, q: Array, v: Array, chunk: int, heads: int, per_step: int, block_v: int):
    self.heads, self.chunk, self.m, self.block_v = heads, chunk, per_step, block_v
    if heads:
      b, tp, hk = q.shape
      self.bh, self.dk, self.dv = b * heads, hk // heads, v.shape[-1] // heads
    else:
      self.bh, tp, self.dk = q.shape
      self.dv = v.shape[-1]
    self.tp, self.n_chunks = tp, tp // chunk
    if self.n_chunks % per_step:
      raise ValueError(f"chunks_per_step={per_step} does not divide the {self.n_chunks} chunks")
    self.steps, self.nv, self.rows = self.n_chunks // per_step, self.dv // block_v, per_step * chunk

  def _at(self, bh, n, col, per_head):
    if self.heads:
      return (bh // self.heads, n, (bh % self.heads) * per_head + col)
    return (bh, n, col)

  def seq(self, order: str, value: bool = False, block_v: bool = True, reverse: bool = False):
    """A sequence tile for grid ``order`` ("bn", "bvn", "bnv"): keys (``value=False``), whole
    values (``block_v=False``) or a value block."""
    d = (self.block_v if block_v else self.dv) if value else self.dk
    per = self.dv // d if value else 1
    rev = (lambda n: self.steps - 1 - n) if reverse else (lambda n: n)
    if order == "bn":
      return pl.BlockSpec((None, self.rows, d), lambda bh, n: self._at(bh, rev(n), 0, per))
    if order == "bvn":
      return pl.BlockSpec((None, self.rows, d), lambda bh, vb, n: self._at(
          bh, rev(n), vb if (value and block_v) else 0, per))
    return pl.BlockSpec((None, self.rows, d), lambda bh, n, vb: self._at(
        bh, n, vb if (value and block_v) else 0, per))

  def gates(self, order: str, reverse: bool = False):
    """The step's gates, lane-dense: ``[4, per_step·C]`` rows of ``gate_rows``' array."""
    rev = (lambda n: self.steps - 1 - n) if reverse else (lambda n: n)
    shape = (None, None, GATE_CHANNELS, self.rows)
    if order == "bn":
      return pl.BlockSpec(shape, lambda bh, n: (bh, n, 0, 0))
    if order == "bvn":
      return pl.BlockSpec(shape, lambda bh, vb, n: (bh, rev(n), 0, 0))
    return pl.BlockSpec(shape, lambda bh, n, vb: (bh, n, 0, 0))

  def gate_rows(self, gates_col: Array) -> Array:
    """``[BH, Tp, 4] -> [BH, steps, 4, per_step·C]`` (XLA; float32 gates only)."""
    return gates_col.reshape(self.bh, self.steps, self.rows, GATE_CHANNELS).swapaxes(-1, -2)

  def _select(self, j):
    c, r = self.chunk, self.rows
    return (jax.lax.broadcasted_iota(jnp.int32, (c, r), 1)
            == jax.lax.broadcasted_iota(jnp.int32, (c, r), 0) + j * c)

  def gates_of(self, ref, j, row: bool = True):
    """Chunk ``j``'s gates as ``chunk.py`` takes them, a column ``[C, 4]`` and a row ``[4, C]``,
    built from the lane-dense ``[4, per_step·C]`` tile with iota masks and reductions (exact:
    every sum has one non-zero term)."""
    c = self.chunk
    rows = ref[...]
    sel = self._select(j)
    lane = jax.lax.broadcasted_iota(jnp.int32, (c, GATE_CHANNELS), 1)
    eye = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
           == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))
    sub = jax.lax.broadcasted_iota(jnp.int32, (GATE_CHANNELS, c), 0)
    col = jnp.zeros((c, GATE_CHANNELS), jnp.float32)
    out_row = jnp.zeros((GATE_CHANNELS, c), jnp.float32)
    for ch in range(GATE_CHANNELS):
      x = jnp.sum(jnp.where(sel, rows[ch:ch + 1, :], 0.0), axis=1, keepdims=True)  # [C, 1]
      col = jnp.where(lane == ch, x, col)
      if row:
        out_row = jnp.where(sub == ch, jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True),
                            out_row)
    return (col, out_row) if row else col

  def gates_back(self, d_col, j):
    """A chunk's ``[C, 4]`` gate-column gradient as its share of the ``[4, per_step·C]`` rows."""
    sel = self._select(j)
    lane = jax.lax.broadcasted_iota(jnp.int32, d_col.shape, 1)
    sub = jax.lax.broadcasted_iota(jnp.int32, (GATE_CHANNELS, self.rows), 0)
    out = jnp.zeros((GATE_CHANNELS, self.rows), jnp.float32)
    for ch in range(GATE_CHANNELS):
      x = jnp.sum(jnp.where(lane == ch, d_col, 0.0), axis=1, keepdims=True)  # [C, 1]
      out = jnp.where(sub == ch, jnp.sum(jnp.where(sel, x, 0.0), axis=0, keepdims=True), out)
    return out

  def starts(self, order: str, whole_v: bool = False, reverse: bool = False):
    bv = self.dv if whole_v else self.block_v
    rev = (lambda n: self.steps - 1 - n) if reverse else (lambda n: n)
    shape = (None, self.m, self.dk, bv)
    if order == "bn":
      return pl.BlockSpec(shape, lambda bh, n: (bh, n, 0, 0))
    if order == "bvn":
      return pl.BlockSpec(shape, lambda bh, vb, n: (bh, rev(n), 0, vb))
    return pl.BlockSpec(shape, lambda bh, n, vb: (bh, n, 0, vb))

  def state(self):
    return pl.BlockSpec((None, self.dk, self.block_v), lambda bh, vb, n: (bh, 0, vb))

  def rows_of(self, ref, j):
    """Chunk ``j`` of a ``[per_step·C, D]`` tile, as float32."""
    if self.m == 1:
      return ref[...].astype(jnp.float32)
    return ref[pl.ds(pl.multiple_of(j * self.chunk, self.chunk), self.chunk), :].astype(
        jnp.float32)

  def put_rows(self, ref, j, x):
    if self.m == 1:
      ref[...] = x.astype(ref.dtype)
    else:
      ref[pl.ds(pl.multiple_of(j * self.chunk, self.chunk), self.chunk), :] = x.astype(ref.dtype)

  def loop(self, body, carry=None, reverse: bool = False):
    """``body(j, carry)`` for the step's chunks j (in reverse order with ``reverse``)."""
    order = (lambda j: self.m - 1 - j) if reverse else (lambda j: j)
    if self.m == 1:
      return body(0, carry)
    return jax.lax.fori_loop(0, self.m, lambda j, c: body(order(j), c), carry)


# Tokens per grid step the phase kernels aim for (several chunks per step when C is smaller).
TOKENS_PER_STEP = 256


def chunks_per_step(n_chunks: int, chunk: int, tokens: int = TOKENS_PER_STEP) -> int:
  """The largest power of two m dividing ``n_chunks`` with m·C ≤ ``tokens`` (at least 1). At
  C = 64 and K = V = 128 the largest step (the gradient kernel's, m = 4) holds 4·(4 bf16 tiles +
  2 float32 states + 3 float32 gradient tiles) ≈ 1.2 MB, 2.4 MB double-buffered: well inside the
  16 MB default scoped VMEM of v5e and v5p."""
  m = 1
  while n_chunks % (2 * m) == 0 and 2 * m * chunk <= tokens:
    m *= 2
  return m


def delta_forward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                  gates_row: Array, w0: Array, *, chunk: int, last: int, block_v: int,
                  interpret: bool = False, debug: bool = False, segmented: bool = False,
                  kind: str = "delta_rule", heads: int = 0, per_step: int = 1):
  """Same contract as ``kernel_gpu.delta_forward`` (``kind`` included), plus the tiling of
  ``_Tiles``: ``heads > 0`` takes q, k, v as ``[B, Tp, H·D]`` and returns o so.

  Grids: UT (batch·head, step), both parallel; state (batch·head, value block, step), the step
  axis sequential with the state in a VMEM scratch; output (batch·head, step, value block), all
  parallel.
  """
  t = _Tiles(q, v, chunk, heads, per_step, block_v)
  bh_count, dk, dv, n_chunks, nv, steps = t.bh, t.dk, t.dv, t.n_chunks, t.nv, t.steps
  dt = q.dtype
  f32 = jnp.float32
  gt = t.gate_rows(gates_col)
  last_of = lambda n, j: last_row(n * t.m + j, n_chunks, chunk, last)

  def ut_kernel(k_ref, v_ref, g_ref, w_ref, u0_ref):
    n = pl.program_id(1)

    def body(j, carry):
      w, u0 = phases.ut(t.rows_of(k_ref, j), t.rows_of(v_ref, j), *t.gates_of(g_ref, j),
                        last_of(n, j), segmented, dt)
      t.put_rows(w_ref, j, w)
      t.put_rows(u0_ref, j, u0)
      return carry

    t.loop(body)

  delta = kind == "delta_rule"
  w, u0 = None, v
  if delta:
    w, u0 = _pcall(
        ut_kernel, [jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)],
        (bh_count, steps),
        [t.seq("bn"), t.seq("bn", True, False), t.gates("bn")],
        [t.seq("bn"), t.seq("bn", True, False)], ("parallel", "parallel"),
        "nlx_delta_rule_fwd_ut", interpret, debug,
        lay.phase_cost("ut", bh_count, n_chunks, chunk, dk, dv, dt))(k, v, gt)

  def state_kernel(*refs):
    if delta:
      w_ref, u0_ref, k_ref, g_ref, s0_ref, starts_ref, u_ref, final_ref, s_ref = refs
    else:
      u0_ref, k_ref, g_ref, s0_ref, starts_ref, final_ref, s_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
      s_ref[...] = s0_ref[...]

    def body(j, s):
      starts_ref[j] = s
      u, s1 = phases.state_step(t.rows_of(w_ref, j) if delta else None, t.rows_of(u0_ref, j),
                                t.rows_of(k_ref, j), t.gates_of(g_ref, j, False), s, last_of(n, j),
                                segmented, dt)
      if delta:
        t.put_rows(u_ref, j, u)
      return s1

    s1 = t.loop(body, s_ref[...])
    s_ref[...] = s1

    @pl.when(n == steps - 1)
    def _():
      final_ref[...] = s1

  starts_shape = jax.ShapeDtypeStruct((bh_count, n_chunks, dk, dv), f32)
  u_shape = [jax.ShapeDtypeStruct(v.shape, dt)] if delta else []
  seqv = t.seq("bvn", True)
  outs = _pcall(
      state_kernel, [starts_shape] + u_shape + [jax.ShapeDtypeStruct(w0.shape, f32)],
      (bh_count, nv, steps),
      ([t.seq("bvn")] if delta else []) + [seqv, t.seq("bvn"), t.gates("bvn"), t.state()],
      [t.starts("bvn")] + ([seqv] if delta else []) + [t.state()], _SEMANTICS,
      f"nlx_{kind}_fwd_state", interpret, debug,
      lay.phase_cost("state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      [pltpu.VMEM((dk, block_v), f32)])(*(((w,) if delta else ()) + (u0, k, gt, w0)))
  starts, u, final = outs if delta else (outs[0], v, outs[1])

  def out_kernel(q_ref, k_ref, g_ref, starts_ref, u_ref, o_ref):
    n = pl.program_id(1)

    def body(j, carry):
      o = phases.output(t.rows_of(q_ref, j), t.rows_of(k_ref, j), *t.gates_of(g_ref, j),
                        starts_ref[j], t.rows_of(u_ref, j), last_of(n, j), scale,
                        segmented, dt)
      t.put_rows(o_ref, j, o)
      return carry

    t.loop(body)

  seqov = t.seq("bnv", True)
  o = _pcall(out_kernel, jax.ShapeDtypeStruct(v.shape, dt), (bh_count, steps, nv),
             [t.seq("bnv"), t.seq("bnv"), t.gates("bnv"), t.starts("bnv"), seqov], seqov,
             ("parallel",) * 3, f"nlx_{kind}_fwd_out", interpret, debug,
             lay.phase_cost("out", bh_count, n_chunks, chunk, dk, dv, dt))(
                 q, k, gt, starts, u)
  return o, final, starts, w


def delta_backward(scale: float, q: Array, k: Array, v: Array, gates_col: Array,
                   gates_row: Array, starts: Array, w: Array, d_o: Array, d_final: Array, *,
                   chunk: int, last: int, block_v: int, interpret: bool = False,
                   debug: bool = False, segmented: bool = False, kind: str = "delta_rule",
                   heads: int = 0, per_step: int = 1):
  """Same contract as ``kernel_gpu.delta_backward`` (``kind`` included), tiled as
  ``delta_forward`` (``heads``, ``per_step``); dq, dk, dv come back in q, k, v's layout."""
  delta = kind == "delta_rule"
  t = _Tiles(q, v, chunk, heads, per_step, block_v)
  bh_count, dk, dv, n_chunks, nv, steps = t.bh, t.dk, t.dv, t.n_chunks, t.nv, t.steps
  dt = q.dtype
  f32 = jnp.float32
  gt = t.gate_rows(gates_col)
  last_of = lambda n, j: last_row(n * t.m + j, n_chunks, chunk, last)

  def dvl_kernel(q_ref, k_ref, g_ref, do_ref, dvl_ref):
    def body(j, carry):
      t.put_rows(dvl_ref, j, phases.dv_local(
          t.rows_of(q_ref, j), t.rows_of(k_ref, j), *t.gates_of(g_ref, j),
          t.rows_of(do_ref, j), scale, segmented, dt))
      return carry

    t.loop(body)

  dvl = None
  seqov = t.seq("bnv", True)
  if delta:
    dvl = _pcall(dvl_kernel, jax.ShapeDtypeStruct(v.shape, f32), (bh_count, steps, nv),
                 [t.seq("bnv"), t.seq("bnv"), t.gates("bnv"), seqov],
                 seqov, ("parallel",) * 3, "nlx_delta_rule_bwd_dvl", interpret, debug,
                 lay.phase_cost("dvl", bh_count, n_chunks, chunk, dk, dv, dt))(
                     q, k, gt, d_o)

  rev = lambda i: steps - 1 - i

  def state_kernel(*refs):
    if delta:
      q_ref, k_ref, w_ref, g_ref, dvl_ref, do_ref, dfin_ref, dends_ref, dinit_ref, ds_ref = refs
    else:
      q_ref, k_ref, g_ref, do_ref, dfin_ref, dends_ref, dinit_ref, ds_ref = refs
      w_ref = dvl_ref = None
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
      ds_ref[...] = dfin_ref[...]

    def body(j, d_s1):
      dends_ref[j] = d_s1
      return phases.state_step_bwd(
          t.rows_of(q_ref, j), t.rows_of(k_ref, j), t.rows_of(w_ref, j) if delta else None,
          t.gates_of(g_ref, j, False), t.rows_of(dvl_ref, j) if delta else None, t.rows_of(do_ref, j),
          d_s1, last_of(rev(i), j), scale, segmented, dt)

    d_s0 = t.loop(body, ds_ref[...], reverse=True)
    ds_ref[...] = d_s0

    @pl.when(i == steps - 1)
    def _():
      dinit_ref[...] = d_s0

  sk, sv = t.seq("bvn", reverse=True), t.seq("bvn", True, reverse=True)
  gc3 = t.gates("bvn", reverse=True)
  d_ends, d_initial = _pcall(
      state_kernel,
      [jax.ShapeDtypeStruct(starts.shape, f32), jax.ShapeDtypeStruct(d_final.shape, f32)],
      (bh_count, nv, steps),
      ([sk, sk, sk, gc3, sv, sv, t.state()] if delta else [sk, sk, gc3, sv, t.state()]),
      [t.starts("bvn", reverse=True), t.state()], _SEMANTICS, f"nlx_{kind}_bwd_state",
      interpret, debug, lay.phase_cost("bwd_state", bh_count, n_chunks, chunk, dk, dv, dt, kind),
      [pltpu.VMEM((dk, block_v), f32)])(
          *((q, k, w, gt, dvl, d_o, d_final) if delta else (q, k, gt, d_o, d_final)))

  def grad_kernel(q_ref, k_ref, v_ref, g_ref, starts_ref, do_ref, dends_ref,
                  dq_ref, dk_ref, dv_ref, dg_ref):
    n = pl.program_id(1)

    def body(j, d_gates):
      d_ch = phases.grad(t.rows_of(q_ref, j), t.rows_of(k_ref, j), t.rows_of(v_ref, j),
                         *t.gates_of(g_ref, j), starts_ref[j], t.rows_of(do_ref, j),
                         dends_ref[j], last_of(n, j), scale, segmented, dt, kind)
      for ref, x in ((dq_ref, d_ch.q), (dk_ref, d_ch.k), (dv_ref, d_ch.v)):
        t.put_rows(ref, j, x)
      return d_gates + t.gates_back(d_ch.gates_col, j)

    dg_ref[...] = t.loop(body, jnp.zeros((GATE_CHANNELS, t.rows), f32))

  sds = lambda x: jax.ShapeDtypeStruct(x.shape, f32)
  seqk, seqv = t.seq("bn"), t.seq("bn", True, False)
  dq, dk_, dv_, dg = _pcall(
      grad_kernel, [sds(q), sds(k), sds(v), sds(gt)], (bh_count, steps),
      [seqk, seqk, seqv, t.gates("bn"), t.starts("bn", whole_v=True), seqv,
       t.starts("bn", whole_v=True)],
      [seqk, seqk, seqv, t.gates("bn")], ("parallel", "parallel"),
      f"nlx_{kind}_bwd_grad", interpret, debug,
      lay.phase_cost("grad", bh_count, n_chunks, chunk, dk, dv, dt, kind))(
          q, k, v, gt, starts, d_o, d_ends)
  dgc = dg.swapaxes(-1, -2).reshape(gates_col.shape)  # back from the lane-dense rows
  dgr = jnp.zeros(gates_row.shape, f32)  # phases.grad puts the gates' gradient in the column
  return dq, dk_, dv_, dgc, dgr, d_initial
