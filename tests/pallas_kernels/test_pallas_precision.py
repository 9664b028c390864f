"""Kernels v2: the blocked UT inverse, the phase split, the precision contract and any head size.

* ``chunk.unit_lower_inverse`` (block doubling on matmuls) equals numpy's float64 inverse and the
  row-by-row substitution it replaced.
* ``reference.forward_phased``/``backward_phased`` (the delta rule in the phases that the kernels
  run, plain JAX) equal the one-chunk-at-a-time reference, with and without document boundaries;
  ``phases.grad`` (the gradient kernels' hand-written chunk gradient) equals ``chunk.chunk_vjp``.
* The kernels (interpret mode) against the float64 recurrence of ``nlx.ops``: every output and
  gradient within 1e-5 (float32 inputs) / 2e-2 (bfloat16 inputs) normwise relative error, at head
  sizes K=24, V=40 (padded by the wrapper) and T=45 (``benchmarks.kernels.agreement``, the table
  of ``python -m benchmarks.kernels --agreement``).
* Log-decays outside [LOG_DECAY_MIN, 0] (+5, −inf) are clamped: finite results.
* Titans in phases (``titans_phases``) against ``chunk.chunk_step`` and ``jax.vjp`` of it (the
  hand-written, momentum-aware chunk gradient), and the dtypes of every dot in its phases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kernels as bench
from pallas_kernels.chunked_memory import chunk as chunk_lib
from pallas_kernels.chunked_memory import layout as lay
from pallas_kernels.chunked_memory import ops as kops
from pallas_kernels.chunked_memory import reference
from pallas_kernels.chunked_memory.chunk import State


@pytest.mark.parametrize("c", [pytest.param(16, marks=pytest.mark.slow), 64,
                               pytest.param(128, marks=pytest.mark.slow)])
def test_blocked_inverse_matches_float64_and_row_substitution(c):
  ks = jax.random.split(jax.random.key(c), 2)
  k = jax.random.normal(ks[0], (c, 32))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(ks[1], (c,)))
  a = np.tril(np.asarray(beta)[:, None] * np.asarray(k @ k.T), -1).astype(np.float64)
  want = np.linalg.inv(np.eye(c) + a)
  a_t = jnp.asarray(a.T, jnp.float32)
  got = np.asarray(jax.jit(chunk_lib.unit_lower_inverse)(a_t), np.float64)
  rows = np.asarray(jax.jit(chunk_lib.unit_lower_inverse_rows)(a_t), np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-6 * scale
  assert np.abs(rows - want).max() <= 1e-6 * scale
  assert np.abs(np.tril(got) - got).max() == 0  # lower triangular, exactly


def _layout_inputs(reset):
  b, t, h, dk, dv, c = 2, 37, 2, 16, 32, 16
  x = bench.agreement_inputs("delta_rule", b, t, h, dk, dv, seed=11)
  lo = lay.Layout(b, t, h, c)
  gc, gr = lay.gates(x["beta"], x["g"], None, lo, reset)
  args = (lay.sequences(x["q"], lo), lay.sequences(x["k"], lo), lay.sequences(x["v"], lo), gc, gr)
  return args, lay.states(x["initial_state"], b, h, dk, dv), lo, dk**-0.5


@pytest.mark.slow  # ~25 s of compiling the scans; the kernels' agreement tests cover the phases
@pytest.mark.parametrize("with_reset", [False, True])
def test_phased_reference_equals_chunk_reference(with_reset):
  """The phase split is the same algebra: forward and backward, float32, 1e-5."""
  reset = None
  if with_reset:
    reset = jnp.zeros((2, 37), bool).at[0, 0].set(True).at[0, 5].set(True).at[1, 16].set(True)
  args, w0, lo, scale = _layout_inputs(reset)
  seg = reset is not None

  @jax.jit
  def both(args, w0, d_o, d_f):
    o1, f1, st1 = reference.forward("delta_rule", scale, *args, w0, None, lo, seg)
    o2, f2, st2, w, _ = reference.forward_phased(scale, *args, w0, lo, seg)
    g1 = reference.backward("delta_rule", scale, *args, st1, d_o, State(d_f, None), lo, seg)
    g2 = reference.backward_phased(scale, *args, st2, w, d_o, d_f, lo, seg)
    return o1, f1, st1, o2, f2, st2, g1, g2

  ks = jax.random.split(jax.random.key(5), 2)
  d_o = jax.random.normal(ks[0], args[2].shape)
  d_f = jax.random.normal(ks[1], w0.shape)
  o1, f1, st1, o2, f2, st2, g1, g2 = both(args, w0, d_o, d_f)
  pairs = [(o2, o1), (f2, f1.memory), (st2, st1.memory)] + list(zip(jax.tree.leaves(g2),
                                                                    jax.tree.leaves(g1)))
  for got, want in pairs:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    assert np.linalg.norm(want) > 0


SLOW = pytest.mark.slow  # each row interprets six (delta rule) or two kernels: 15-40 s on CPU


@pytest.mark.parametrize("kind,backend,dtype", [
    pytest.param(*row, marks=() if row == ("delta_rule", "gpu", "bfloat16") else SLOW)
    for row in bench.AGREEMENT_ROWS])
def test_kernels_agree_with_float64_recurrence(kind, backend, dtype):
  errors = bench.agreement(kind, backend, dtype)
  expected = {"o", "state", "dq", "dk", "dv", "dinitial_state", "dg"}
  assert expected <= set(errors), errors
  bad = {n: e for n, e in errors.items() if not e <= bench.AGREEMENT_RTOL[dtype]}
  assert not bad, (bad, errors)


def test_log_decays_outside_the_contract_are_clamped():
  """+5, −inf and −1e4 reach the kernels as their clamped values: finite chunk-cumulative decays,
  whose differences (the exponents of every decay) are ≤ 0 within a chunk."""
  x = bench.agreement_inputs("delta_rule", 1, 20, 2, 16, 16, seed=2)
  g = x["g"].at[0, 3, 0].set(5.0).at[0, 7, 1].set(-jnp.inf).at[0, 9, 0].set(-1e4)
  lo = lay.Layout(1, 20, 2, 16)
  got = lay.gates(x["beta"], g, None, lo)
  want = lay.gates(x["beta"], jnp.clip(g, lay.LOG_DECAY_MIN, 0.0), None, lo)
  for a, b in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cum = np.asarray(got[1])[..., chunk_lib.LOG_DECAY, :]  # [BH, N, C]
  assert np.all(np.diff(cum, axis=-1) <= 0) and cum.min() >= lay.LOG_DECAY_MIN * 16


def test_any_head_size_up_to_256():
  q = jnp.zeros((1, 8, 1, 24))
  assert kops.unsupported("delta_rule", q, q, jnp.zeros((1, 8, 1, 40)), 16) is None
  assert [kops.padded_head_dim(d) for d in (1, 16, 17, 24, 100, 128, 200, 256)] == [
      16, 16, 32, 32, 128, 128, 256, 256]
  assert "K=300" in kops.unsupported("delta_rule", jnp.zeros((1, 8, 1, 300)),
                                     jnp.zeros((1, 8, 1, 300)), q, 16)


@pytest.mark.slow  # ~20 s of compiling; the kernel tests cover phases.grad end to end
@pytest.mark.parametrize("with_reset", [False, True])
def test_hand_written_chunk_gradient_equals_chunk_vjp(with_reset):
  """``phases.grad`` (what the gradient kernels run) against ``chunk.chunk_vjp`` (jax.vjp of the
  chunk): float32 within 1e-5; with bfloat16 dot operands within 2e-2 (normwise)."""
  b, t, h, dk, dv, c = 1, 29, 1, 16, 32, 16
  x = bench.agreement_inputs("delta_rule", b, t, h, dk, dv, seed=3)
  reset = jnp.zeros((b, t), bool).at[0, 3].set(True).at[0, 20].set(True) if with_reset else None
  lo = lay.Layout(b, t, h, c)
  gc, gr = lay.gates(x["beta"], x["g"], None, lo, reset)
  q, k, v = (lay.sequences(x[n], lo)[0] for n in ("q", "k", "v"))
  ks = jax.random.split(jax.random.key(1), 3)
  s0 = jax.random.normal(ks[0], (dk, dv))
  d_o, d_s1 = jax.random.normal(ks[1], (c, dv)), jax.random.normal(ks[2], (dk, dv))
  scale, seg = dk**-0.5, with_reset
  for n in range(lo.num_chunks):  # the second chunk is the partial one (last = 12)
    last = chunk_lib.last_row(jnp.int32(n), lo.num_chunks, c, lo.last)
    rows = slice(n * c, (n + 1) * c)
    ch = chunk_lib.Chunk(q[rows], k[rows], v[rows], gc[0, rows], gr[0, n])
    want, _ = jax.jit(lambda ch, last: chunk_lib.chunk_vjp(
        "delta_rule", scale, ch, State(s0, None), last, d_o, State(d_s1, None), seg))(ch, last)
    for dtype, rtol in ((None, 1e-5), (jnp.bfloat16, 2e-2)):
      got = reference_grad(ch, s0, d_o, d_s1, last, scale, seg, dtype)
      # The gates' column and row carry the same values: compare their summed gradient (β, G).
      pairs = [(got.q, want.q), (got.k, want.k), (got.v, want.v),
               ((got.gates_col + got.gates_row.T)[:, :2], (want.gates_col + want.gates_row.T)[:, :2])]
      for a, w in pairs:
        a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
        assert np.linalg.norm(a - w) <= rtol * np.linalg.norm(w), (n, dtype)


def reference_grad(ch, s0, d_o, d_s1, last, scale, seg, dtype):
  from pallas_kernels.chunked_memory import phases  # pylint: disable=g-import-not-at-top
  return jax.jit(phases.grad, static_argnums=(9, 10, 11))(
      ch.q, ch.k, ch.v, ch.gates_col, ch.gates_row, s0, d_o, d_s1, last, scale, seg, dtype)


@pytest.mark.parametrize("momentum", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_titans_phases_equal_chunk_step_and_its_vjp(momentum):
  """Titans in phases (``titans_phases``: coefficients, state step, output, ``Pᵀ dO``, the reverse
  state step, the hand-written chunk gradient) against ``chunk.chunk_step`` and ``jax.vjp`` of it
  (``chunk.chunk_vjp``), full and partial chunk: float32 within 1e-5; with bfloat16 dot operands
  the gradient within 2e-2 (normwise)."""
  from pallas_kernels.chunked_memory import titans_phases as tp  # pylint: disable=g-import-not-at-top
  b, t, h, dk, dv, c = 1, 29, 1, 16, 32, 16
  x = bench.agreement_inputs("titans", b, t, h, dk, dv, seed=3)
  lo = lay.Layout(b, t, h, c)
  gc, gr = lay.gates(x["beta"], x["g"], x["momentum"] if momentum else None, lo)
  q, k, v = (lay.sequences(x[n], lo)[0] for n in ("q", "k", "v"))
  ks = jax.random.split(jax.random.key(1), 5)
  s0, d_s1 = jax.random.normal(ks[0], (dk, dv)), jax.random.normal(ks[2], (dk, dv))
  p0 = jax.random.normal(ks[3], (dk, dv)) if momentum else None
  d_p1 = jax.random.normal(ks[4], (dk, dv)) if momentum else None
  d_o, scale = jax.random.normal(ks[1], (c, dv)), 0.7

  @jax.jit
  def run(ch, last):
    o_want, st_want = chunk_lib.chunk_step("titans", scale, ch, State(s0, p0), last)
    want, d_start = chunk_lib.chunk_vjp("titans", scale, ch, State(s0, p0), last, d_o,
                                        State(d_s1, d_p1))
    coef = tp.coefficients(ch.gates_col, ch.gates_row, last) if momentum else None
    s1, p1 = tp.state_step(ch.k, ch.v, ch.gates_col, coef, s0, p0, last)
    o = tp.output(ch.q, ch.k, ch.v, ch.gates_col, ch.gates_row, s0, p0, last, scale)
    dvl = tp.dv_local(ch.q, ch.k, ch.gates_col, ch.gates_row, d_o, last, momentum, scale)
    d_s0, d_p0 = tp.state_step_bwd(ch.q, ch.k, ch.gates_col, coef, dvl, d_o, d_s1, d_p1, last,
                                   scale)
    grads = [tp.grad(ch.q, ch.k, ch.v, ch.gates_col, ch.gates_row, s0, p0, d_o, d_s1, d_p1, last,
                     scale, dtype) for dtype in (None, jnp.bfloat16)]
    pairs = [(o, o_want), (s1, st_want.memory), (d_s0, d_start.memory)]
    if momentum:
      pairs += [(p1, st_want.momentum), (d_p0, d_start.momentum)]
    return pairs, grads, want

  rel = lambda a, w: (np.linalg.norm(np.asarray(a, np.float64) - np.asarray(w, np.float64))
                      / np.linalg.norm(np.asarray(w, np.float64)))
  channels = 3 if momentum else 2  # β, G (and E); the gates' column and row carry the same values
  for n in range(lo.num_chunks):  # the second chunk is the partial one (last = 12)
    last = chunk_lib.last_row(jnp.int32(n), lo.num_chunks, c, lo.last)
    rows = slice(n * c, (n + 1) * c)
    pairs, grads, want = run(chunk_lib.Chunk(q[rows], k[rows], v[rows], gc[0, rows], gr[0, n]),
                             last)
    for a, w in pairs:
      assert rel(a, w) <= 1e-5, n
    gate = lambda d: (d.gates_col + d.gates_row.T)[:, :channels]
    for got, rtol in zip(grads, (1e-5, 2e-2)):
      for a, w in ((got.q, want.q), (got.k, want.k), (got.v, want.v)):
        assert rel(a, w) <= rtol, (n, rtol)
      for ch in range(channels):
        assert rel(gate(got)[:, ch], gate(want)[:, ch]) <= rtol, (n, ch, rtol)


@pytest.mark.parametrize("momentum", [True, False])
def test_titans_dots_take_input_dtype_operands(momentum):
  """Every dot of Titans' phases that reads an input or a state runs on bfloat16 operands for
  bfloat16 inputs; the float32 dots are the gate-only ones (``Γ = D·Dη``, its pullback, the
  gates' column sums: ``[C, C]`` by ``[C, C]`` or ``[C, 1]``)."""
  from pallas_kernels.chunked_memory import titans_phases as tp  # pylint: disable=g-import-not-at-top
  c, dk, dv, bf = 16, 32, 64, jnp.bfloat16
  z = lambda *shape: jnp.zeros(shape, jnp.float32)
  p = z(dk, dv) if momentum else None
  coef = z(c, 4) if momentum else None
  calls = {
      "state_step": lambda: tp.state_step(z(c, dk), z(c, dv), z(c, 4), coef, z(dk, dv), p, 5, bf),
      "output": lambda: tp.output(z(c, dk), z(c, dk), z(c, dv), z(c, 4), z(4, c), z(dk, dv), p, 5,
                                  1.0, bf),
      "dv_local": lambda: tp.dv_local(z(c, dk), z(c, dk), z(c, 4), z(4, c), z(c, dv), 5, momentum,
                                      1.0, bf),
      "state_step_bwd": lambda: tp.state_step_bwd(z(c, dk), z(c, dk), z(c, 4), coef, z(c, dv),
                                                  z(c, dv), z(dk, dv), p, 5, 1.0, bf),
      "grad": lambda: tp.grad(z(c, dk), z(c, dk), z(c, dv), z(c, 4), z(4, c), z(dk, dv), p,
                              z(c, dv), z(dk, dv), p, 5, 1.0, bf),
  }
  for name, call in calls.items():
    dots = [e for e in jax.make_jaxpr(call)().jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots, name
    for e in dots:
      a, b = (v.aval for v in e.invars)
      if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        continue
      assert a.shape == (c, c) and b.shape in ((c, c), (c, 1)), (name, a, b)
