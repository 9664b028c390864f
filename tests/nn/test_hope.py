"""Tests of HOPE (nlx.nn.hope): the mixer equals a plain numpy loop over tokens of the whole
self-modifying Titans step (Eqs. 83–93: five memories, self-generated targets, gates, DGD,
momentum, chunk-wise references); the dot-product linear memory without momentum is exactly
nlx.ops.delta_rule with target v̂; reduced to Titans (fixed k, v, Titans' targets, plain GD,
α = 1, η at its bound) HOPE's mixer is Titans LMM's; every Table 6 ablation switch builds, runs
and changes the output; a split anywhere equals one call; the whole model's gradients equal
central differences (float64); bad settings are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import ops
from nlx.nn import build_model
from nlx.nn.config import ModelConfig
from nlx.nn.hope import SelfModifyingTitans
from nlx.nn.titans import titans_lmm

B, T, H, DK = 2, 7, 2, 4


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _unit(x):
  return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


class NumpyMemory:
  """One memory of one head, float64: linear ``x S`` or residual MLP ``x + silu(x W2) W1``."""

  def __init__(self, weights):
    self.w = {n: np.array(x, np.float64) for n, x in weights.items()}
    self.p = {n: np.zeros_like(x) for n, x in self.w.items()}

  def __call__(self, x, w=None):
    w = self.w if w is None else w
    if "w" in w:
      return x @ w["w"]
    return x + _silu(x @ w["w2"]) @ w["w1"]

  def layers(self, x, target, w, objective):
    """(input h_l, error e_l) of every layer at weights w for the loss at key x."""
    if "w" in w:
      e = x @ w["w"] - target if objective == "l2" else -target
      return {"w": (x, e)}
    z = x @ w["w2"]
    e = x + _silu(z) @ w["w1"] - target if objective == "l2" else -target
    silu_grad = _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))
    return {"w1": (_silu(z), e), "w2": (x, (e @ w["w1"].T) * silu_grad)}

  def dgd(self, x, target, eta, alpha, m, ref, objective, dgd):
    """P ← m P − lr h eᵀ; W ← (α I − lr h hᵀ) W + P, per layer, h and e at ``ref``; lr = η, or
    η/(1 + η‖h‖²) for "arxiv" (DGD's proximal step; η/(1+η) for a unit-norm h)."""
    for name, (h, e) in self.layers(x, target, ref, objective).items():
      lr = eta / (1 + eta * (h @ h)) if dgd == "arxiv" else eta
      self.p[name] = m * self.p[name] - lr * np.outer(h, e)
      decay = alpha * np.eye(len(h)) - (lr * np.outer(h, h) if dgd != "off" else 0.0)
      self.w[name] = decay @ self.w[name] + self.p[name]


def hope_loop(mixer, x):
  """HOPE's mixer output before the output gate, ``[B, T, H, dk]``, written from the equations."""
  cfg = mixer.cfg
  q_in, k_in, v_in, _ = (np.asarray(a, np.float64) for a in mixer.qkv(x))
  m_gate = (np.asarray(_sigmoid(mixer.momentum_gate(x)), np.float64) if cfg.hope_momentum
            else np.zeros(q_in.shape[:3]))
  bias = np.asarray(mixer.gate_bias[...], np.float64)
  names, n = mixer.names, len(mixer.names)
  init = {name: np.asarray(w) for name, w in mixer.initial_weights().items()}
  comps = {name: w[:n * cfg.n_heads] for name, w in init.items()}
  out_init = {name: w[n * cfg.n_heads:] for name, w in init.items()}
  c_h, c_m = cfg.hope_chunk, cfg.memory_chunk_size
  o = np.zeros_like(q_in)
  for b in range(x.shape[0]):
    for h in range(cfg.n_heads):
      mems = {name: NumpyMemory({w: a[i * cfg.n_heads + h] for w, a in comps.items()})
              for i, name in enumerate(names)}
      mems["mem"] = NumpyMemory({w: a[h] for w, a in out_init.items()})
      for t in range(x.shape[1]):
        if t % c_h == 0:  # Eqs. 90–91: the component memories' chunk-boundary state
          start = {name: {w: a.copy() for w, a in mem.w.items()} for name, mem in mems.items()
                   if name != "mem"}
        if t % c_m == 0:
          start["mem"] = {w: a.copy() for w, a in mems["mem"].w.items()}
        gen = lambda name, xt: mems[name](xt, start[name])  # M_□ at its chunk start
        kt = _unit(gen("k", k_in[b, t, h])) if "k" in mems else k_in[b, t, h]
        vt = gen("v", v_in[b, t, h]) if "v" in mems else v_in[b, t, h]
        vt = _unit(vt) if cfg.hope_normalize_v else vt
        qt = _unit(gen("q", q_in[b, t, h])) if "q" in mems else q_in[b, t, h]
        eta = cfg.hope_lr * _sigmoid(gen("eta", k_in[b, t, h]).mean() + bias[0, h])
        eta *= 1 - m_gate[b, t, h]
        alpha = (_sigmoid(gen("alpha", k_in[b, t, h]).mean() + bias[1, h]) if "alpha" in mems
                 else 1.0)
        before = mems["mem"](qt)
        for name, mem in mems.items():  # v̂_□ = M_□(v_t), then the DGD step (Eq. 88)
          target = vt if cfg.hope_targets == "value" else gen(name, vt)
          mem.dgd(kt, target, eta, alpha, m_gate[b, t, h], start[name],
                  cfg.hope_objective, cfg.hope_dgd)
        o[b, t, h] = before if cfg.hope_read == "before_write" else mems["mem"](qt)
  return o


def _mixer_and_inner(fields):
  cfg = ModelConfig(family="hope", d_model=H * DK, n_heads=H, **fields)
  mixer = SelfModifyingTitans(cfg, rngs=nnx.Rngs(0))
  captured = {}
  gate = mixer.out
  mixer.out = lambda o, x: captured.setdefault("o", o)  # the memory read, before the output gate
  x = jax.random.normal(jax.random.PRNGKey(1), (B, 9, H * DK))
  mixer(x)
  mixer.out = gate
  return mixer, x, captured["o"]


@pytest.mark.parametrize("fields", [
    dict(memory_chunk_size=1),                                          # Eq. 88 token by token
    dict(memory_chunk_size=1, hope_dgd="neurips", hope_read="before_write"),
    dict(memory_chunk_size=2, hope_chunk_size=4, hope_targets="value"),
    dict(memory_chunk_size=1, hope_memory="linear", hope_adaptive_q=True),
    dict(memory_chunk_size=2, hope_chunk_size=4),                      # Eqs. 90–93, sub-chunks
    dict(memory_chunk_size=3, hope_dgd="off", hope_weight_decay=False),
    dict(memory_chunk_size=4, hope_momentum=False, hope_objective="dot", hope_memory="linear"),
], ids=["eq88", "neurips-before", "value-targets", "linear-adaptive-q", "subchunks",
        "gd-no-decay", "dot"])
def test_the_mixer_equals_a_loop_of_the_self_modifying_titans_step(fields):
  mixer, x, o = _mixer_and_inner(dict(memory_expand=2, **fields))
  np.testing.assert_allclose(o, hope_loop(mixer, x), rtol=2e-4, atol=2e-5)


def test_dot_objective_without_momentum_is_delta_rule_with_target_v_hat():
  cfg = ModelConfig(family="hope", d_model=H * DK, n_heads=H, memory_chunk_size=1,
                    hope_memory="linear", hope_objective="dot", hope_momentum=False)
  m = SelfModifyingTitans(cfg, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(jax.random.normal(keys[0], (B, T, H, DK))), unit(jax.random.normal(keys[1],
                                                                                 (B, T, H, DK)))
  target = jax.random.normal(keys[2], (B, T, H, DK))
  rate = jax.random.uniform(keys[3], (B, T, H), minval=0.1, maxval=0.5)
  log_alpha = jnp.log(jax.random.uniform(keys[4], (B, T, H), minval=0.8, maxval=1.0))
  s0 = jax.random.normal(keys[5], (B, H, DK, DK))
  (w, _), reader = m.write({"w": s0}, None, k, target, rate, log_alpha, None)
  o = m.output(q, reader)
  alpha = jnp.exp(log_alpha)
  rate = rate / (1 + rate)  # "arxiv": DGD's proximal rate for a unit key, η' = η/(1+η)
  o_ref, s_ref = ops.delta_rule(q, k, alpha[..., None] * target, beta=rate / alpha, g=log_alpha,
                                scale=1.0, initial_state=s0, impl="recurrent")
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w["w"], s_ref, rtol=1e-5, atol=1e-5)


def test_hope_reduced_to_titans_is_the_titans_lmm_mixer():
  """With fixed k and v, Titans' targets, α = 1, plain GD, unnormalised v and η saturated at its
  bound, HOPE's mixer is Titans LMM's with the same weights (its lr gate saturated, no decay):
  the same MLP memory, momentum and chunk-wise write, forward and every gradient."""
  fields = dict(d_model=H * DK, n_heads=H, memory_chunk_size=4, memory_expand=2, conv_size=4)
  titans = titans_lmm(ModelConfig(family="titans_lmm", **fields), rngs=nnx.Rngs(0))
  hope = SelfModifyingTitans(ModelConfig(
      family="hope", hope_adaptive_k=False, hope_adaptive_v=False, hope_weight_decay=False,
      hope_dgd="off", hope_targets="value", hope_normalize_v=False, **fields),
                             rngs=nnx.Rngs(1))
  assert hope.names == ("eta",) and hope.cfg.hope_lr == titans.lr_max
  gates = titans.gates  # [lr, momentum, decay] logits per head; lr and decay saturated
  gates.kernel[...] = gates.kernel[...].at[:, 0].set(0.0).at[:, 2].set(0.0)
  gates.bias[...] = gates.bias[...].at[0].set(40.0).at[2].set(40.0)
  hope.gate_bias[...] = hope.gate_bias[...].at[0].set(40.0)  # η = η_max·(1 − m)
  for name in ("qkv", "out"):
    nnx.update(getattr(hope, name), nnx.state(getattr(titans, name)))
  hope.momentum_gate.kernel[...] = gates.kernel[...][:, 1]
  hope.momentum_gate.bias[...] = gates.bias[...][1]
  for name, w in titans.init_weights.items():  # HOPE's output memory: the last H heads
    hope.memories_init[name][...] = hope.memories_init[name][...].at[-w.shape[0]:].set(w[...])
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 11, H * DK))
  np.testing.assert_allclose(hope(x)[0], titans(x)[0], rtol=1e-5, atol=1e-6)
  loss = lambda m: jnp.sum(jnp.sin(3.0 * m(x)[0]))
  g_hope, g_titans = nnx.grad(loss)(hope), nnx.grad(loss)(titans)
  pairs = [(g_hope[n], g_titans[n]) for n in ("qkv", "out")]
  pairs += [(g_hope["momentum_gate"][n], g_titans["gates"][n][..., 1, :])
            for n in ("kernel", "bias")]
  pairs += [(g_hope["memories_init"][n][-w.shape[0]:], w)
            for n, w in g_titans["init_weights"].items()]
  for a, b in pairs:
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def tiny_hope(**fields):
  cfg = dict(family="hope", d_model=16, n_heads=2, mlp_dim=16, vocab_size=31, n_layers=2,
             max_seq_len=16, memory_chunk_size=2, cms_periods=(2, 4), cms_lr=0.1)
  cfg.update(fields)
  return build_model(cfg, rngs=nnx.Rngs(0))


ABLATIONS = {"w/o DGD": dict(hope_dgd="off"), "w/o momentum": dict(hope_momentum=False),
             "w/o weight decay": dict(hope_weight_decay=False), "w/o CMS": dict(cms=False),
             "w/o adaptive k": dict(hope_adaptive_k=False),
             "w/o adaptive v": dict(hope_adaptive_v=False),
             "adaptive q": dict(hope_adaptive_q=True)}


@pytest.mark.slow
def test_every_table6_ablation_runs_and_changes_the_model():
  tok = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, 31)
  base = tiny_hope()(tok)
  assert bool(jnp.all(jnp.isfinite(base)))
  for name, fields in ABLATIONS.items():
    logits = tiny_hope(**fields)(tok)
    assert bool(jnp.all(jnp.isfinite(logits))), name
    assert float(jnp.abs(logits - base).max()) > 1e-6, name


def _split_and_whole():
  """A HOPE mixer (hope_chunk_size 4, output-memory chunk 2), its params and ``(pieces, full)``:
  calls of 3, 1, 6, 3 tokens (a call that ends a chunk, one spanning two boundaries; starting at
  offsets 0, 3, 0, 2) and one call, as functions of the params."""
  cfg = ModelConfig(family="hope", d_model=H * DK, n_heads=H, hope_chunk_size=4,
                    memory_chunk_size=2, hope_memory="mlp", memory_expand=2)
  graphdef, params = nnx.split(SelfModifyingTitans(cfg, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 13, H * DK))

  def pieces(p):
    mod = nnx.merge(graphdef, p)
    state, outs, start = mod.init_state(B, 0), [], 0
    for size in (3, 1, 6, 3):
      o, state = mod(x[:, start:start + size], state)
      outs.append(o)
      start += size
    return jnp.concatenate(outs, 1), state.offset

  return params, pieces, lambda p: nnx.merge(graphdef, p)(x)[0]


def test_a_sequence_split_anywhere_equals_one_call():
  params, pieces, full = _split_and_whole()
  split, offset = jax.jit(pieces)(params)
  assert offset.tolist() == [13 % 4] * offset.shape[0]  # one offset per row
  np.testing.assert_allclose(split, jax.jit(full)(params), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~40 s on 2 cores
def test_a_sequence_split_anywhere_has_the_one_call_gradients():
  params, pieces, full = _split_and_whole()
  weights = jax.random.normal(jax.random.PRNGKey(4), (B, 13, H * DK))
  g_split = jax.jit(jax.grad(lambda p: jnp.sum(weights * pieces(p)[0])))(params)
  g_full = jax.jit(jax.grad(lambda p: jnp.sum(weights * full(p))))(params)
  for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(hope_dgd="nips"), r"model.hope_dgd='nips' is not one of \('arxiv', 'neurips', 'off'\)"),
    (dict(hope_memory="deep"), r"model.hope_memory='deep' is not one of"),
    (dict(hope_read="before"), r"model.hope_read='before' is not one of"),
    (dict(hope_lr_max=0.0), r"model.hope_lr_max=0.0 is not allowed with "
     r"model.memory_chunk_size=\d+: must be > 0"),
    (dict(hope_lr_max=0.1, hope_chunk_size=8), r"model.hope_lr_max=0.1 is not allowed with "
     r"model.hope_chunk_size=8: must be > 0 and at most 0.5/hope_chunk_size = 0.0625"),
    (dict(expand_v=2), r"model.expand_v=2 is not allowed for family 'hope'"),
    (dict(hope_chunk_size=3, memory_chunk_size=2), r"model.memory_chunk_size=2 is not allowed "
     r"for family 'hope': must divide hope_chunk_size=3"),
])
def test_bad_hope_settings_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny_hope(**fields)


def test_memory_reads_keep_float64():
  """``hope.read`` and ``NeuralMemory.read`` compute in float64 for float64 inputs: a cast of
  the inputs to float32 rounded the cotangents of second-order gradients (the CMS's next_token
  objective) to float32, and a packed row's gradients then differed from its documents' alone
  by ~1e-9 in float64 (tests/nn/test_packed.py, slow)."""
  from nlx.memory import MLPMemory
  from nlx.nn import hope
  from nlx.nn.neural_memory import NeuralMemory
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    w = {"w2": rng.normal(size=(1, H, DK, DK)), "w1": rng.normal(size=(1, H, DK, DK))}
    x = rng.normal(size=(1, T, H, DK))
    got = hope.read(MLPMemory("silu"), jax.tree.map(jnp.asarray, w), jnp.asarray(x))
    assert got.dtype == jnp.float64
    silu = lambda z: z / (1.0 + np.exp(-z))
    want = np.stack([x[0, :, h] + silu(x[0, :, h] @ w["w2"][0, h]) @ w["w1"][0, h]
                     for h in range(H)], 1)[None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13, atol=1e-13)
    # second order through the read: float64 all the way (a float32 cast errs by ~1e-8)
    f = lambda xx: jnp.sum(jnp.tanh(hope.read(MLPMemory("silu"), w, xx)) ** 2)
    hess = jax.grad(lambda xx: jnp.sum(jax.grad(f)(xx) ** 2))(jnp.asarray(x))
    assert hess.dtype == jnp.float64
    cfg = ModelConfig(family="titans_lmm", d_model=8, n_heads=H, vocab_size=11, n_layers=1)
    mem = NeuralMemory(cfg, rngs=nnx.Rngs(0), memory="mlp", lr_max=0.1)
    weights = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mem.initial_memory(1).memory)
    q = jnp.asarray(rng.normal(size=(1, T, H, cfg.dk)))
    assert mem.read(weights, q).dtype == jnp.float64


@pytest.mark.slow  # ~35 s on 2 cores (two float64 compiles)
def test_the_models_gradients_equal_central_differences_in_float64():
  """The outer gradient of a whole HOPE model (five memories written in one stacked call, the
  targets v̂ = M(v) through the memories, the output memory's sub-chunks, the rematerialised
  chunk scan, the CMS's in-context steps) against central differences of its loss, float64, on
  a direction supported on each of the mixer's and the CMS's parameters in turn: autodiff of
  the forward that the loop test above checks against the equations, not of a second copy."""
  with jax.enable_x64(True):
    model = tiny_hope(hope_chunk_size=4, memory_chunk_size=2, n_layers=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, 31)

    @jax.jit
    def loss(p):
      logp = jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(tokens[:, :-1]))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(params)
    leaves, treedef = jax.tree.flatten(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    checked = 0
    for i, (path, g) in enumerate(zip(paths, jax.tree.leaves(grads))):
      if "[0]" not in path or not any(s in path for s in ("mixer", "mlp")):
        continue  # the first block's mixer and CMS
      d = jax.random.normal(jax.random.PRNGKey(i), leaves[i].shape, jnp.float64)
      moved = lambda e: jax.tree.unflatten(treedef, [x + e * d if j == i else x
                                                     for j, x in enumerate(leaves)])
      eps = 1e-5
      fd = (loss(moved(eps)) - loss(moved(-eps))) / (2 * eps)
      np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-4, atol=1e-10, err_msg=path)
      checked += 1
    assert checked >= 15, paths
