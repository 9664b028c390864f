"""Shared problems and helpers of the optimizer tests (tests/test_optim_*.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def quadratic_problem(seed=0, dtype=jnp.float64):
  """Params {w [5, 3], b [3]} and a loss whose gradient changes with the params."""
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=(5, 5)), dtype)
  target = jnp.asarray(rng.normal(size=(5, 3)), dtype)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), dtype), "b": jnp.zeros(3, dtype)}

  def loss(p):
    return 0.5 * jnp.sum((a @ p["w"] + p["b"] - target) ** 2) + jnp.sum(jnp.sin(p["b"]))

  return params, loss


def run(tx, params, loss, steps):
  """``steps`` jitted steps of tx; returns the params after each step, stacked."""
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append(params)
  return jax.tree.map(lambda *x: np.stack(x), *out)


def assert_trees_close(a, b, rtol, atol=0.0):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)
