"""``nlx.ops.dgd_memory`` against a numpy loop of delta gradient descent written from the equation.

The loop below is Eq. 88 (chunk size 1) and Eq. 93 (per chunk) of docs/EQUATIONS.md, per head,
with row-vector layers ``y = h W``: for token t of a chunk whose start state is ``W_c``, ``h_l``
(layer l's input) and ``e_l`` (the objective's gradient w.r.t. layer l's output) at ``W_c``;
``P_l ← m P_l − lr h_lᵀ e_l``; ``W_l ← (exp(g) I − lr h_lᵀ h_l) W_l + P_l``; ``o_t = M(q_t)``
after or before the write; with ``proximal``, ``lr`` is layer l's ``lr / (1 + lr ‖h_l‖²)`` in
both terms. It shares no code with nlx: float64 numpy, explicit outer products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.memory import MLPMemory


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _silu_grad(x):
  s = 1.0 / (1.0 + np.exp(-x))
  return s * (1.0 + x * (1.0 - s))


def _forward(w, x):
  """The memory and its layers' inputs: linear ``x S``, or MLP ``x + silu(x W2) W1``."""
  if "w" in w:
    return x @ w["w"], {"w": x}, None
  z = x @ w["w2"]
  return x + _silu(z) @ w["w1"], {"w2": x, "w1": _silu(z)}, z


def _layer_errors(w, k, v, objective):
  """(inputs h_l, errors e_l) of every layer for the key k at weights w."""
  y, inputs, z = _forward(w, k)
  e_out = y - v if objective == "l2" else -v
  if "w" in w:
    return inputs, {"w": e_out}
  return inputs, {"w1": e_out, "w2": (e_out @ w["w1"].T) * _silu_grad(z)}


def dgd_loop(q, k, v, lr, g, m, w0, p0, chunk, objective="l2", read="after_write",
             proximal=False):
  """One (batch, head) slice: q, k ``[T, K]``, v ``[T, V]``, gates ``[T]`` (m None: no momentum)."""
  w = {n: x.copy() for n, x in w0.items()}
  p = None if m is None else {n: x.copy() for n, x in p0.items()}
  outs = []
  for t in range(len(q)):
    if t % chunk == 0:
      w_c = {n: x.copy() for n, x in w.items()}
    before = _forward(w, q[t])[0]
    h, e = _layer_errors(w_c, k[t], v[t], objective)
    for n in w:
      rate = lr[t] / (1.0 + lr[t] * h[n] @ h[n]) if proximal else lr[t]
      grad = np.outer(h[n], e[n])
      if p is None:
        step = -rate * grad
      else:
        p[n] = m[t] * p[n] - rate * grad
        step = p[n]
      decay = np.exp(g[t]) * np.eye(len(h[n])) - rate * np.outer(h[n], h[n])
      w[n] = decay @ w[n] + step
    outs.append(before if read == "before_write" else _forward(w, q[t])[0])
  return np.stack(outs), w, p


def _inputs(b, t, h, d, mlp, momentum, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a = dict(q=rng.normal(size=(b, t, h, d)), k=unit(rng.normal(size=(b, t, h, d))),
           v=rng.normal(size=(b, t, h, d)), lr=0.4 / (1 + np.exp(-rng.normal(size=(b, t, h)))),
           g=-0.3 * np.log1p(np.exp(rng.normal(size=(b, t, h)))))
  a["m"] = 1 / (1 + np.exp(-rng.normal(size=(b, t, h)))) if momentum else None
  if mlp:
    a["w0"] = {"w2": rng.normal(size=(b, h, d, 2 * d)) * d**-0.5,
               "w1": rng.normal(size=(b, h, 2 * d, d)) * (2 * d)**-0.5}
  else:
    a["w0"] = {"w": 0.3 * rng.normal(size=(b, h, d, d))}
  a["p0"] = jax.tree.map(lambda x: 0.1 * np.ones_like(x), a["w0"]) if momentum else None
  return a


def _loop_all(a, chunk, objective, read, proximal=False):
  b, t, h, _ = a["q"].shape
  outs, finals = np.zeros_like(a["v"]), []
  for i in range(b):
    for j in range(h):
      sl = lambda x: None if x is None else x[i, :, j]
      o, w, p = dgd_loop(sl(a["q"]), sl(a["k"]), sl(a["v"]), sl(a["lr"]), sl(a["g"]), sl(a["m"]),
                         {n: x[i, j] for n, x in a["w0"].items()},
                         None if a["p0"] is None else {n: x[i, j] for n, x in a["p0"].items()},
                         chunk, objective, read, proximal)
      outs[i, :, j] = o
      finals.append((w, p))
  return outs, finals


CASES = [(1, 9, True, "l2", "after_write", False), (4, 11, True, "l2", "before_write", False),
         (4, 11, False, "l2", "after_write", False), (5, 13, True, "dot", "after_write", False),
         (8, 8, False, "dot", "before_write", False), (1, 7, True, "l2", "after_write", True),
         (4, 11, True, "l2", "before_write", True), (3, 10, False, "dot", "after_write", True)]


@pytest.mark.parametrize("mlp,chunk,t,momentum,objective,read,proximal", [
    (mlp,) + case for mlp in (False, True) for case in CASES
    if not (mlp and case[3] == "dot")])  # the dot objective is Eq. 92, on a linear memory
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_dgd_memory_equals_the_equation_loop(impl, mlp, chunk, t, momentum, objective, read,
                                             proximal):
  with jax.enable_x64(True):
    a = _inputs(2, t, 2, 6, mlp, momentum, seed=chunk + t)
    if proximal:  # keys of norm ≠ 1, so that the proximal rate differs from lr / (1 + lr)
      a["k"] = a["k"] * np.linspace(0.5, 3.0, t)[None, :, None, None]
    want_o, finals = _loop_all(a, chunk, objective, read, proximal)
    w0 = a["w0"] if mlp else a["w0"]["w"]
    p0 = None if a["p0"] is None else (a["p0"] if mlp else a["p0"]["w"])
    j = lambda x: None if x is None else jnp.asarray(x)
    o, state = ops.dgd_memory(
        j(a["q"]), j(a["k"]), j(a["v"]), lr=j(a["lr"]), g=j(a["g"]), momentum=j(a["m"]),
        memory=MLPMemory("silu") if mlp else "linear", objective=objective,
        initial_state=ops.TitansState(jax.tree.map(j, w0), jax.tree.map(j, p0)),
        chunk_size=chunk, read=read, impl=impl, proximal=proximal)
    np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-10)
    weights = state.memory if mlp else {"w": state.memory}
    for i in range(2):
      for hh in range(2):
        w, _ = finals[i * 2 + hh]
        for n in w:
          np.testing.assert_allclose(weights[n][i, hh], w[n], rtol=1e-10, atol=1e-10)


def test_the_decay_term_touches_only_its_own_layer():
  """With a zero gradient term (v = M(k) at the chunk start, chunk 1, no momentum), DGD's decay
  of the first layer must not reach the second: W1 changes by exactly ``−lr h_1ᵀ(h_1 W1)``."""
  with jax.enable_x64(True):
    a = _inputs(1, 1, 1, 6, True, False)
    w0 = {n: jnp.asarray(x) for n, x in a["w0"].items()}
    k = jnp.asarray(a["k"])
    v = MLPMemory("silu").apply(jax.tree.map(lambda x: x[0, 0], w0), k[0, :, 0])[None, :, None]
    lr = jnp.full((1, 1, 1), 0.3)
    _, state = ops.dgd_memory(k, k, v, lr=lr, memory=MLPMemory("silu"), initial_state=w0,
                              chunk_size=1, impl="recurrent")
    h1 = _silu(a["k"][0, 0, 0] @ a["w0"]["w2"][0, 0])
    want_w1 = a["w0"]["w1"][0, 0] - 0.3 * np.outer(h1, h1 @ a["w0"]["w1"][0, 0])
    np.testing.assert_allclose(state.memory["w1"][0, 0], want_w1, rtol=1e-12, atol=1e-12)
    h2 = a["k"][0, 0, 0]
    want_w2 = a["w0"]["w2"][0, 0] - 0.3 * np.outer(h2, h2 @ a["w0"]["w2"][0, 0])
    np.testing.assert_allclose(state.memory["w2"][0, 0], want_w2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_dot_objective_on_a_linear_memory_is_the_gated_delta_rule(chunk):
  """Eq. 92: ``M(αI − η k kᵀ) + η v kᵀ`` == delta_rule(q, k, α·v, beta=η/α, g=log α), any chunk."""
  with jax.enable_x64(True):
    a = _inputs(2, 21, 3, 8, False, False, seed=chunk)
    j = jnp.asarray
    alpha = np.exp(a["g"])
    o, state = ops.dgd_memory(j(a["q"]), j(a["k"]), j(a["v"]), lr=j(a["lr"]), g=j(a["g"]),
                              objective="dot", initial_state=j(a["w0"]["w"]), chunk_size=chunk,
                              impl="chunked")
    o_d, s_d = ops.delta_rule(j(a["q"]), j(a["k"]), j(alpha[..., None] * a["v"]),
                              beta=j(a["lr"] / alpha), g=j(a["g"]), scale=1.0,
                              initial_state=j(a["w0"]["w"]), impl="recurrent")
    np.testing.assert_allclose(o, o_d, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state.memory, s_d, rtol=1e-10, atol=1e-10)


def test_the_proximal_rate_keeps_a_hidden_layer_with_a_large_input_bounded():
  """An MLP memory whose hidden layer sees inputs of norm ~25 (``lr ‖h‖² ≈ 60``): with the raw
  rate the decay ``α − lr ‖h‖²`` flips and grows the hidden layer's weights by orders of
  magnitude over a few tokens; the proximal rate ``lr / (1 + lr ‖h‖²)`` keeps every factor in
  ``(α − 1, α]``, so the weights stay of the size they started."""
  a = _inputs(1, 24, 1, 6, True, False, seed=3)
  a["w0"]["w2"] = a["w0"]["w2"] * 15.0  # large pre-activations: silu(z) of norm ~ 25
  j = lambda x: jax.tree.map(jnp.asarray, x)
  args = dict(lr=j(np.full((1, 24, 1), 0.1)), g=j(np.zeros((1, 24, 1))), memory=MLPMemory("silu"),
              initial_state=j(a["w0"]), chunk_size=4, impl="chunked")
  h = _silu(a["k"][0, :, 0] @ a["w0"]["w2"][0, 0])
  assert 0.1 * (h * h).sum(-1).max() > 30
  norm = lambda s: float(np.abs(np.asarray(s.memory["w1"])).max())
  start = np.abs(a["w0"]["w1"]).max()
  _, raw = ops.dgd_memory(j(a["q"]), j(a["k"]), j(a["v"]), **args)
  _, prox = ops.dgd_memory(j(a["q"]), j(a["k"]), j(a["v"]), proximal=True, **args)
  assert not np.isfinite(norm(raw)) or norm(raw) > 1e3 * start
  assert norm(prox) < 10 * start


def test_proximal_on_the_kernels_is_the_chunked_form():
  """The kernels' route (the gated delta rule) takes the proximal rate ``lr / (1 + lr ‖k‖²)``."""
  a = _inputs(1, 32, 2, 16, False, False, seed=5)
  j = jnp.asarray
  k = j(a["k"] * 2.0)
  args = dict(lr=j(a["lr"], jnp.float32), g=j(a["g"], jnp.float32), objective="dot",
              initial_state=j(a["w0"]["w"], jnp.float32), chunk_size=16, proximal=True)
  q, v = j(a["q"], jnp.float32), j(a["v"], jnp.float32)
  o_k, s_k = ops.dgd_memory(q, k.astype(jnp.float32), v, impl="pallas", **args)
  o_c, s_c = ops.dgd_memory(q, k.astype(jnp.float32), v, impl="chunked", **args)
  np.testing.assert_allclose(o_k, o_c, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(s_k.memory, s_c.memory, rtol=2e-4, atol=2e-4)


def test_dgd_is_not_titans():
  """The decay term changes the result (a test that DGD is on, not only that it runs)."""
  a = _inputs(1, 16, 2, 8, True, True)
  j = lambda x: jax.tree.map(jnp.asarray, x)
  args = dict(lr=j(a["lr"]), g=j(a["g"]), momentum=j(a["m"]), memory=MLPMemory("silu"),
              initial_state=ops.TitansState(j(a["w0"]), j(a["p0"])), chunk_size=4)
  o_dgd, _ = ops.dgd_memory(j(a["q"]), j(a["k"]), j(a["v"]), **args)
  o_gd, _ = ops.titans_memory(j(a["q"]), j(a["k"]), j(a["v"]), **args)
  assert np.abs(np.asarray(o_dgd - o_gd)).max() > 1e-3


Q = jnp.zeros((2, 10, 3, 8))
GATE = jnp.zeros((2, 10, 3))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.dgd_memory(Q, Q, Q, lr=GATE, objective="huber"), ValueError,
     r"objective='huber' is not one of \('l2', 'dot'\)"),
    (lambda: ops.dgd_memory(Q, Q, Q, lr=GATE, read="during"), ValueError,
     r"read='during' is not one of \('after_write', 'before_write'\)"),
    (lambda: ops.dgd_memory(Q, Q, Q, GATE), TypeError, r"positional"),
    (lambda: ops.dgd_memory(Q, Q, Q, lr=GATE, impl="pallas"), ValueError,
     r"impl='pallas': the kernels implement DGD only as the gated delta rule"),
    (lambda: ops.dgd_memory(Q, Q, Q, lr=GATE, memory="mlp"), ValueError,
     r"MLP memory needs initial_state"),
    (lambda: ops.titans_memory(Q, Q, Q, lr=GATE, read="before"), ValueError, r"read='before'"),
    (lambda: ops.dgd_memory(Q, Q, Q, lr=GATE, proximal="yes"), TypeError,
     r"proximal='yes': allowed: True or False"),
])
def test_bad_arguments_are_refused(call, exc, match):
  with pytest.raises(exc, match=match):
    call()
