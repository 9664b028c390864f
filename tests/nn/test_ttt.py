"""TTT-Linear / TTT-MLP as the TTT paper's code defines them (Sun et al. 2024).

Two respects beyond plain chunked gradient descent: the inner model ``f(x) = x + LN(g(x))`` with
a per-head LayerNorm learned by the outer loop only (g = ``x W + b`` or ``gelu(x W1 + b1) W2 +
b2``, weights and biases written by the inner loop; loss ``½‖LN(g(k)) − (v − k)‖²``), and the
schedule inside a mini-batch: token t (position i) reads ``W_t = W_0 − c_i Σ_{j≤t} lr_j
∇ℓ_j(W_0)``, ``c_i = 1/(i+1)`` plus a learned offset (clamped at 0), and a mini-batch ends at its
last token's weights. The reference below is a numpy float64 loop of exactly these formulas, with
hand-written gradients (LayerNorm backward, GELU derivative); it shares no code with nlx.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import ops
from nlx.memory import L2, LINEAR, core
from nlx.memory.deep import TTTMemory
from nlx.nn.config import ModelConfig
from nlx.nn.ttt import ttt_linear, ttt_mlp

EPS = 1e-6  # TTT's inner LayerNorm epsilon
B, H, D, HIDDEN = 2, 2, 4, 8

# ------------------------------------------------------------------------------------------------
# The numpy reference: the formulas, token by token.
# ------------------------------------------------------------------------------------------------


def np_gelu(x):  # the tanh approximation (TTT's, and jax.nn.gelu's default)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_gelu_grad(x):
  u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
  du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)
  return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u)**2) * du


def np_ln(z, scale, shift):
  xhat = (z - z.mean()) / np.sqrt(z.var() + EPS)
  return scale * xhat + shift


def np_ln_backward(z, scale, dy):
  """d/dz of ``dy · LN(z)``: (g − mean(g) − x̂ mean(g x̂)) / σ with g = scale · dy."""
  sigma = np.sqrt(z.var() + EPS)
  xhat = (z - z.mean()) / sigma
  g = scale * dy
  return (g - g.mean() - xhat * (g * xhat).mean()) / sigma


def np_inner(kind, w, x):
  """``g(x)`` and what its gradients need."""
  if kind == "linear":
    return x @ w["w"] + w["b"], None
  z1 = x @ w["w1"] + w["b1"]
  return np_gelu(z1) @ w["w2"] + w["b2"], z1


def np_read(kind, w, x, scale, shift):
  return x + np_ln(np_inner(kind, w, x)[0], scale, shift)


def np_grads(kind, w, k, v, scale, shift):
  """∇_w of ``½‖LN(g(k)) − (v − k)‖²`` by hand."""
  z, z1 = np_inner(kind, w, k)
  dz = np_ln_backward(z, scale, np_ln(z, scale, shift) - (v - k))
  if kind == "linear":
    return {"w": np.outer(k, dz), "b": dz}
  h = np_gelu(z1)
  dz1 = (dz @ w["w2"].T) * np_gelu_grad(z1)
  return {"w1": np.outer(k, dz1), "b1": dz1, "w2": np.outer(h, dz), "b2": dz}


def np_ttt(kind, q, k, v, lr, w, scale, shift, c):
  """One head: mini-batches of len(c) tokens; returns the reads ``[T, D]`` and final weights."""
  size, t_len = len(c), len(q)
  out = []
  for start in range(0, t_len, size):
    w0 = {n: x.copy() for n, x in w.items()}
    steps = {n: np.zeros_like(x) for n, x in w.items()}  # Σ_{j≤t} lr_j ∇ℓ_j(W_0)
    for i, t in enumerate(range(start, min(start + size, t_len))):
      grads = np_grads(kind, w0, k[t], v[t], scale, shift)
      steps = {n: steps[n] + lr[t] * grads[n] for n in w}
      w = {n: w0[n] - c[i] * steps[n] for n in w}
      out.append(np_read(kind, w, q[t], scale, shift))
  return np.stack(out), w


def np_ttt_batch(kind, a, c):
  """The reference over [B, T, H, D] inputs; weights in the op's layout ``{n: [B, H, in, out]}``
  (biases ``[B, H, 1, out]``)."""
  o = np.zeros(a["q"].shape)
  final = {n: np.zeros(x.shape) for n, x in a["w0"].items()}
  for b in range(B):
    for h in range(H):
      w = {n: (x[b, h, 0] if n.startswith("b") else x[b, h]) for n, x in a["w0"].items()}
      o[b, :, h], w = np_ttt(kind, a["q"][b, :, h], a["k"][b, :, h], a["v"][b, :, h],
                             a["lr"][b, :, h], w, a["scale"][h], a["shift"][h], c)
      for n, x in w.items():
        final[n][b, h] = x[None] if n.startswith("b") else x
  return o, final


# ------------------------------------------------------------------------------------------------
# Inputs and the op under test.
# ------------------------------------------------------------------------------------------------


def make_inputs(kind, t_len, chunk, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape)
  w0 = TTTMemory(kind).init_state(jax.random.PRNGKey(seed), B, H, D, HIDDEN, std=0.4)
  w0 = {n: np.asarray(x, np.float64) + (0.1 * normal(*x.shape) if n.startswith("b") else 0)
        for n, x in w0.items()}
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # the mixer's q, k are unit
  return dict(q=unit(normal(B, t_len, H, D)), k=unit(normal(B, t_len, H, D)),
              v=normal(B, t_len, H, D), lr=0.5 + 0.5 * rng.random((B, t_len, H)), w0=w0,
              scale=1 + 0.3 * normal(H, D), shift=0.2 * normal(H, D),
              offset=0.2 * normal(chunk))


def schedule(offset):
  """TTT's ``c_i = max(1/(i+1) + offset_i, 0)``."""
  return jnp.maximum(1.0 / jnp.arange(1, offset.shape[0] + 1) + offset, 0.0)


def op(kind, a, impl, lo=0, hi=None, state=None, position_scale="ttt", params=None):
  hi = a["q"].shape[1] if hi is None else hi
  cut = lambda x: jnp.asarray(x[:, lo:hi])
  scale = schedule(jnp.asarray(a["offset"])) if position_scale == "ttt" else position_scale
  params = params or {"scale": jnp.asarray(a["scale"]), "shift": jnp.asarray(a["shift"])}
  state = ops.TitansState(jax.tree.map(jnp.asarray, a["w0"])) if state is None else state
  return ops.titans_memory(cut(a["q"]), cut(a["k"]), cut(a["v"]), lr=cut(a["lr"]),
                           memory=TTTMemory(kind), initial_state=state,
                           chunk_size=len(a["offset"]), impl=impl, position_scale=scale,
                           memory_params=params)


# ------------------------------------------------------------------------------------------------
# (a) The op equals the formulas.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("chunk, t_len", [(1, 5), (4, 10)])  # 10 = 4 + 4 + a partial chunk of 2
@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_op_equals_the_ttt_formulas_float64(kind, chunk, t_len, impl):
  with jax.enable_x64(True):
    a = make_inputs(kind, t_len, chunk)
    if chunk > 1:
      a["offset"][-1] = -1.0  # the last position's c clamps at 0: its tokens read W_0
    c = np.asarray(schedule(jnp.asarray(a["offset"])))
    o_want, w_want = np_ttt_batch(kind, a, c)
    o, state = op(kind, a, impl)
    np.testing.assert_allclose(o, o_want, rtol=1e-10, atol=1e-10)
    for n, x in w_want.items():
      np.testing.assert_allclose(state.memory[n], x, rtol=1e-10, atol=1e-10, err_msg=n)
    assert int(state.offset) == t_len % chunk
    if chunk > 1 and impl == "chunked":  # the data exercise the schedule and the LayerNorm
      o_plain, _ = op(kind, a, impl, position_scale=None)
      assert np.abs(np.asarray(o_plain) - o_want).max() > 1e-3
      o_unit, _ = op(kind, a, impl, params={"scale": jnp.ones((H, D)),
                                            "shift": jnp.zeros((H, D))})
      assert np.abs(np.asarray(o_unit) - o_want).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# (b) Gradients: the dual form (one call, and split mid-chunk) == the recurrence.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_gradients_chunked_and_split_equal_recurrent_float64(kind):
  with jax.enable_x64(True):
    a = make_inputs(kind, 10, 4, seed=1)
    rng = np.random.default_rng(2)
    r_o = jnp.asarray(rng.standard_normal(a["q"].shape))
    r_w = {n: jnp.asarray(rng.standard_normal(x.shape)) for n, x in a["w0"].items()}

    def loss(inputs, impl, cut):
      x = dict(a, **inputs)
      if cut is None:
        o, state = op(kind, x, impl)
      else:
        o1, state = op(kind, x, impl, 0, cut)
        o2, state = op(kind, x, impl, cut, None, state)
        o = jnp.concatenate([o1, o2], 1)
      final = sum((state.memory[n] * r_w[n]).sum() for n in r_w)
      return (o * r_o).sum() + final

    inputs = {n: jax.tree.map(jnp.asarray, a[n])
              for n in ("q", "k", "v", "lr", "w0", "scale", "shift", "offset")}
    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    want = grad(inputs, "recurrent", None)
    for impl, cut in (("chunked", None), ("chunked", 6)):  # 6: mid-chunk
      got = grad(inputs, impl, cut)
      for path, x in jax.tree_util.tree_leaves_with_path(want):
        y = got
        for key in path:
          y = y[key.key]
        np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-9,
                                   err_msg=f"{impl} {cut} {jax.tree_util.keystr(path)}")
    for name in ("scale", "shift", "offset"):  # every input is live
      assert np.abs(np.asarray(want[name])).max() > 1e-6, name


# ------------------------------------------------------------------------------------------------
# (c), (d) The mixer: split anywhere == one call; the LayerNorm and the schedule are live.
# ------------------------------------------------------------------------------------------------

FAMILIES = {"ttt_linear": ttt_linear, "ttt_mlp": ttt_mlp}


def mixer(family, impl="chunked", seed=0):
  """The mixer, and ``call(params, x, state)`` jitted (eager calls dispatch op by op: slow)."""
  cfg = ModelConfig(family=family, d_model=16, n_heads=2, memory_chunk_size=4, impl=impl,
                    memory_expand=2)
  layer = FAMILIES[family](cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  # Learned-looking values, so that a wrong scale, shift or offset shows.
  for p, std, mean in ((layer.ln["scale"], 0.3, 1.0), (layer.ln["shift"], 0.2, 0.0),
                       (layer.position_offset, 0.2, 0.0)):
    p[...] = jnp.asarray(mean + std * rng.standard_normal(p.shape), p.dtype)
  graphdef, params = nnx.split(layer)
  call = jax.jit(lambda params, x, state: nnx.merge(graphdef, params)(x, state))
  return layer, params, call


def changed(params, name, change):
  """``params`` with the parameter ``name`` (a path such as ``ln/scale``) changed."""
  keys = lambda path: "/".join(str(k.key) for k in path if hasattr(k, "key"))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: change(x) if keys(path) == name else x, params)


@pytest.mark.parametrize("family", ["ttt_linear", "ttt_mlp"])
def test_mixer_split_anywhere_equals_one_call_and_its_parameters_are_live_float64(family):
  # Pieces of 3, 3, 1, 1, 3 tokens, chunk 4: calls start at offsets 0, 3, 2, 3, 0, cross chunk
  # boundaries, step single tokens and end on a boundary (the accumulated writes reset there).
  with jax.enable_x64(True):
    layer, params, call = mixer(family)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 11, 16)))
    # float32 states by default: keep x's dtype, so that float32 rounding cannot hide a mismatch.
    initial = jax.tree.map(lambda s: s.astype(x.dtype) if s.dtype == jnp.float32 else s,
                           layer.init_state(2, 11))
    y_one, s_one = call(params, x, initial)
    state, outs = initial, []
    cuts = (0, 3, 6, 7, 8, 11)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      y, state = call(params, x[:, lo:hi], state)
      outs.append(y)
      assert state.memory.offset.tolist() == [hi % 4] * state.memory.offset.shape[0]  # per row
    # The memory runs in float64, but the mixer L2-normalises q and k in float32 (nlx.nn.norms),
    # whose rounding may differ between differently shaped programs: compare to 1e-6 (a state
    # carried wrongly across calls is off by far more).
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_one, rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.tree.leaves(state.memory), jax.tree.leaves(s_one.memory)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The LayerNorm's scale and shift and the schedule's offset are live parameters.
    for name, change in (("ln/scale", lambda p: p * 1.5), ("ln/shift", lambda p: p + 0.5),
                         ("position_offset", lambda p: p + 0.3)):
      y_changed = call(changed(params, name, change), x, initial)[0]
      assert np.abs(np.asarray(y_changed - y_one)).max() > 1e-4, name


def test_ttt_defaults_are_the_papers():
  layer = ttt_linear(ModelConfig(family="ttt_linear", d_model=16, n_heads=2), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.ln["scale"][...], np.ones((2, 8)))
  np.testing.assert_array_equal(layer.ln["shift"][...], np.zeros((2, 8)))
  np.testing.assert_allclose(layer.position_scale(), 1 / np.arange(1, 17), rtol=1e-7)
  np.testing.assert_array_equal(layer.init_weights["b"][...], 0)
  assert 0.01 < float(np.std(layer.init_weights["w"][...])) < 0.03  # TTT's std 0.02


# ------------------------------------------------------------------------------------------------
# Refusals.
# ------------------------------------------------------------------------------------------------


def test_refusals():
  a = make_inputs("linear", 6, 4)
  a = {n: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), x) for n, x in a.items()}
  q, lr = a["q"], a["lr"]
  mem, params = TTTMemory("linear"), {"scale": a["scale"], "shift": a["shift"]}
  w0 = ops.TitansState(a["w0"])
  ps = jnp.ones(4)
  with pytest.raises(ValueError, match="position_scale is given with momentum"):
    ops.titans_memory(q, q, q, lr=lr, momentum=lr, memory=mem, initial_state=w0, chunk_size=4,
                      position_scale=ps, memory_params=params)
  with pytest.raises(ValueError, match=r"position_scale must have shape \[chunk_size\]"):
    ops.titans_memory(q, q, q, lr=lr, memory=mem, initial_state=w0, chunk_size=4,
                      position_scale=jnp.ones(3), memory_params=params)
  with pytest.raises(ValueError, match="needs memory_params"):
    ops.titans_memory(q, q, q, lr=lr, memory=mem, initial_state=w0, chunk_size=4)
  with pytest.raises(ValueError, match="has no fixed parameters"):
    ops.titans_memory(q, q, q, lr=lr, chunk_size=4, memory_params=params)
  with pytest.raises(ValueError, match="kernels do not implement position_scale"):
    ops.titans_memory(q, q, q, lr=lr, memory=mem, initial_state=w0, chunk_size=4,
                      position_scale=ps, memory_params=params, impl="pallas")
  _, state = ops.titans_memory(q[:, :3], q[:, :3], q[:, :3], lr=lr[:, :3], memory=mem,
                               initial_state=w0, chunk_size=4, position_scale=ps,
                               memory_params=params)
  with pytest.raises(ValueError, match="has no accumulated writes"):
    ops.titans_memory(q, q, q, lr=lr, memory=mem, initial_state=state._replace(accumulated=None),
                      chunk_size=4, position_scale=ps, memory_params=params)
  with pytest.raises(ValueError, match="accumulated is given but position_scale=None"):
    ops.titans_memory(q, q, q, lr=lr, memory=mem, initial_state=state, chunk_size=4,
                      memory_params=params)
  w = {"w": jnp.zeros((4, 4))}
  x = jnp.zeros((6, 4))
  with pytest.raises(ValueError, match="row_scale is given with momentum"):
    core.chunk_start_scan(LINEAR, L2, x, x, x, jnp.ones(6), jnp.zeros(6), jnp.ones(6), w, w, 4,
                          row_scale=jnp.ones(4))
  with pytest.raises(ValueError, match="needs its LayerNorm parameters"):
    mem.apply(a["w0"], q)
