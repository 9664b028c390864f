"""Tests of HOPE (nlx.nn.hope): the dot-product linear memory without momentum is exactly
nlx.ops.delta_rule with target v̂; DGD with momentum on a linear memory equals a plain loop of
Eq. 88; every Table 6 ablation switch builds, runs and changes the output; bad settings are
refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import ops
from nlx.nn import build_model
from nlx.nn.config import ModelConfig
from nlx.nn.hope import SelfModifyingTitans

B, T, H, DK = 2, 7, 2, 4


def mixer(**fields):
  cfg = ModelConfig(family="hope", d_model=H * DK, n_heads=H, memory_chunk_size=1,
                    hope_memory="linear", impl="recurrent", **fields)
  return SelfModifyingTitans(cfg, rngs=nnx.Rngs(0))


def inputs(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(jax.random.normal(keys[0], (B, T, H, DK))), unit(jax.random.normal(keys[1], (B, T, H,
                                                                                             DK)))
  target = jax.random.normal(keys[2], (B, T, H, DK))
  eta = jax.random.uniform(keys[3], (B, T, H), minval=0.1, maxval=0.9)
  log_alpha = jnp.log(jax.random.uniform(keys[4], (B, T, H), minval=0.8, maxval=1.0))
  s0 = jax.random.normal(keys[5], (B, H, DK, DK))
  return q, k, target, eta, log_alpha, s0


def test_dot_objective_without_momentum_is_delta_rule_with_target_v_hat():
  m = mixer(hope_objective="dot", hope_momentum=False)
  q, k, target, eta, log_alpha, s0 = inputs()
  o, state = m.write(ops.TitansState({"w": s0}), q, k, target, eta, log_alpha, None, chunk=T)
  rate = eta / (1 + eta)  # hope_dgd="arxiv"
  alpha = jnp.exp(log_alpha)
  o_ref, s_ref = ops.delta_rule(q, k, alpha[..., None] * target, beta=rate / alpha, g=log_alpha,
                                scale=1.0, initial_state=s0, impl="recurrent")
  np.testing.assert_array_equal(o, o_ref)
  np.testing.assert_array_equal(state.memory["w"], s_ref)
  # ... and that is Eq. 92, M ← M(αI − η' k kᵀ) + η' v̂ kᵀ, token by token (S = Mᵀ).
  s = s0
  for t in range(T):
    a, e = alpha[:, t, :, None, None], rate[:, t, :, None, None]
    kk = jnp.einsum("bhi,bhj->bhij", k[:, t], k[:, t])
    s = a * s - e * kk @ s + e * jnp.einsum("bhi,bhj->bhij", k[:, t], target[:, t])
  np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dgd", ["arxiv", "neurips", "off"])
def test_l2_dgd_with_momentum_on_a_linear_memory_is_eq_88(dgd):
  m = mixer(hope_dgd=dgd)
  q, k, target, eta, log_alpha, s0 = inputs(1)
  mom = jnp.full((B, T, H), 0.6)
  p0 = jnp.zeros_like(s0)
  o, state = m.write(ops.TitansState({"w": s0}, {"w": p0}), q, k, target, eta, log_alpha, mom,
                     chunk=1)
  rate = eta / (1 + eta) if dgd == "arxiv" else eta
  s, p, outs = s0, p0, []
  for t in range(T):  # M_t = α M − η'(M k kᵀ [DGD]) − η' ∇½‖Mk − v̂‖², with momentum S_t
    kt, e = k[:, t], rate[:, t, :, None, None]
    pred = jnp.einsum("bhi,bhij->bhj", kt, s)
    grad = jnp.einsum("bhi,bhj->bhij", kt, pred - target[:, t])
    if dgd != "off":
      grad = grad + jnp.einsum("bhi,bhj->bhij", kt, pred)
    p = mom[:, t, :, None, None] * p - e * grad
    s = jnp.exp(log_alpha[:, t, :, None, None]) * s + p
    outs.append(jnp.einsum("bhi,bhij->bhj", q[:, t], s))
  np.testing.assert_allclose(state.memory["w"], s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(o, jnp.stack(outs, 1), rtol=1e-5, atol=1e-5)


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
  assert int(offset) == 13 % 4
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
    (dict(hope_read="before_write"), r"model.hope_read='before_write' is not one of"),
    (dict(hope_lr_max=0.0), r"model.hope_lr_max=0.0 is not allowed with "
     r"model.memory_chunk_size=\d+: must be > 0"),
    (dict(hope_lr_max=0.1, hope_chunk_size=8), r"model.hope_lr_max=0.1 is not allowed with "
     r"model.hope_chunk_size=8: must be > 0 and at most 0.5/hope_chunk_size = 0.0625"),
    (dict(hope_objective="dot"), r"model.hope_objective='dot' is not allowed for family 'hope': "
     r"the dot-product objective needs hope_memory='linear'"),
    (dict(expand_v=2), r"model.expand_v=2 is not allowed for family 'hope'"),
    (dict(hope_chunk_size=3, memory_chunk_size=2), r"model.memory_chunk_size=2 is not allowed "
     r"for family 'hope': must divide hope_chunk_size=3"),
])
def test_bad_hope_settings_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny_hope(**fields)
