"""CMS levels learning from the LM loss (``cms_objective="next_token"``, nlx.nn.next_token).

The reference is a plain Python loop over chunks: for a one-layer model the CMS output feeds no
later mixer, so chunk i's logits are those of a frozen copy of the model whose CMS weights are the
current ones, run on the whole prefix; its chunk loss is differentiated w.r.t. those weights, the
gradients are summed per level and each level steps at its period.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nlx
from nlx.nn import ModelConfig

BASE = dict(vocab_size=32, d_model=16, n_heads=2, mlp_dim=24, cms_periods=(2, 4), cms_lr=0.5,
            cms_objective="next_token", max_seq_len=64)
T = 13  # not a multiple of C_1: the last chunk is read, not learned from


def tokens(t=T):
  return jax.random.randint(jax.random.PRNGKey(1), (2, t), 0, BASE["vocab_size"])


def build(family="hope_attention", n_layers=1, **fields):
  return nlx.build_model(ModelConfig(family=family, n_layers=n_layers, **{**BASE, **fields}),
                         rngs=nnx.Rngs(0))


def frozen_copy(model):
  """The same weights with ``cms_lr = 0`` (local objective): the CMS reads its initial weights."""
  frozen = build(cms_lr=0.0, cms_objective="local")
  params = nnx.state(frozen, nnx.Param).to_pure_dict()

  def copy(dst, src):
    for key, value in src.items():
      if isinstance(value, dict):
        copy(dst[key], value)
      else:
        dst[key] = value

  copy(params, nnx.state(model, nnx.Param).to_pure_dict())
  state = nnx.state(frozen, nnx.Param)
  state.replace_by_pure_dict(params)
  nnx.update(frozen, state)
  return frozen


def reference(model, tok):
  """Logits ``[B, T, V]`` of the chunk loop described in the module docstring."""
  frozen = frozen_copy(model)
  graphdef, state = nnx.split(frozen, nnx.Param)
  pure = state.to_pure_dict()
  c, periods, lr = BASE["cms_periods"][0], BASE["cms_periods"], BASE["cms_lr"]

  @jax.jit
  def logits_with(weights, row_tokens):  # causal: positions < end never see tokens >= end
    p = jax.tree.map(lambda x: x, pure)
    p["layers"]["blocks"][0]["mlp"]["blocks"] = weights
    s = jax.tree.map(lambda x: x, state)
    s.replace_by_pure_dict(p)
    return nnx.merge(graphdef, s)(row_tokens[None])[0]

  @jax.jit
  def chunk_grad(weights, row_tokens, start):
    def loss(w):
      nll = optax.softmax_cross_entropy_with_integer_labels(logits_with(w, row_tokens)[:-1],
                                                            row_tokens[1:])
      inside = (jnp.arange(nll.shape[0]) >= start) & (jnp.arange(nll.shape[0]) < start + c - 1)
      return jnp.sum(jnp.where(inside, nll, 0.0))
    return jax.grad(loss)(weights)

  rows = []
  for row_tokens in tok:
    weights = dict(pure["layers"]["blocks"][0]["mlp"]["blocks"])
    acc = {i: jax.tree.map(jnp.zeros_like, weights[i]) for i in weights}
    out = []
    for start in range(0, tok.shape[1], c):
      end = min(start + c, tok.shape[1])
      out.append(logits_with(weights, row_tokens)[start:end])
      if end - start < c:
        break
      grads = chunk_grad(weights, row_tokens, start)
      for i, period in enumerate(periods):
        acc[i] = jax.tree.map(jnp.add, acc[i], grads[i])
        if end % period == 0:
          weights[i] = jax.tree.map(lambda w, a: w - lr * a, weights[i], acc[i])
          acc[i] = jax.tree.map(jnp.zeros_like, acc[i])
    rows.append(jnp.concatenate(out, 0))
  return jnp.stack(rows), frozen


def test_whole_sequence_matches_chunk_loop():
  model, tok = build(), tokens()
  logits = model(tok)
  ref, frozen = reference(model, tok)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  still = frozen(tok)
  np.testing.assert_allclose(logits[:, :2], still[:, :2], rtol=1e-6, atol=1e-6)  # first chunk
  assert float(jnp.abs(logits[:, 2:] - still[:, 2:]).max()) > 1e-2  # the updates matter


@pytest.mark.slow  # ~40 s: the token-by-token path compiles the chunk's gradient in a cond
@pytest.mark.parametrize("family", ["hope_attention", "hope"])
def test_pieces_and_steps_equal_one_call(family):
  model = build(family, n_layers=2, memory_chunk_size=1)
  tok = tokens()
  whole = model(tok)
  state, outs = model.init_state(2, T), []
  for a, b in [(0, 3), (3, 8)]:
    out, state = model.prefill(tok[:, a:b], state)
    outs.append(out)
  for t in range(8, T):
    out, state = model.step(tok[:, t], state)
    outs.append(out[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, rtol=1e-5, atol=1e-5)
  assert int(state["pos"]) == T


@pytest.mark.parametrize("stop_gradient", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_outer_gradient_reaches_the_initial_cms_weights(stop_gradient):
  model, tok = build(cms_stop_gradient=stop_gradient), tokens(5)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in flat)
  down = grads["layers"]["blocks"][0]["mlp"]["blocks"][0]["down"]["kernel"][...]
  assert float(jnp.abs(down).max()) > 0
  # The CMS holds no local targets with this objective.
  assert model.layers.blocks[0].mlp.targets is None
