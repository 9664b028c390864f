"""Per-level CMS rates (``model.cms_lr`` as a tuple, Eq. 71's η^(ℓ)): a level at 0 keeps its
weights while the others learn, equal rates are the float, each level's write is a hand-written
loop of Eq. 71 with its own rate, and bad values are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nlx
from nlx.nn import next_token
from nlx.nn.cms import CMS, CMSSpec, swiglu_weights
from nlx.nn.config import ModelConfig

D, HIDDEN, PERIODS, T, B = 8, 16, (2, 4), 10, 2


def make(lr, variant="sequential", grad_clip=None):
  cfg = ModelConfig(d_model=D, mlp_dim=HIDDEN, cms_periods=PERIODS, cms_variant=variant,
                    cms_lr=lr, cms_grad_clip=grad_clip)
  return CMS(cfg, rngs=nnx.Rngs(3))


def inputs(b=B):
  return jax.random.normal(jax.random.PRNGKey(0), (b, T, D))


def max_change(before, after):
  return max(float(jnp.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("variant, rates", [
    ("sequential", (0.05, 0.0)), ("sequential", (0.0, 0.05)), ("nested", (0.05, 0.0)),
    ("independent", (0.05, 0.0))])
def test_a_level_at_rate_zero_keeps_its_weights_while_the_others_learn(variant, rates):
  cms = make(rates, variant)
  state = cms.init_state(B, 0)
  _, after = cms(inputs(), state)
  for i, rate in enumerate(rates):
    name = f"level{i}"
    change = max_change(state[name].params, after[name].params)
    if rate == 0:
      assert change == 0.0, (name, change)
    else:
      assert change > 1e-4, (name, change)
    assert int(after[name].step[0]) == T % PERIODS[i]  # the frozen level still counts tokens


def test_equal_rates_are_the_float():
  x = inputs()
  by_float, by_tuple = make(0.05), make((0.05, 0.05))
  assert by_tuple.spec == by_float.spec and hash(by_tuple.spec) == hash(by_float.spec)
  y_float = by_float(x)[0]
  np.testing.assert_array_equal(by_tuple(x)[0], y_float)
  _, s_float = by_float(x, by_float.init_state(B, 0))
  _, s_tuple = by_tuple(x, by_tuple.init_state(B, 0))
  jax.tree.map(np.testing.assert_array_equal, s_tuple, s_float)
  # Not vacuous: another rate on one level changes the output.
  assert float(jnp.abs(make((0.05, 0.5))(x)[0] - y_float).max()) > 1e-4


def eq71_loop(blocks, targets, x, rates, clip=None):
  """Sequential CMS, token by token: θ^(ℓ) ← θ^(ℓ) − η^(ℓ) Σ_{last C^(ℓ) tokens} ∇ℓ^(ℓ)_t
  (with ``clip``: the sum scaled down to global norm ``clip`` where it is longer).

  Level ℓ's loss at token t is ½·mean((o_ℓ − h_{ℓ−1} W_ℓ)²) with o_ℓ = MLP_ℓ(h_{ℓ−1}),
  h_ℓ = h_{ℓ−1} + o_ℓ and h_0 = x_t; its gradient is taken w.r.t. its own weights only.
  Returns the outputs ``y_t = Σ_ℓ o_ℓ`` and the weights after every token.
  """
  mlp = lambda w, h: (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]

  def level_loss(i, weights, xt):
    h = xt
    for j, w in enumerate(weights):
      o = mlp(w, h)
      if j == i:
        return 0.5 * jnp.mean((o - h @ targets[j]) ** 2)
      h = h + o

  weights = list(blocks)
  sums = [jax.tree.map(jnp.zeros_like, w) for w in weights]
  ys, history = [], []
  for t, xt in enumerate(x):
    h, y = xt, 0.0
    for w in weights:
      o = mlp(w, h)
      h, y = h + o, y + o
    ys.append(y)
    grads = [jax.grad(lambda w_i, i=i: level_loss(
        i, weights[:i] + [w_i] + weights[i + 1:], xt))(weights[i]) for i in range(len(weights))]
    sums = [jax.tree.map(jnp.add, s, g) for s, g in zip(sums, grads)]
    for i, (period, rate) in enumerate(zip(PERIODS, rates)):
      if (t + 1) % period == 0:
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(sums[i])))
        shrink = 1.0 if clip is None else jnp.minimum(1.0, clip / norm)
        weights[i] = jax.tree.map(lambda w, s, r=rate: w - r * shrink * s, weights[i], sums[i])
        sums[i] = jax.tree.map(jnp.zeros_like, sums[i])
    history.append(list(weights))
  return jnp.stack(ys), history


@pytest.mark.parametrize("clip", [None, 0.05])
def test_each_level_writes_with_its_own_rate_as_eq_71(clip):
  rates = (0.05, 0.3)
  cms = make(rates, grad_clip=clip)
  x = inputs(1)
  blocks = [swiglu_weights(b) for b in cms.blocks]
  y_ref, history = eq71_loop(blocks, [t.kernel[...] for t in cms.targets], x[0], rates, clip)
  if clip is not None:  # not vacuous: the clip binds, the plain step writes something else
    _, plain = eq71_loop(blocks, [t.kernel[...] for t in cms.targets], x[0], rates)
    assert max_change(plain[-1][1], history[-1][1]) > 1e-4
  # Token by token (levels.tick): every level's weights after every token.
  state = cms.init_state(1, 0)
  step = jax.jit(lambda s, xt: cms(xt, s)[1])  # one compilation for the T calls
  for t in range(T):
    state = step(state, x[:, t:t + 1])
    for i in range(len(PERIODS)):
      got = jax.tree.map(lambda a: a[0], state[f"level{i}"].params)
      for name in got:
        np.testing.assert_allclose(got[name], history[t][i][name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"token {t}, level {i}, {name}")
  # The whole sequence (levels.scan_levels): the outputs.
  np.testing.assert_allclose(cms(x)[0][0], y_ref, rtol=1e-4, atol=1e-5)
  # The rates are really per level: swapping them changes level 1's last write.
  _, swapped = eq71_loop(blocks, [t.kernel[...] for t in cms.targets], x[0], rates[::-1], clip)
  assert max_change(swapped[-1][1], history[-1][1]) > 1e-4


def test_next_token_levels_use_their_own_rates():
  base = dict(family="hope_attention", vocab_size=32, d_model=16, n_heads=2, n_layers=1,
              mlp_dim=24, cms_periods=PERIODS, cms_objective="next_token", max_seq_len=32)
  frozen = nlx.build_model(ModelConfig(cms_lr=(0.0, 0.0), **base), rngs=nnx.Rngs(0))
  assert not frozen.cms_next_token  # every rate 0: the plain forward, no chunk loop
  model = nlx.build_model(ModelConfig(cms_lr=(0.5, 0.0), **base), rngs=nnx.Rngs(0))
  assert model.cms_next_token
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, 32)
  start = model.init_state(1)
  _, state = model.prefill(tokens, start)
  cms_state = lambda s: [x for x in jax.tree.leaves(s["layers"], is_leaf=next_token.is_cms_state)
                         if next_token.is_cms_state(x)][0]
  before, after = cms_state(start), cms_state(state)
  assert max_change(before["level0"].params, after["level0"].params) > 1e-4
  assert max_change(before["level1"].params, after["level1"].params) == 0.0


@pytest.mark.parametrize("value", [(0.1,), (0.1, 0.1, 0.1), (0.1, -0.1), (0.1, float("nan")),
                                   (True, 0.1), float("inf"), (0.1, "fast")])
def test_bad_rates_are_refused_by_name(value):
  message = (r"model.cms_lr must be >= 0 and finite: a float \(every level\) or a tuple of "
             r"len\(cms_periods\)=2 such floats \(one per level\); got ")
  with pytest.raises(ValueError, match=message):
    ModelConfig(cms_periods=PERIODS, cms_lr=value)


def test_the_clip_keeps_a_diverging_in_context_step_finite():
  # A rate far beyond what the weights allow: the plain step (Eq. 71) overflows within 64
  # tokens; clipped, each update moves a level by at most lr * clip, so it cannot.
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (1, 64, D))
  assert not bool(jnp.isfinite(make(1.0)(x)[0]).all())
  assert bool(jnp.isfinite(make(1.0, grad_clip=1.0)(x)[0]).all())


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_bad_grad_clip_is_refused_by_name(value):
  with pytest.raises(ValueError, match=r"model.cms_grad_clip=.* must be None \(no clip\) or a "
                     r"finite float > 0|model.cms_grad_clip must be"):
    ModelConfig(cms_periods=PERIODS, cms_grad_clip=value)


def test_a_list_is_read_as_a_tuple_and_a_wrong_type_is_refused():
  cfg = ModelConfig(cms_periods=PERIODS, cms_lr=[0.1, 0])
  assert cfg.cms_lr == (0.1, 0.0) and cfg.cms_lrs == (0.1, 0.0)
  assert ModelConfig(cms_periods=PERIODS, cms_lr=0.2).cms_lrs == (0.2, 0.2)
  with pytest.raises(ValueError, match=r"model.cms_lr must be a float or tuple; got 'fast'"):
    ModelConfig(cms_lr="fast")
  with pytest.raises(ValueError, match=r"cms_lr=\(0.1,\) must have one rate per CMS level \(2\)"):
    CMSSpec(PERIODS, "sequential", (0.1,))


def test_a_per_level_tuple_is_accepted_as_a_command_line_override():
  from nlx import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.load("configs/hope.py:tiny", ["model.cms_lr=(0.1, 0.0)"])
  assert configs.validate(cfg).model.cms_lrs == (0.1, 0.0)
  with pytest.raises(ValueError, match=r"model.cms_lr must be >= 0 .* len\(cms_periods\)=2"):
    configs.validate(configs.load("configs/hope.py:tiny", ["model.cms_lr=(0.1, 0.0, 0.3)"]))
