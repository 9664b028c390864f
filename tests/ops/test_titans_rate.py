"""``titans_memory(..., rate="normalized")``: each layer of the memory steps at
``lr_t / max(1, ‖h_l‖²)`` for its input ``h_l`` at the gradient's reference state.

The reference is a plain Python loop over tokens of the equation (not of the core's form); the
chunked form equals the recurrent one for every chunk size, forward and gradients, in float64.
An MLP memory's hidden layer whose input is long runs away with the plain step on a repeated key
(the S-NIAH study's divergence, docs/RELIABILITY.md) and stays bounded at the normalised rate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
from nlx.memory import MLPMemory
from nlx.memory.deep import ACTIVATIONS

B, T, H, D, HIDDEN = 2, 13, 2, 4, 8


def inputs(seed=0, scale_w2=3.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  normal = lambda i, shape, s=1.0: s * jax.random.normal(ks[i], shape, jnp.float64)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return dict(q=unit(normal(0, (B, T, H, D))), k=unit(normal(1, (B, T, H, D))),
              v=normal(2, (B, T, H, D)), lr=0.3 * jax.nn.sigmoid(normal(3, (B, T, H))),
              g=-0.1 * jax.nn.softplus(normal(4, (B, T, H))),
              momentum=jax.nn.sigmoid(normal(5, (B, T, H))),
              # A first layer of norm ~3 makes the hidden layer's input longer than 1, so the
              # normalisation binds there (the test checks that it does).
              w2=normal(6, (B, H, D, HIDDEN), scale_w2 * D**-0.5),
              w1=normal(7, (B, H, HIDDEN, D), HIDDEN**-0.5))


def op(x, impl, chunk_size, rate="normalized", **kw):
  return ops.titans_memory(x["q"], x["k"], x["v"], lr=x["lr"], g=x["g"], momentum=x["momentum"],
                           memory=MLPMemory(), initial_state={"w2": x["w2"], "w1": x["w1"]},
                           chunk_size=chunk_size, impl=impl, rate=rate, **kw)


def token_loop(x, rate="normalized"):
  """Per (batch, head), token by token: G at the state before the token (chunk size 1),
  P ← η P − lr_l G_l, W ← exp(g) W + P, o = M_W(q); lr_l = lr / max(1, ‖h_l‖²) (normalised)."""
  act = ACTIVATIONS["gelu"]
  forward = lambda w, x_: x_ + act(x_ @ w["w2"]) @ w["w1"]
  x = jax.tree.map(np.asarray, x)
  out, bound = np.zeros((B, T, H, D)), 0
  for b in range(B):
    for h in range(H):
      w = {"w2": x["w2"][b, h], "w1": x["w1"][b, h]}
      p = {n: np.zeros_like(a) for n, a in w.items()}
      for t in range(T):
        k, v, lr = x["k"][b, t, h], x["v"][b, t, h], x["lr"][b, t, h]
        grads = jax.grad(lambda w_: 0.5 * jnp.sum((forward(w_, k) - v) ** 2))(w)
        inputs_ = {"w2": k, "w1": np.asarray(act(k @ w["w2"]))}  # each layer's input
        for n in w:
          norm = float(np.sum(inputs_[n] ** 2))
          bound += norm > 1.0
          rate_n = lr / max(1.0, norm) if rate == "normalized" else lr
          p[n] = x["momentum"][b, t, h] * p[n] - rate_n * np.asarray(grads[n])
        w = {n: np.exp(x["g"][b, t, h]) * w[n] + p[n] for n in w}
        out[b, t, h] = np.asarray(forward(w, x["q"][b, t, h]))
  return out, bound


def test_normalized_rate_is_the_token_loop():
  with jax.enable_x64(True):
    x = inputs()
    want, bound = token_loop(x)
    assert bound > T  # the normalisation changes many steps (hidden inputs longer than 1)
    for impl in ("recurrent", "chunked"):
      got, _ = op(x, impl, 1)
      np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10, err_msg=impl)
    plain, _ = token_loop(x, "plain")
    assert np.max(np.abs(plain - want)) > 1e-3  # the test tells the two rates apart
    np.testing.assert_allclose(op(x, "recurrent", 1, rate="plain")[0], plain, atol=1e-10,
                               rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [4, pytest.param(5, marks=pytest.mark.slow)])
def test_chunked_equals_recurrent_forward_and_gradients(chunk_size):
  with jax.enable_x64(True):
    x = inputs(1)
    weights = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, D), jnp.float64)

    def loss(impl):
      def f(x_):
        o, state = op(x_, impl, chunk_size)
        return jnp.sum(o * weights) + sum(jnp.sum(a) for a in jax.tree.leaves(state.memory))
      return f

    got, want = jax.value_and_grad(loss("chunked"))(x), jax.value_and_grad(loss("recurrent"))(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for name in x:
      np.testing.assert_allclose(got[1][name], want[1][name], atol=1e-10, rtol=1e-9,
                                 err_msg=name)


def test_linear_memory_rate_divides_by_the_key_norm():
  with jax.enable_x64(True):
    x = inputs(2)
    k = 1.7 * x["k"]  # keys longer than 1
    s0 = jax.random.normal(jax.random.PRNGKey(4), (B, H, D, D), jnp.float64)
    call = lambda lr, rate: ops.titans_memory(x["q"], k, x["v"], lr=lr, g=x["g"],
                                              momentum=x["momentum"], initial_state=s0,
                                              chunk_size=4, impl="chunked", rate=rate)[0]
    scaled = x["lr"] / jnp.maximum(1.0, jnp.sum(k * k, -1))
    np.testing.assert_allclose(call(x["lr"], "normalized"), call(scaled, "plain"), rtol=1e-12)


def test_a_repeated_key_runs_away_with_the_plain_step_only():
  """C repeated keys at the chunk bound (C·lr = 0.5) with a hidden layer whose input is long
  (first layer of norm ~8): the plain step's weights grow a hundredfold, the normalised ones
  stay within twice their start."""
  with jax.enable_x64(True):
    x = inputs(3, scale_w2=8.0)
  c, t = 16, 256
  rep = lambda a: jnp.broadcast_to(a[:, :1], (B, t) + a.shape[2:]).astype(jnp.float32)
  y = {n: rep(x[n]) for n in ("q", "k", "v")}
  y.update(w2=x["w2"].astype(jnp.float32), w1=x["w1"].astype(jnp.float32),
           g=jnp.zeros((B, t, H), jnp.float32), momentum=jnp.full((B, t, H), 0.5, jnp.float32),
           lr=jnp.full((B, t, H), 0.5 / c * (1 - 0.5), jnp.float32))  # nlx.nn.neural_memory's
  largest = lambda tree: max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(tree))
  start = largest({"w2": y["w2"], "w1": y["w1"]})
  plain = largest(op(y, "chunked", c, rate="plain")[1].memory)
  normalized = largest(op(y, "chunked", c, rate="normalized")[1].memory)
  assert not np.isfinite(plain) or plain > 100 * start, (plain, start)
  assert normalized < 2 * start, (normalized, start)


def test_an_unknown_rate_is_refused():
  from nlx.nn import neural_memory_config
  from nlx.ops import titans
  assert titans.RATES == neural_memory_config.TITANS_RATES  # the config's copy (no JAX there)
  with jax.enable_x64(True):
    x = inputs()
  with pytest.raises(ValueError,
                     match=r"rate='proximal' is not one of \('plain', 'normalized', 'gram'\)"):
    op(x, "chunked", 4, rate="proximal")
