"""The one train step (``nlx.train.step.apply_gradients``) and the small loop on it (``fit``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nlx.train import fitting
from nlx.train.step import apply_gradients


class Affine(nnx.Module):

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))
    self.b = nnx.Param(jnp.zeros((2,)))
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # not a Param: held fixed by fit

  def __call__(self, x):
    return x @ self.w + self.b


def squared_error(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def regression_batches(step):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  return x, x @ np.array([[1., -1.], [2., 0.], [0., 3.]], np.float32) + 0.5


def test_apply_gradients_is_one_optax_step():
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones((2,))}
  tx = optax.sgd(0.1)
  x, y = regression_batches(0)
  loss_fn = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  up = apply_gradients(loss_fn, tx, params, tx.init(params), x, y)
  grads = jax.grad(loss_fn)(params, x, y)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  for got, want in zip(jax.tree.leaves(up.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert bool(up.finite) and not up.nonfinite_grads.any()
  np.testing.assert_allclose(up.loss, loss_fn(params, x, y), rtol=1e-6)


def test_apply_gradients_keeps_frozen_leaves_and_skips_nonfinite_steps():
  params = {"a": jnp.ones((2,)), "b": jnp.full((2,), -0.0)}
  tx = optax.adam(1e-1)
  loss_fn = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum((p["b"] - 1.0) ** 2)
  up = apply_gradients(loss_fn, tx, params, tx.init(params), trainable=(True, False))
  assert not np.allclose(up.params["a"], 1.0)
  assert np.array_equal(np.signbit(up.params["b"]), np.ones(2, bool))  # -0.0 kept bit for bit
  bad = lambda p: jnp.sum(p["a"]) * jnp.nan + jnp.sum(p["b"])
  up = apply_gradients(bad, tx, params, tx.init(params))
  assert not bool(up.finite)
  assert up.nonfinite_grads.tolist() == [True, False]
  for got, want in zip(jax.tree.leaves(up.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_apply_gradients_returns_aux():
  loss_fn = lambda p: (jnp.sum(p ** 2), {"norm": jnp.linalg.norm(p)})
  tx = optax.sgd(0.5)
  up = apply_gradients(loss_fn, tx, jnp.ones(4), tx.init(jnp.ones(4)), has_aux=True)
  np.testing.assert_allclose(up.aux["norm"], 2.0)
  np.testing.assert_allclose(up.params, jnp.zeros(4), atol=1e-7)


def test_fit_trains_evaluates_and_compiles_once():
  tx = optax.adam(5e-2)
  fitting.compiled_step.cache_clear()
  evals = []
  result = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, 60, tx=tx, loss=squared_error,
                       progress=False, eval_every=25,
                       evaluate=lambda m: evals.append(1) or {"b0": float(m.b[0])})
  assert len(result.losses) == 60 and result.losses[-1] < 0.2 * result.losses[0]
  assert [e["step"] for e in result.evals] == [25, 50, 60]
  assert result.params == 8 and result.skipped == 0 and result.tokens_per_second > 0
  # A second model of the same graph, the same tx and loss: the compiled step is reused.
  fitting.fit(Affine(nnx.Rngs(1)), regression_batches, 2, tx=tx, loss=squared_error,
              progress=False)
  info = fitting.compiled_step.cache_info()
  assert info.misses == 1 and info.hits == 1


def test_fit_continues_from_an_optimizer_state_like_one_longer_run():
  tx = optax.adam(5e-2)
  one = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, 10, tx=tx, loss=squared_error,
                    progress=False)
  state = []
  first = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, 4, tx=tx, loss=squared_error,
                      progress=False, on_step=lambda s, up: state.append(up.opt_state))
  # Continue with the optimizer state of the first part (fit's batches restart at step 0).
  second = fitting.fit(first.model, lambda s: regression_batches(s + 4), 6, tx=tx,
                       loss=squared_error, opt_state=state[-1], progress=False)
  np.testing.assert_allclose(second.losses, one.losses[4:], rtol=1e-5)
  np.testing.assert_allclose(second.model.w[...], one.model.w[...], rtol=1e-5)


def test_fit_counts_skipped_steps():
  def sometimes_nan(model, batch):
    x, y = batch
    return squared_error(model, batch) * jnp.where(jnp.abs(x[0, 0]) > 1.0, jnp.nan, 1.0)

  tx = optax.sgd(1e-2)
  for steps in (20, 27):  # 27: the last 7 steps are read once, after the loop
    with pytest.warns(RuntimeWarning) as record:
      result = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, steps, tx=tx,
                           loss=sometimes_nan, progress=False)
    bad = [s for s in range(steps) if abs(regression_batches(s)[0][0, 0]) > 1.0]
    expected = len(bad)
    assert 0 < expected < steps and result.skipped == expected
    # One warning per 10 steps holding a skipped one, naming its first skipped step.
    messages = [str(w.message) for w in record if "was skipped" in str(w.message)]
    blocks = sorted({s // 10 for s in bad})
    assert len(messages) == len(blocks), (steps, messages)
    for message, block in zip(messages, blocks):
      first = min(s for s in bad if s // 10 == block)
      assert message.startswith(f"fit: step {first} had a non-finite loss"), message
    assert np.isfinite(np.asarray(result.model.w[...])).all()


def test_fit_stops_at_its_time_cap_and_evaluates_there(monkeypatch):
  clock = iter(range(1000))  # one "second" per time.time() call: the cap falls mid-run
  monkeypatch.setattr(fitting.time, "time", lambda: float(next(clock)))
  tx = optax.adam(5e-2)
  result = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, 100, tx=tx, loss=squared_error,
                       progress=False, eval_every=4, evaluate=lambda m: {"b0": float(m.b[0])},
                       max_seconds=10)
  assert 1 < len(result.losses) < 100
  steps = [e["step"] for e in result.evals]
  assert steps[-1] == len(result.losses) and steps[:-1] == list(range(4, steps[-1], 4))
  full = fitting.fit(Affine(nnx.Rngs(0)), regression_batches, len(result.losses), tx=tx,
                     loss=squared_error, progress=False)
  np.testing.assert_allclose(result.losses, full.losses, rtol=1e-6)  # the same steps, cut
  with pytest.raises(ValueError, match="max_seconds must be > 0"):
    fitting.fit(Affine(nnx.Rngs(0)), regression_batches, 2, tx=tx, loss=squared_error,
                progress=False, max_seconds=0)


def test_next_token_loss_is_the_mean_cross_entropy():
  class Uniform(nnx.Module):
    def __call__(self, tokens):
      return jnp.zeros(tokens.shape + (7,))

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 9)))
  np.testing.assert_allclose(fitting.next_token_loss(Uniform(), tokens), np.log(7), rtol=1e-6)


if __name__ == "__main__":
  pytest.main([__file__])
