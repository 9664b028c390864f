"""DMGD: identity memory = classical momentum; the memory's own step vs a jax.grad reference;
meta-learning through nlx.levels = a hand-written meta-gradient step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlx import optim
from nlx.memory import LinearMemory
from nlx.optim import meta
from optim_cases import assert_trees_close, quadratic_problem, run


@pytest.mark.parametrize("memory", [None, LinearMemory()])
def test_dmgd_with_frozen_identity_memory_equals_sgd_momentum(memory):
  with jax.enable_x64(True):
    params, loss = quadratic_problem(5)
    tx = optim.deep_momentum(0.01, beta=0.9, inner_lr=0.0, memory_decay=1.0, memory=memory)
    ours = run(tx, params, loss, 30)
    ref = run(optax.sgd(0.01, momentum=0.9), params, loss, 30)
    assert_trees_close(ours, ref, rtol=1e-9, atol=1e-12)


def mlp_read(w, x):
  return x + jax.nn.gelu(x @ w["w2"]) @ w["w1"]


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_dmgd_memory_step_matches_reference(objective):
  """One update by hand: normalised rows, a GD step on the mean inner loss, read after write."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=(2, 3, 4)))
    params = {"p": jnp.zeros((2, 3, 4))}
    w = {"w2": jnp.asarray(rng.normal(size=(4, 5))), "w1": jnp.asarray(rng.normal(size=(5, 4)))}
    tx = optim.scale_by_deep_momentum(beta=0.5, inner_lr=0.3, memory_decay=0.8,
                                      objective=objective, initial_memory={"p": w})
    state = tx.init(params)
    out1, state = tx.update({"p": g}, state, params)
    out2, state = tx.update({"p": 2 * g}, state, params)

    def loss(wt, k):
      pred = mlp_read(wt, k)
      per_row = -(pred * k).sum(-1) if objective == "dot" else 0.5 * ((pred - k) ** 2).sum(-1)
      return per_row.mean()

    rows = g.reshape(-1, 4)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    k = rows / norms
    w_ref, p_ref = w, 0.0
    for scale in (1.0, 2.0):
      grads = jax.grad(loss)(w_ref, k)  # keys are directions: the same for g and 2g
      w_ref = jax.tree.map(lambda a, b: 0.8 * a - 0.3 * b, w_ref, grads)
      p_ref = 0.5 * p_ref + (scale * norms * mlp_read(w_ref, k)).reshape(g.shape)
      if scale == 1.0:
        np.testing.assert_allclose(out1["p"], p_ref, rtol=1e-10)
    np.testing.assert_allclose(out2["p"], p_ref, rtol=1e-10)
    assert_trees_close(state.memory["p"], w_ref, rtol=1e-10)
    assert np.abs(np.asarray(out2["p"]) - 1.5 * np.asarray(g)).max() > 1e-3  # memory acted


def test_dmgd_bad_arguments():
  with pytest.raises(ValueError, match=r"inner_lr=-0.1"):
    optim.deep_momentum(0.1, inner_lr=-0.1)
  with pytest.raises(ValueError, match=r"objective='cos'"):
    optim.deep_momentum(0.1, objective="cos")
  with pytest.raises(ValueError, match=r"memory=.*nlx.memory.Memory"):
    optim.deep_momentum(0.1, memory="mlp")


def regression_tasks(n_tasks, seed=0, d=3, n=8):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  x = jax.random.normal(keys[0], (n_tasks, n, d))
  w = jax.random.normal(keys[1], (n_tasks, d))
  y = jnp.einsum("tnd,td->tn", x, w)
  return jnp.zeros((n_tasks, d)), (x, y)


def regression_loss(w, data):
  x, y = data
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def test_meta_train_equals_hand_written_meta_steps_and_generalises():
  """Two meta-updates through scan_levels = Adam on the summed meta-gradient of each chunk of 4
  episodes; the trained optimizer does better on held-out tasks than the one it started from."""
  params0, data = regression_tasks(8)
  start = meta.init_meta_params(jnp.zeros(3), learning_rate=0.02, hidden=4)
  kw = dict(loss_fn=regression_loss, num_steps=4)
  trained, losses = jax.jit(lambda m, t: meta.meta_train(
      m, tasks=t, meta_batch=4, meta_optimizer=optax.adam(0.2), **kw))(start, (params0, data))

  def loss_sum(m, chunk_params, chunk_data):
    one = lambda p, d: meta.meta_loss(m, params=p, data=d, **kw)
    return jax.vmap(one)(chunk_params, chunk_data).sum()

  chunk_grad = jax.jit(jax.grad(loss_sum))
  adam = optax.adam(0.2)
  m, s = start, adam.init(start)
  for lo in (0, 4):
    chunk = jax.tree.map(lambda a: a[lo:lo + 4], (params0, data))
    updates, s = adam.update(chunk_grad(m, *chunk), s, m)
    m = optax.apply_updates(m, updates)
  assert_trees_close(trained, m, rtol=1e-4, atol=1e-6)
  assert losses.shape == (8,)
  held_out = regression_tasks(8, seed=2)
  mean_loss = jax.jit(loss_sum)
  assert mean_loss(trained, *held_out) < 0.9 * mean_loss(start, *held_out)
