"""Momentum memories: dot objective = optax.sgd momentum; delta momentum vs a numpy loop;
preconditioned momentum = optax.rmsprop with momentum; argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlx import optim
from optim_cases import assert_trees_close, quadratic_problem, run


def test_dot_momentum_equals_optax_sgd_momentum_float64():
  with jax.enable_x64(True):
    params, loss = quadratic_problem()
    ours = run(optim.momentum_memory(0.01, beta=0.9), params, loss, 50)
    ref = run(optax.sgd(0.01, momentum=0.9), params, loss, 50)
    assert_trees_close(ours, ref, rtol=1e-7, atol=1e-12)


def test_dot_momentum_equals_optax_sgd_momentum_float32_schedule():
  params, loss = quadratic_problem(1, jnp.float32)
  schedule = optax.linear_schedule(0.02, 0.001, 50)
  ours = run(optim.momentum_memory(schedule, beta=0.8), params, loss, 50)
  ref = run(optax.sgd(schedule, momentum=0.8), params, loss, 50)
  assert_trees_close(ours, ref, rtol=1e-6, atol=1e-6)


def delta_momentum_numpy(params, loss, lr, beta, form, steps):
  """Paper form in parameter units: m ← m(βI − GᵀG) − ηG (or (βI − GGᵀ)m − ηG), W ← W + m."""
  grad = jax.grad(loss)
  p = {k: np.asarray(v) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  out = []
  for _ in range(steps):
    g = {k: np.asarray(v) for k, v in grad(p).items()}
    for k in p:
      rows_g, rows_m = g[k].reshape(-1, g[k].shape[-1]), m[k].reshape(-1, g[k].shape[-1])
      if form == "arxiv":
        decayed = rows_m @ (beta * np.eye(rows_g.shape[1]) - rows_g.T @ rows_g)
      else:
        decayed = (beta * np.eye(rows_g.shape[0]) - rows_g @ rows_g.T) @ rows_m
      m[k] = (decayed - lr * rows_g).reshape(g[k].shape)
      p[k] = p[k] + m[k]
    out.append(dict(p))
  return jax.tree.map(lambda *x: np.stack(x), *out)


@pytest.mark.parametrize("form", ["arxiv", "neurips"])
def test_delta_momentum_matches_numpy_paper_form(form):
  with jax.enable_x64(True):
    params, loss = quadratic_problem(2)
    small = lambda p: 0.02 * loss(p)  # keeps ‖G‖ < 1, where the published write is stable
    ours = run(optim.momentum_memory(0.5, 0.9, objective="l2", delta_form=form), params, small,
               20)
    ref = delta_momentum_numpy(params, small, 0.5, 0.9, form, 20)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ref))
    assert small(jax.tree.map(lambda x: x[-1], ref)) < 0.5 * small(params)
    assert_trees_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_delta_momentum_differs_from_classical():
  with jax.enable_x64(True):
    params, loss = quadratic_problem(2)
    dot = run(optim.momentum_memory(0.01, 0.9), params, loss, 5)
    l2 = run(optim.momentum_memory(0.01, 0.9, objective="l2"), params, loss, 5)
    assert np.abs(dot["w"][-1] - l2["w"][-1]).max() > 1e-3


def test_preconditioned_momentum_equals_optax_rmsprop_with_momentum():
  params, loss = quadratic_problem(3, jnp.float32)
  precond = optax.scale_by_rms(decay=0.9, eps=1e-6)
  ours = run(optim.preconditioned_momentum(0.003, precond, beta=0.7), params, loss, 30)
  ref = run(optax.rmsprop(0.003, decay=0.9, eps=1e-6, momentum=0.7), params, loss, 30)
  assert_trees_close(ours, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 1.5}, r"beta=1.5 .*\[0.0, 1.0\]"),
    ({"objective": "cosine"}, r"objective='cosine'.*\['dot', 'l2'\]"),
    ({"delta_form": "left"}, r"delta_form='left'.*arxiv"),
    ({"learning_rate": -1.0}, r"learning_rate=-1.0"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  args = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    optim.momentum_memory(**args)


def test_preconditioner_must_be_a_transformation():
  with pytest.raises(ValueError, match="preconditioner"):
    optim.preconditioned_momentum(0.1, preconditioner="rms")
