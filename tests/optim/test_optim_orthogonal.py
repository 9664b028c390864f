"""Adam as a memory = optax.adam; nonlinear outputs = optax.contrib.muon; M3 vs a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from nlx import optim
from optim_cases import assert_trees_close, quadratic_problem, run


def mlp_problem(seed=0):
  """A tiny 2-layer net {w1 [4, 6], b1 [6], w2 [6, 3]} on a fixed batch (float32)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  params = {"w1": jnp.asarray(rng.normal(size=(4, 6)) * 0.5, jnp.float32),
            "b1": jnp.zeros(6, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(6, 3)) * 0.5, jnp.float32)}

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  return params, loss


@pytest.mark.parametrize("nesterov", [False, True])
def test_adam_memory_equals_optax_adam(nesterov):
  with jax.enable_x64(True):
    params, loss = quadratic_problem(4)
    ours = run(optim.adam_memory(0.01, 0.9, 0.99, nesterov=nesterov), params, loss, 50)
    ref = run(optax.adam(0.01, 0.9, 0.99, nesterov=nesterov), params, loss, 50)
    assert_trees_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_adam_memory_equals_optax_adam_float32():
  params, loss = mlp_problem(1)
  ours = run(optim.adam_memory(0.01), params, loss, 50)
  ref = run(optax.adam(0.01), params, loss, 50)
  assert_trees_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_nonlinear_output_with_linear_memory_equals_optax_muon(nesterov):
  params, loss = mlp_problem(2)
  ours = run(optim.nonlinear_output(0.02, beta=0.9, nesterov=nesterov), params, loss, 30)
  ref = run(optax.contrib.muon(0.02, beta=0.9, nesterov=nesterov), params, loss, 30)
  assert_trees_close(ours, ref, rtol=2e-5, atol=2e-5)
  # Not a vacuous match: the matrices really moved.
  assert np.abs(ours["w1"][-1] - np.asarray(params["w1"])).max() > 0.05


def test_newton_schulz_orthogonalises_tall_and_wide():
  rng = np.random.default_rng(0)
  for shape in [(8, 5), (5, 8), (3, 6, 6)]:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    out = np.asarray(optim.newton_schulz(x, steps=10))
    s = np.linalg.svd(out, compute_uv=False)
    # Muon's quintic lands singular values in roughly [0.7, 1.2], not exactly 1.
    assert s.min() > 0.6 and s.max() < 1.3, (shape, s)
    u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
    np.testing.assert_array_less(0.0, np.sum((u @ vt) * out, axis=(-2, -1)))


def test_newton_schulz_rejects_vectors():
  with pytest.raises(ValueError, match=r"shape \(4,\)"):
    optim.newton_schulz(jnp.ones(4))


def m3_numpy(params, loss, lr, beta1, beta2, beta3, alpha, period, decay, eps, steps):
  """Algorithm 1 on the matrix leaves, Adam (numpy) on the vector leaves."""
  grad = jax.grad(loss)

  def ns(x):
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = optim.newton_schulz.__defaults__[1]
    for _ in range(5):
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x

  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  z = lambda: {k: np.zeros_like(v) for k, v in p.items()}
  m1, v, m2, acc, mu, nu = z(), z(), z(), z(), z(), z()
  out = []
  for t in range(1, steps + 1):
    g = {k: np.asarray(x, np.float64) for k, x in grad(p).items()}
    for k in p:
      if g[k].ndim < 2:
        mu[k] = 0.9 * mu[k] + 0.1 * g[k]
        nu[k] = 0.999 * nu[k] + 0.001 * g[k] ** 2
        mhat, vhat = mu[k] / (1 - 0.9**t), nu[k] / (1 - 0.999**t)
        p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
        continue
      m1[k] = decay * m1[k] + beta1 * g[k]
      v[k] = decay * v[k] + beta2 * g[k] ** 2
      acc[k] = acc[k] + g[k]
      # O2 is the slow momentum as written at the start of this step's chunk (Algorithm 1's
      # outer loop); the chunk's gradients reach M2 at its end, for the next chunk.
      p[k] = p[k] - lr * (ns(m1[k]) + alpha * ns(m2[k])) / (np.sqrt(v[k]) + eps)
      if t % period == 0:
        m2[k] = decay * m2[k] + beta3 * acc[k]
        acc[k] = np.zeros_like(acc[k])
    out.append(dict(p))
  return jax.tree.map(lambda *x: np.stack(x), *out)


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_m3_matches_numpy_algorithm_1(decay):
  with jax.enable_x64(True):
    params, loss = mlp_problem(3)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    kw = dict(beta1=0.5, beta2=0.3, beta3=2.0, alpha=0.7, slow_period=3)
    tx = optim.m3(0.01, decay1=decay, decay2=decay, decay3=decay, **kw)
    ours = run(tx, params, loss, 10)
    ref = m3_numpy(params, loss, 0.01, 0.5, 0.3, 2.0, 0.7, 3, decay, 1e-8, 10)
    assert_trees_close(ours, ref, rtol=1e-7, atol=1e-9)


def test_m3_slow_level_keeps_its_own_counter():
  params = {"w": jnp.zeros((3, 4))}
  tx = optim.m3(0.1, slow_period=4)
  state = tx.init(params)
  grads = {"w": jnp.ones((3, 4))}
  counters, slow_norms = [], []
  update = jax.jit(tx.update)
  for _ in range(9):
    _, state = update(grads, state, params)
    inner = state.inner_states["matrix"].inner_state[0]
    counters.append(int(inner.slow.step))
    slow_norms.append(float(jnp.abs(inner.slow.params["w"]).sum()))
  assert counters == [1, 2, 3, 0, 1, 2, 3, 0, 1]
  assert slow_norms == [0, 0, 0, 48, 48, 48, 48, 96, 96]


def test_m3_bad_arguments():
  with pytest.raises(ValueError, match=r"slow_period=0 must be an int >= 1"):
    optim.m3(0.1, slow_period=0)
  with pytest.raises(ValueError, match=r"decay2=1.5"):
    optim.m3(0.1, decay2=1.5)
  with pytest.raises(ValueError, match=r"b2=1.0"):
    optim.adam_memory(0.1, b2=1.0)
