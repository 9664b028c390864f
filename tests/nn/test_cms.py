"""Tests of the Continuum Memory System (nlx.nn.cms) against a plain Python loop over tokens: for
each variant, which level updates when (step counters and weights after every token) and the
outputs, for a whole sequence (scan_levels) and token by token (tick); bad settings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx.nn.cms import CMS, swiglu_weights
from nlx.nn.config import ModelConfig

D, HIDDEN, PERIODS, LR, T, B = 8, 16, (2, 4), 0.05, 10, 2
VARIANTS = ("sequential", "nested", "independent")


def mlp(w, x):
  return (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]


class Reference:
  """The CMS of the module docstring, token by token, written from the equations."""

  def __init__(self, variant, blocks, targets, mix):
    self.variant, self.targets, self.mix = variant, targets, mix
    self.n = len(blocks)
    if variant == "nested":  # W_i = init_i + Δ_i for i < L−1; level i+1 owns init_i
      self.params = [{"delta": jax.tree.map(jnp.zeros_like, b)} for b in blocks[:-1]]
      self.params.append({"block": blocks[-1]})
      for i in range(1, self.n):
        self.params[i]["init"] = blocks[i - 1]
    else:
      self.params = list(blocks)
    self.acc = [jax.tree.map(jnp.zeros_like, p) for p in self.params]
    self.resets = [0] * self.n
    self.updates = []  # (token, level) of every update

  def weights(self, params):
    if self.variant != "nested":
      return params
    return [jax.tree.map(jnp.add, params[i + 1]["init"], params[i]["delta"])
            for i in range(self.n - 1)] + [params[-1]["block"]]

  def own_losses(self, params, x):
    h, y, own = x, 0.0, []
    for i, w in enumerate(self.weights(params)):
      inp = x if self.variant == "independent" else h
      o = mlp(w, inp)
      own.append(0.5 * jnp.mean((o - inp @ self.targets[i]) ** 2))
      if self.variant == "independent":
        o = self.mix[i] * o
      else:
        h = h + o
      y = y + o
    return own, y

  def level_loss(self, i, params, x):
    own, _ = self.own_losses(params, x)
    return own[i] + (own[i - 1] if self.variant == "nested" and i > 0 else 0.0)

  def token(self, t, x):
    _, y = self.own_losses(self.params, x)
    for i in range(self.n):
      grad = jax.grad(lambda p_i: self.level_loss(
          i, self.params[:i] + [p_i] + self.params[i + 1:], x))(self.params[i])
      self.acc[i] = jax.tree.map(jnp.add, self.acc[i], grad)
    for i, period in enumerate(PERIODS):
      if (t + 1) % period:
        continue
      self.updates.append((t, i))
      if self.variant == "nested" and i < self.n - 1:
        self.resets[i] += 1
        if self.resets[i] == PERIODS[i + 1] // period:  # the slower level takes over: Δ = 0
          self.resets[i] = 0
          self.params[i] = jax.tree.map(jnp.zeros_like, self.params[i])
        else:
          self.params[i] = jax.tree.map(lambda p, g: p - LR * g, self.params[i], self.acc[i])
      else:
        self.params[i] = jax.tree.map(lambda p, g: p - LR * g, self.params[i], self.acc[i])
      self.acc[i] = jax.tree.map(jnp.zeros_like, self.acc[i])
    return y


def make(variant):
  cfg = ModelConfig(d_model=D, mlp_dim=HIDDEN, cms_periods=PERIODS, cms_variant=variant,
                    cms_lr=LR)
  cms = CMS(cfg, rngs=nnx.Rngs(3))
  if cms.mix is not None:
    cms.mix[...] = jnp.asarray([0.7, 1.3])
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  return cms, x


def reference_run(cms, x_seq):
  blocks = [swiglu_weights(b) for b in cms.blocks]
  ref = Reference(cms.spec.variant, blocks, [t.kernel[...] for t in cms.targets],
                  None if cms.mix is None else cms.mix[...])
  ys, weights = [], []
  for t in range(x_seq.shape[0]):
    ys.append(ref.token(t, x_seq[t]))
    weights.append(list(ref.weights(ref.params)))
  return ref, jnp.stack(ys), weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_sequence_matches_token_loop(variant):
  cms, x = make(variant)
  y, _ = cms(x)
  assert bool(jnp.all(jnp.isfinite(y)))
  for b in range(B):
    ref, y_ref, _ = reference_run(cms, x[b])
    np.testing.assert_allclose(y[b], y_ref, rtol=1e-4, atol=1e-5)
  assert ref.updates == [(1, 0), (3, 0), (3, 1), (5, 0), (7, 0), (7, 1), (9, 0)]
  # The in-context updates matter: the outputs differ from frozen levels after the first update.
  frozen = CMS(ModelConfig(d_model=D, mlp_dim=HIDDEN, cms_periods=PERIODS, cms_variant=variant,
                           cms_lr=0.0), rngs=nnx.Rngs(3))
  if frozen.mix is not None:
    frozen.mix[...] = cms.mix[...]
  y0, _ = frozen(x)
  # float32 through two op orders (the chain at once, the scan over periods): ~20 ulps apart here
  np.testing.assert_allclose(y0[:, :2], y[:, :2], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y0[:, 2:] - y[:, 2:]).max()) > 1e-3


@pytest.mark.parametrize("variant", [
    "sequential", pytest.param("nested", marks=pytest.mark.slow),
    pytest.param("independent", marks=pytest.mark.slow)])
def test_stateful_tokens_update_each_level_at_its_period(variant):
  cms, x = make(variant)
  _, _, ref_weights = reference_run(cms, x[0])
  state = cms.init_state(B, 0)
  ys = []
  for t in range(T):
    y, state = cms(x[:, t:t + 1], state)
    ys.append(y)
    for i, period in enumerate(PERIODS):
      assert int(state[f"level{i}"].step[0]) == (t + 1) % period
    got = cms.spec.block_weights({n: jax.tree.map(lambda a: a[0], s.params)
                                  for n, s in state.items()})
    for g, r in zip(got, ref_weights[t]):
      for name in r:
        np.testing.assert_allclose(g[name], r[name], rtol=1e-4, atol=1e-5)
  whole, _ = cms(x)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), whole, rtol=1e-4, atol=1e-5)


def test_pieces_that_start_mid_period_equal_one_call():
  cms, x = make("sequential")
  whole, _ = cms(x)
  state = cms.init_state(B, 0)
  a, state = cms(x[:, :3], state)
  b, state = cms(x[:, 3:], state)
  np.testing.assert_allclose(jnp.concatenate([a, b], 1), whole, rtol=1e-4, atol=1e-5)
  assert int(state["level1"].step[0]) == T % PERIODS[1]


def test_stop_gradient_cuts_the_outer_gradient_through_writes_only():
  def grads(stop):
    cfg = ModelConfig(d_model=D, mlp_dim=HIDDEN, cms_periods=PERIODS, cms_lr=LR,
                      cms_stop_gradient=stop)
    cms = CMS(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, D))
    graphdef, params = nnx.split(cms)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2)
    return jax.tree.leaves(jax.grad(loss)(params))

  through, stopped = grads(False), grads(True)
  assert all(np.isfinite(g).all() for g in stopped)
  assert any(float(jnp.abs(a - b).max()) > 1e-6 for a, b in zip(through, stopped))


@pytest.mark.parametrize("fields, message", [
    (dict(cms_periods=(4, 6)), r"model.cms_periods=\(4, 6\) must be"),
    (dict(cms_periods=()), r"model.cms_periods=\(\) must be"),
    (dict(cms_variant="stacked"), r"model.cms_variant='stacked' is not one of \('sequential'"),
    (dict(cms_objective="mse"), r"model.cms_objective='mse' is not one of"),
    (dict(cms_lr=-1.0), r"model.cms_lr must be >= 0"),
])
def test_bad_cms_settings_are_refused_by_name(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**fields)


def test_next_token_cms_has_no_local_targets():
  """With the LM loss as objective the CMS only reads its levels (nlx.nn.next_token steps them)."""
  cms = CMS(ModelConfig(cms_objective="next_token"), rngs=nnx.Rngs(0))
  assert cms.targets is None and cms.reads_only
