"""The ops against references written independently of the memory core, and their errors.

``test_ops_equivalence`` checks chunked == recurrent; these tests check that the recurrence is the
one the docstrings of ``nlx.ops`` specify (README.md, "The ops"): plain numpy loops over the
formulas, a quadratic (attention-like) form, online gradient descent with ``jax.grad``, and the
paper's equivalences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.memory import core as core_memory
from nlx.memory import objectives
from nlx.memory.deep import MLPMemory

import ops_cases as cases


def _inputs(variant, b=2, t=23, h=2, dk=8, dv=8, seed=3):
  return cases.to_np(cases.make_arrays(variant, b, t, h, dk, dv, jnp.float64, seed=seed))


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_linear_attention_equals_quadratic_form(impl):
  a = _inputs("linear_attention_g")
  o, s = ops.linear_attention(a["q"], a["k"], a["v"], g=a["g"], initial_state=a["s0"], scale=0.7,
                              chunk_size=8, impl=impl)
  cum = np.cumsum(a["g"], axis=1)  # [B, T, H]
  t = a["q"].shape[1]
  causal = np.tril(np.ones((t, t)))
  # o_t = Σ_{s≤t} exp(G_t − G_s)(q_t·k_s) v_s + exp(G_t) S_0ᵀ q_t, all scaled by 0.7.
  decay = np.exp(cum[:, :, None, :] - cum[:, None, :, :]) * causal[None, :, :, None]
  scores = np.einsum("bthk,bshk->btsh", a["q"], a["k"]) * decay
  want = 0.7 * (np.einsum("btsh,bshv->bthv", scores, a["v"]) +
                np.exp(cum)[..., None] * np.einsum("bthk,bhkv->bthv", a["q"], a["s0"]))
  want_s = (np.exp(cum[:, -1])[:, :, None, None] * a["s0"] + np.einsum(
      "bsh,bshk,bshv->bhkv", np.exp(cum[:, -1:] - cum), a["k"], a["v"]))
  np.testing.assert_allclose(o, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(s, want_s, rtol=1e-10, atol=1e-10)


def _delta_rule_loop(q, k, v, beta, g, s0, scale):
  """``delta_rule``'s contract: S ← exp(g)S; u = β(v − Sᵀk); S ← S + k uᵀ; o = Sᵀ(scale·q)."""
  b, t, h, _ = q.shape
  o = np.zeros(v.shape)
  s = s0.copy()
  for bi in range(b):
    for hi in range(h):
      st = s[bi, hi]
      for ti in range(t):
        st = np.exp(g[bi, ti, hi]) * st
        u = beta[bi, ti, hi] * (v[bi, ti, hi] - st.T @ k[bi, ti, hi])
        st = st + np.outer(k[bi, ti, hi], u)
        o[bi, ti, hi] = st.T @ (scale * q[bi, ti, hi])
      s[bi, hi] = st
  return o, s


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_delta_rule_equals_numpy_loop(impl):
  a = _inputs("delta_rule_g")
  o, s = ops.delta_rule(a["q"], a["k"], a["v"], beta=a["beta"], g=a["g"], initial_state=a["s0"],
                        chunk_size=8, impl=impl)
  want_o, want_s = _delta_rule_loop(a["q"], a["k"], a["v"], a["beta"], a["g"], a["s0"],
                                    a["q"].shape[-1]**-0.5)
  np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(s, want_s, rtol=1e-10, atol=1e-10)


def _titans_linear_loop(q, k, v, lr, eta, g, m0, p0, chunk):
  """``titans_memory``, linear memory: G_t = k_t(M_cᵀk_t − v_t)ᵀ at the chunk-start M_c."""
  b, t, h, _ = q.shape
  o = np.zeros(v.shape)
  m, p = m0.copy(), p0.copy()
  for bi in range(b):
    for hi in range(h):
      mt, pt = m[bi, hi], p[bi, hi]
      for ti in range(t):
        if ti % chunk == 0:
          mc = mt
        kt = k[bi, ti, hi]
        grad = np.outer(kt, mc.T @ kt - v[bi, ti, hi])
        pt = eta[bi, ti, hi] * pt - lr[bi, ti, hi] * grad
        mt = np.exp(g[bi, ti, hi]) * mt + pt
        o[bi, ti, hi] = mt.T @ q[bi, ti, hi]
      m[bi, hi], p[bi, hi] = mt, pt
  return o, m, p


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_titans_linear_equals_numpy_loop(impl, chunk):
  a = _inputs("titans_linear_full")
  o, st = ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], momentum=a["momentum"], g=a["g"],
                            initial_state=ops.TitansState(a["s0"], a["p0"]), chunk_size=chunk,
                            impl=impl)
  want_o, want_m, want_p = _titans_linear_loop(a["q"], a["k"], a["v"], a["lr"], a["momentum"],
                                               a["g"], a["s0"], a["p0"], chunk)
  np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(st.memory, want_m, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(st.momentum, want_p, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_titans_linear_online_gd_is_the_delta_rule(impl):
  """Chunk 1, no momentum, no decay: online GD on ½‖Sᵀk − v‖² is DeltaNet with β = lr."""
  a = _inputs("titans_linear")
  o_t, st = ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], initial_state=a["s0"],
                              chunk_size=1, impl=impl)
  o_d, s_d = ops.delta_rule(a["q"], a["k"], a["v"], beta=a["lr"], initial_state=a["s0"], scale=1.0,
                            impl=impl)
  np.testing.assert_allclose(o_t, o_d, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(st.memory, s_d, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_titans_mlp_chunk_one_is_online_gradient_descent(impl):
  """A Python loop of jax.grad steps on the residual MLP, one token at a time."""
  a = _inputs("titans_mlp_full", b=1, t=9, h=2)
  mem = MLPMemory()
  o, st = ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], momentum=a["momentum"], g=a["g"],
                            memory=mem, initial_state=ops.TitansState(a["s0"], a["p0"]),
                            chunk_size=1, impl=impl)

  def loss(w, k, v):
    pred = k + jax.nn.gelu(k @ w["w2"]) @ w["w1"]
    return 0.5 * jnp.sum((pred - v)**2)

  for hi in range(2):
    w = {n: a["s0"][n][0, hi] for n in ("w1", "w2")}
    p = {n: a["p0"][n][0, hi] for n in ("w1", "w2")}
    for ti in range(9):
      grad = jax.grad(loss)(w, a["k"][0, ti, hi], a["v"][0, ti, hi])
      p = {n: a["momentum"][0, ti, hi] * p[n] - a["lr"][0, ti, hi] * grad[n] for n in w}
      w = {n: np.exp(a["g"][0, ti, hi]) * w[n] + p[n] for n in w}
      qt = a["q"][0, ti, hi]
      np.testing.assert_allclose(o[0, ti, hi], qt + jax.nn.gelu(qt @ w["w2"]) @ w["w1"],
                                 rtol=1e-10, atol=1e-10)
    for n in w:
      np.testing.assert_allclose(st.memory[n][0, hi], w[n], rtol=1e-10, atol=1e-10)
      np.testing.assert_allclose(st.momentum[n][0, hi], p[n], rtol=1e-10, atol=1e-10)


def test_titans_chunk_size_is_part_of_the_model():
  """Chunk-start gradients: a different chunk gives a different (but valid) memory."""
  a = _inputs("titans_linear")
  o1, _ = ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], initial_state=a["s0"], chunk_size=1)
  o8, _ = ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], initial_state=a["s0"], chunk_size=8)
  assert np.abs(np.asarray(o1) - np.asarray(o8)).max() > 1e-6


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_objective_error_is_the_gradient_of_its_loss(objective):
  obj = objectives.get_objective(objective)
  pred, target = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7), jnp.float64)
  want = jax.grad(lambda p: obj.loss(p, target).sum())(pred)
  np.testing.assert_allclose(obj.error(pred, target), want, rtol=1e-12)


def test_ops_work_under_jit():
  a = cases.make_arrays("delta_rule_g", 1, 20, 2, 8, 8, jnp.float32)
  f = jax.jit(lambda q, k, v, b, g: ops.delta_rule(q, k, v, beta=b, g=g, chunk_size=8))
  o, s = f(a["q"], a["k"], a["v"], a["beta"], a["g"])
  o2, s2 = ops.delta_rule(a["q"], a["k"], a["v"], beta=a["beta"], g=a["g"], chunk_size=8)
  np.testing.assert_allclose(o, o2, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input: errors that name the argument, its value and what is allowed.
# ------------------------------------------------------------------------------------------------

Z = lambda *s, dtype=jnp.float32: jnp.zeros(s, dtype)
Q = Z(2, 10, 3, 8)
GATE = Z(2, 10, 3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.linear_attention(Z(2, 10, 8), Q, Q), ValueError, r"q must have shape \[B, T, H, D\]"),
    (lambda: ops.linear_attention(Q, Z(2, 10, 3, 4), Q), ValueError, r"k must have the shape of q"),
    (lambda: ops.linear_attention(Q, Q, Z(2, 9, 3, 8)), ValueError, r"v must have shape"),
    (lambda: ops.linear_attention(Q, Q, Z(2, 10, 3, 8, dtype=jnp.int32)), TypeError, r"v must be a floating-point array.*int32"),
    (lambda: ops.linear_attention(Q, Q, Q.astype(jnp.bfloat16)), TypeError, r"share a dtype"),
    (lambda: ops.linear_attention(Z(2, 0, 3, 8), Z(2, 0, 3, 8), Z(2, 0, 3, 8)), ValueError, r"q must have no empty axis"),
    (lambda: ops.linear_attention(Q, Q, Q, g=Z(2, 10)), ValueError, r"g must have shape \[B, T, H\] = \(2, 10, 3\); got \(2, 10\)"),
    (lambda: ops.linear_attention(Q, Q, Q, initial_state=Z(2, 3, 8, 4)), ValueError, r"initial_state must have shape \(2, 3, 8, 8\)"),
    (lambda: ops.linear_attention(Q, Q, Q, chunk_size=0), ValueError, r"chunk_size must be a positive int; got 0"),
    (lambda: ops.linear_attention(Q, Q, Q, chunk_size=True), ValueError, r"chunk_size must be a positive int; got True"),
    (lambda: ops.linear_attention(Q, Q, Q, chunk_size=16.0), ValueError, r"chunk_size must be a positive int"),
    (lambda: ops.linear_attention(Q, Q, Q, impl="fast"), ValueError, r"impl='fast' is not one of"),
    (lambda: ops.linear_attention(Q, Q, Q, scale="x"), ValueError, r"scale must be a real number"),
    (lambda: ops.linear_attention(Z(2, 10, 3, 300), Z(2, 10, 3, 300), Q, impl="pallas"), ValueError, r"impl='pallas': head dim K=300 is not supported by the kernels; allowed: 1 to 256"),
    (lambda: ops.delta_rule(Q, Q, Q, beta=None), ValueError, r"beta is required"),
    (lambda: ops.delta_rule(Q, Q, Q, beta=Z(2, 10, 3, dtype=jnp.int32)), TypeError, r"beta must be a floating-point"),
    (lambda: ops.delta_rule(Q, Q, Q, beta=GATE, impl="pallas", chunk_size=12), ValueError, r"impl='pallas': chunk_size=12 is not supported by the kernels; allowed: \(16, 32"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, memory="mlp", initial_state={"w1": Z(2, 3, 8, 8), "w2": Z(2, 3, 8, 8)}, impl="pallas"), ValueError, r"impl='pallas': the kernels implement linear memories only"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, memory="mlp"), ValueError, r"MLP memory needs initial_state"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, memory="conv"), ValueError, r"memory='conv' is not supported"),
    (lambda: ops.titans_memory(Q, Q, Z(2, 10, 3, 4), lr=GATE, memory="mlp", initial_state={"w1": 0, "w2": 0}), ValueError, r"needs K == V; got K=8, V=4"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, memory="mlp", initial_state={"w1": Z(2, 3, 4, 8)}), ValueError, r"must be a dict with keys \['w1', 'w2'\]"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, memory="mlp", initial_state={"w1": Z(2, 3, 4, 8), "w2": Z(2, 3, 8, 5)}), ValueError, r"initial_state.memory\['w1'\] must have shape \(2, 3, 5, 8\)"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, initial_state=ops.TitansState(Z(2, 3, 8, 8), Z(2, 3, 8, 8))), ValueError, r"momentum=None"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, momentum=Z(2, 10)), ValueError, r"momentum must have shape"),
    (lambda: MLPMemory(activation="swish"), ValueError, r"activation='swish' is not supported"),
    (lambda: objectives.get_objective("huber"), ValueError, r"objective='huber' is not a known"),
    # flash-linear-attention's positional gate order (g, beta) is refused, not misread.
    (lambda: ops.delta_rule(Q, Q, Q, GATE, GATE), TypeError, r"positional"),
    (lambda: ops.linear_attention(Q, Q, Q, GATE), TypeError, r"positional"),
    (lambda: ops.titans_memory(Q, Q, Q, GATE), TypeError, r"positional"),
])
def test_bad_input_is_refused_with_a_clear_message(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


@pytest.mark.parametrize("c", [1, 2, 3, 7, 16, 33, 64])
def test_unit_lower_inverse_matches_numpy(c):
  from nlx.memory.core import unit_lower_inverse
  a = np.tril(np.random.default_rng(c).normal(size=(c, c)) * 0.3, -1)
  a[np.triu_indices(c)] = 5.0  # entries on and above the diagonal must be ignored
  want = np.linalg.inv(np.eye(c) + np.tril(a, -1))
  np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(a)), want, rtol=1e-12, atol=1e-12)


class _TanhMemory(core_memory.Memory):
  """A user-defined two-layer memory with its own layer names: ``x + tanh(x @ up) @ down``."""

  def forward(self, matmul, x):
    return x + matmul("down", jnp.tanh(matmul("up", x)))

  def layer_shapes(self, key_dim, value_dim, hidden_dim):
    return {"up": (key_dim, hidden_dim), "down": (hidden_dim, value_dim)}

  def hidden_dim(self, weights):
    return weights["up"].shape[-1]


def test_user_defined_memory_runs_and_chunked_matches_recurrent():
  a = _inputs("titans_linear", b=1, t=11, h=2)
  r = np.random.default_rng(0)
  init = {"up": 0.3 * r.normal(size=(1, 2, 8, 5)), "down": 0.3 * r.normal(size=(1, 2, 5, 8))}
  outs = [ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], memory=_TanhMemory(),
                            initial_state=init, chunk_size=4, impl=impl)
          for impl in ("recurrent", "chunked")]
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
  for name in init:
    np.testing.assert_allclose(outs[1][1].memory[name], outs[0][1].memory[name], rtol=1e-10,
                               atol=1e-10)
  with pytest.raises(ValueError, match=r"initial_state.memory\['up'\] must have shape \[B, H, in, out\]"):
    ops.titans_memory(a["q"], a["k"], a["v"], lr=a["lr"], memory=_TanhMemory(),
                      initial_state={"up": init["up"][0], "down": init["down"]})


@pytest.mark.parametrize("c,n", [(1, 3), (7, 2), (16, 5), (33, 4), (64, 8)])
def test_unit_lower_solve_matches_numpy(c, n):
  from nlx.memory.core import unit_lower_solve
  rng = np.random.default_rng(c)
  a = np.tril(rng.normal(size=(c, c)) * 0.3, -1)
  a[np.triu_indices(c)] = 5.0  # entries on and above the diagonal must be ignored
  rhs = rng.normal(size=(c, n))
  want = np.linalg.solve(np.eye(c) + np.tril(a, -1), rhs)
  np.testing.assert_allclose(unit_lower_solve(jnp.asarray(a), jnp.asarray(rhs)), want,
                             rtol=1e-11, atol=1e-11)
