"""level_schedule vs a Python loop; every transform under jit and optax.inject_hyperparams; the
optimizer state sharded like the parameters on 8 fake CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlx import levels, optim
from optim_cases import assert_trees_close, quadratic_problem, run
from xla_env import xla_flags


def test_level_schedule_matches_python_loop():
  """Groups with periods 1, 3 (Adam on the sum) and 0 (frozen), against a plain loop."""
  with jax.enable_x64(True):
    params, loss = quadratic_problem(6)
    params = {"fast": params["w"][:2], "slow": params["w"][2:], "frozen": params["b"]}

    def split_loss(p):
      return loss({"w": jnp.concatenate([p["fast"], p["slow"]]), "b": p["frozen"]})

    groups = (levels.Level("fast", 1, optax.sgd(0.02)), levels.Level("slow", 3, optax.adam(0.05)),
              levels.Level("frozen", 0, optax.sgd(1.0)))
    tx = optim.level_schedule(groups, {k: k for k in params})
    ours = run(tx, params, split_loss, 10)

    p = {k: np.asarray(v) for k, v in params.items()}
    acc, adam = np.zeros_like(p["slow"]), optax.adam(0.05)
    adam_state = adam.init(jnp.asarray(p["slow"]))
    ref = []
    for t in range(10):
      g = {k: np.asarray(v) for k, v in jax.grad(split_loss)(p).items()}
      p["fast"] = p["fast"] - 0.02 * g["fast"]
      acc = acc + g["slow"]
      if (t + 1) % 3 == 0:
        updates, adam_state = adam.update(jnp.asarray(acc), adam_state)
        p["slow"] = p["slow"] + np.asarray(updates)
        acc = np.zeros_like(acc)
      ref.append(dict(p))
    ref = jax.tree.map(lambda *x: np.stack(x), *ref)
    assert_trees_close(ours, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(ours["frozen"][-1], params["frozen"])
    assert np.all(ours["slow"][0] == ours["slow"][1])  # waits between its updates
    assert np.any(ours["slow"][2] != ours["slow"][1])


def test_level_schedule_bad_groups():
  with pytest.raises(ValueError, match="duplicate"):
    optim.level_schedule((levels.Level("a", 1), levels.Level("a", 2)), {"w": "a"})
  with pytest.raises(ValueError, match="Level objects"):
    optim.level_schedule(("a",), {"w": "a"})
  with pytest.raises(ValueError, match=r"period=0 must be an int >= 1"):
    optim.every(0, optax.sgd(0.1))


# Each factory with its numeric hyperparameters (injected) and its static ones.
INJECTED = {
    "momentum_dot": (optim.momentum_memory, dict(learning_rate=0.01, beta=0.9), {}),
    "momentum_l2": (optim.momentum_memory, dict(learning_rate=0.01, beta=0.9),
                    dict(objective="l2", normalize_keys=True)),
    "preconditioned": (optim.preconditioned_momentum, dict(learning_rate=0.01, beta=0.9),
                       dict(preconditioner=optax.scale_by_rms())),
    "deep": (optim.deep_momentum, dict(learning_rate=0.01, beta=0.9, inner_lr=0.1), {}),
    "nonlinear": (optim.nonlinear_output, dict(learning_rate=0.01, beta=0.9), {}),
    "adam": (optim.adam_memory, dict(learning_rate=0.01, b1=0.9, b2=0.99), {}),
    "m3": (optim.m3, dict(learning_rate=0.01, beta1=0.5, alpha=0.5),
           dict(slow_period=2, decay1=0.9, decay2=0.9)),
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_inject_hyperparams_matches_plain_and_follows_changes(name):
  factory, numeric, static = INJECTED[name]
  params, loss = quadratic_problem(7, jnp.float32)
  plain = run(factory(**numeric, **static), params, loss, 4)
  static_args = [k for k in ("slow_period", "hidden", "seed") if k in static]
  injected = optax.inject_hyperparams(factory, static_args=static_args)(**numeric, **static)
  assert_trees_close(run(injected, params, loss, 4), plain, rtol=1e-5, atol=1e-6)
  state = injected.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = jax.jit(injected.update)(jax.grad(loss)(params), state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nlx import levels, optim
    mesh = Mesh(jax.devices()[:8], ("data",))
    rows = NamedSharding(mesh, P("data", None))
    params = {"w": jax.device_put(jnp.ones((16, 8)), rows),
              "v": jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "data"))),
              "b": jax.device_put(jnp.ones(16), NamedSharding(mesh, P("data")))}
    txs = {"momentum": optim.momentum_memory(0.1, objective="l2"),
           "adam": optim.adam_memory(0.1), "muon": optim.nonlinear_output(0.1),
           "m3": optim.m3(0.1, slow_period=2), "deep": optim.deep_momentum(0.1, hidden=4),
           "schedule": optim.level_schedule((levels.Level("a", 2), levels.Level("b", 1)),
                                            {"w": "a", "v": "b", "b": "a"})}
    for name, tx in txs.items():
      state = jax.jit(tx.init)(params)
      grads = jax.tree.map(lambda p: 0.1 * p, params)
      update = jax.jit(tx.update)
      for _ in range(3):  # past m3's and the schedule's slow steps
        _, state = update(grads, state, params)
      checked = 0
      for leaf in jax.tree.leaves(state):
        for p in params.values():
          if leaf.shape == p.shape and leaf.sharding.is_equivalent_to(p.sharding, p.ndim):
            checked += 1
            break
        else:
          assert leaf.shape not in [p.shape for p in params.values()], (name, leaf.shape,
                                                                         leaf.sharding)
      assert checked >= 3, (name, checked)
      print(name, checked)
""")


def test_state_is_sharded_like_params_on_8_fake_devices():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(line.split()[0] for line in out.stdout.split("\n") if line) == sorted(
      ["momentum", "adam", "muon", "m3", "deep", "schedule"])
