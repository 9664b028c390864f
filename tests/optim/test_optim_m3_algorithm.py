"""M3 against Algorithm 1 of the paper, written as its two nested loops in numpy (float64).

The loop below follows the algorithm's structure literally: once per chunk of f steps the slow
momentum takes the previous chunk's gradients and O2 = NS(M2) is computed, then the chunk's f
steps read that O2. tests/optim/test_optim_orthogonal.py checks the decays < 1 in float64; this file
checks the published sums in float32, f = 1 and f = 3, on matrices of odd shapes (tall, wide, one
row, a stack of three) and a vector that goes to Adam.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlx import optim

LR, BETA1, BETA2, BETA3, ALPHA, EPS = 0.01, 0.5, 0.3, 2.0, 0.7, 1e-8
# Muon's quintic coefficients, as published (Jordan et al. 2024).
A, B, C = 3.4445, -4.775, 2.0315
SHAPES = {"tall": (5, 3), "wide": (3, 7), "row": (1, 6), "stack": (3, 4, 2), "bias": (7,)}
MATRICES = [name for name, shape in SHAPES.items() if len(shape) >= 2]


def problem(seed=0):
  """Float32 params, and per leaf a weight and a target of the loss below (float64)."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  weight = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
  target = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  return params, weight, target


def loss_jax(weight, target):
  """Σ ½ c (θ − τ)² + 0.3 sin θ per leaf: the gradient changes with the params."""
  def loss(p):
    return sum(jnp.sum(0.5 * weight[k] * (p[k] - target[k]) ** 2 + 0.3 * jnp.sin(p[k]))
               for k in p)
  return loss


def grad_numpy(p, weight, target):
  return {k: weight[k] * (p[k] - target[k]) + 0.3 * np.cos(p[k]) for k in p}


def newton_schulz(x):
  """X / (‖X‖_F + ε), then 5 quintic steps X ← aX + (bA + cA²)X, A = XXᵀ, on the wide side."""
  if x.ndim > 2:
    return np.stack([newton_schulz(m) for m in x])
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (np.linalg.norm(x) + EPS)
  for _ in range(5):
    gram = x @ x.T
    x = A * x + (B * gram + C * gram @ gram) @ x
  return x.T if tall else x


def algorithm_1(params, weight, target, f, steps):
  """Params after each step: Algorithm 1 on matrices, Adam (0.9, 0.999) on the vector."""
  theta = {k: v.astype(np.float64) for k, v in params.items()}
  zeros = lambda: {k: np.zeros_like(v) for k, v in theta.items()}
  m1, m2, v, o2 = zeros(), zeros(), zeros(), zeros()
  mu, nu = zeros(), zeros()
  out, chunk, t = [], [], 0
  for k in range(steps // f + 1):
    if k > 0:  # slow memory: the previous chunk's f gradients, then O2 = NS(M2)
      for name in MATRICES:
        m2[name] = m2[name] + BETA3 * sum(g[name] for g in chunk)
        o2[name] = newton_schulz(m2[name])
    chunk = []
    for t in range(k * f + 1, (k + 1) * f + 1):
      if t > steps:
        break
      g = grad_numpy(theta, weight, target)
      chunk.append(g)
      for name in theta:
        if theta[name].ndim < 2:  # Adam with bias correction
          mu[name] = 0.9 * mu[name] + 0.1 * g[name]
          nu[name] = 0.999 * nu[name] + 0.001 * g[name] ** 2
          mhat, vhat = mu[name] / (1 - 0.9**t), nu[name] / (1 - 0.999**t)
          theta[name] = theta[name] - LR * mhat / (np.sqrt(vhat) + EPS)
          continue
        m1[name] = m1[name] + BETA1 * g[name]
        v[name] = v[name] + BETA2 * g[name] ** 2
        o1 = newton_schulz(m1[name])
        theta[name] = theta[name] - LR * (o1 + ALPHA * o2[name]) / (np.sqrt(v[name]) + EPS)
      out.append(dict(theta))
  assert len(out) == steps
  return out


def run_nlx(params, weight, target, f, steps, alpha=ALPHA):
  """Params after each step of ``optim.m3`` (float32), checking the cached O2 on the way."""
  tx = optim.m3(LR, beta1=BETA1, beta2=BETA2, beta3=BETA3, alpha=alpha, slow_period=f, eps=EPS)
  loss = loss_jax(weight, target)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  out = []
  for _ in range(steps):
    p, state = step(p, state)
    m3_state = state.inner_states["matrix"].inner_state[0]
    for name in MATRICES:  # the cache is NS of the current M2
      np.testing.assert_allclose(m3_state.slow_output[name],
                                 optim.newton_schulz(m3_state.slow.params[name], eps=EPS),
                                 rtol=1e-6, atol=1e-6)
    out.append(jax.tree.map(np.asarray, p))
  return out


@pytest.mark.parametrize("f", [1, 3])
def test_every_step_equals_algorithm_1(f):
  params, weight, target = problem(f)
  steps = 2 * f + 3
  ours = run_nlx(params, weight, target, f, steps)
  ref = algorithm_1(params, weight, target, f, steps)
  for t, (got, want) in enumerate(zip(ours, ref), 1):
    for name in SHAPES:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                                 err_msg=f"step {t}, {name}")
  # The slow momentum is material: the matrices moved far from where α = 0 takes them.
  no_slow = run_nlx(params, weight, target, f, steps, alpha=0.0)
  assert max(np.abs(ours[-1][n] - no_slow[-1][n]).max() for n in MATRICES) > 1e-2


def test_first_chunk_reads_no_slow_momentum():
  """O2 = NS(0) = 0 for the whole first chunk, including its last step (where M2 is written)."""
  f = 3
  params, weight, target = problem(5)
  with_slow = run_nlx(params, weight, target, f, f + 1)
  without = run_nlx(params, weight, target, f, f + 1, alpha=0.0)
  for t in range(f):
    for name in SHAPES:
      np.testing.assert_array_equal(with_slow[t][name], without[t][name], err_msg=f"step {t + 1}")
  assert np.abs(with_slow[f]["tall"] - without[f]["tall"]).max() > 1e-3
