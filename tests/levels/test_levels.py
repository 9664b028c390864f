"""Tests for nlx.levels: the Level spec, tick and the nested-scan driver.

The reference for every schedule is a plain Python loop over single steps (no JAX scan) that
updates level l after step t when (t + 1) % C_l == 0, with per-level gradients taken by jax.grad of
that level's own per-step loss.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlx import levels as lv

D = 3
ACTIVE = ("fast", "mid", "slow")
LEVELS = (
    # Given out of order on purpose: the driver sorts by period.
    lv.Level("slow", 64, optax.adam(0.05)),
    lv.Level("fast", 4),  # default optimizer: sgd(1.0)
    lv.Level("base", 0, optax.adam(0.1)),
    lv.Level("mid", 16, optax.sgd(0.02, momentum=0.9)),
)
PERIODS = {level.name: level.period for level in LEVELS}
TXS = {level.name: level.tx for level in LEVELS}
SCALE = {"fast": 0.02, "mid": 1.0, "slow": 1.0}


# ---------------------------------------------------------------------------------------------
# A toy problem whose gradients depend on the current params of every level
# ---------------------------------------------------------------------------------------------


def make_params(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  params = {
      name: {"w": 0.3 * jax.random.normal(keys[i], (D,)), "b": jnp.float32(0.1 * (i + 1))}
      for i, name in enumerate(ACTIVE)
  }
  params["base"] = {"w": 0.3 * jax.random.normal(keys[5], (D,))}
  return params


def make_xs(t, seed=1):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "x": 0.5 * jax.random.normal(kx, (t, D)),
      "y": jax.random.normal(ky, (t, len(ACTIVE))),
  }


def step_losses(params, x, y):
  """Per-step loss of each active level; each depends on every level's params."""
  feats = {name: jnp.dot(params[name]["w"], x) for name in (*ACTIVE, "base")}
  out = {}
  for i, name in enumerate(ACTIVE):
    others = sum(feats[m] for m in ACTIVE if m != name)
    pred = feats[name] + params[name]["b"] + 0.5 * others + feats["base"]
    out[name] = SCALE[name] * (pred - y[i]) ** 2
  return out


def chunk_fn(params, carry, xs):
  """Loss = sum of per-step losses; ys = the params each level had at every step, and t."""
  per_step = jax.vmap(step_losses, in_axes=(None, 0, 0))(params, xs["x"], xs["y"])
  losses = {name: jnp.sum(v) for name, v in per_step.items()}
  n = xs["x"].shape[0]
  ys = {
      "params": jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), params),
      "t": carry["t"] + jnp.arange(n, dtype=jnp.int32),
  }
  carry = {"t": carry["t"] + n, "acc": carry["acc"] + losses["fast"]}
  return losses, (carry, ys)


def init_carry():
  return {"t": jnp.zeros((), jnp.int32), "acc": jnp.zeros((), jnp.float32)}


@jax.jit
def step_grads(params, x, y):
  """{name: d step_loss[name] / d params[name]} for each active level."""
  grads = {}
  for name in ACTIVE:

    def own(p, name=name):
      return step_losses({**params, name: p}, x, y)[name]

    grads[name] = jax.grad(own)(params[name])
  return grads


_jit_updates = {name: jax.jit(TXS[name].update) for name in ACTIVE}


def reference(params, xs, t_total, t_start=0, state=None):
  """Plain Python loop over steps: final params, trajectory, opt states, sums, counters."""
  to_np = functools.partial(jax.tree.map, np.asarray)
  params = to_np(params)
  if state is None:
    opt = {name: TXS[name].init(params[name]) for name in ACTIVE}
    gsum = {name: jax.tree.map(np.zeros_like, params[name]) for name in ACTIVE}
  else:
    opt, gsum = state
  traj = []
  for t in range(t_start, t_start + t_total):
    traj.append(params)
    g = to_np(step_grads(params, xs["x"][t - t_start], xs["y"][t - t_start]))
    gsum = {name: jax.tree.map(np.add, gsum[name], g[name]) for name in ACTIVE}
    new = dict(params)
    for name in ACTIVE:
      if (t + 1) % PERIODS[name] == 0:
        upd, opt[name] = _jit_updates[name](gsum[name], opt[name], params[name])
        new[name] = to_np(optax.apply_updates(params[name], upd))
        gsum[name] = jax.tree.map(np.zeros_like, gsum[name])
    params = new
  traj = jax.tree.map(lambda *a: np.stack(a), *traj)
  counters = {name: (t_start + t_total) % PERIODS[name] for name in ACTIVE}
  return params, traj, opt, gsum, counters


def assert_tree_close(a, b, rtol=1e-4, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def check_against_reference(states, ys, ref, t_total, t_start=0):
  ref_params, ref_traj, ref_opt, ref_gsum, ref_counters = ref
  for name in (*ACTIVE, "base"):
    assert_tree_close(ys["params"][name], ref_traj[name])
    assert_tree_close(states[name].params, ref_params[name])
  np.testing.assert_array_equal(ys["t"], np.arange(t_start, t_start + t_total))
  for name in ACTIVE:
    assert_tree_close(states[name].opt_state, ref_opt[name])
    assert_tree_close(states[name].grad_sum, ref_gsum[name])
    assert int(states[name].step) == ref_counters[name]


# ---------------------------------------------------------------------------------------------
# 1, 4. Schedules against the Python loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_total", [256, 96])
def test_scan_levels_matches_python_loop(t_total):
  params, xs = make_params(), make_xs(t_total)
  states = lv.init_levels(LEVELS, params)
  states, carry, ys = lv.scan_levels(LEVELS, chunk_fn, states, init_carry(), xs)
  ref = reference(params, xs, t_total)
  check_against_reference(states, ys, ref, t_total)
  assert int(carry["t"]) == t_total
  # Each level's params change exactly at its boundaries: after step t iff (t+1) % C == 0.
  for name in ACTIVE:
    w = np.asarray(ys["params"][name]["w"])
    changed = np.any(w[1:] != w[:-1], axis=-1)
    expected = (np.arange(1, t_total) % PERIODS[name]) == 0
    np.testing.assert_array_equal(changed, expected, err_msg=name)
  if t_total == 256:
    assert all(int(states[n].step) == 0 for n in ACTIVE)
  else:  # 96 = 1 block of 64 (nested scans) + a tail of 32 (flat scan with tick)
    assert {n: int(states[n].step) for n in ACTIVE} == {"fast": 0, "mid": 0, "slow": 32}
    assert np.any(np.asarray(states["slow"].grad_sum["w"]) != 0)


def test_period_zero_never_updates():
  params, xs = make_params(), make_xs(128)
  states = lv.init_levels(LEVELS, params)
  out, _, ys = lv.scan_levels(LEVELS, chunk_fn, states, init_carry(), xs)
  base_traj = np.asarray(ys["params"]["base"]["w"])
  np.testing.assert_array_equal(base_traj, np.broadcast_to(params["base"]["w"], (128, D)))
  assert out["base"] is states["base"]
  assert out["base"].grad_sum is None and int(out["base"].step) == 0
  # tick leaves it alone too.
  grads = {n: jax.tree.map(jnp.ones_like, params[n]) for n in ACTIVE}
  assert lv.tick(LEVELS, states, grads)["base"] is states["base"]


def test_only_frozen_levels_run_whole_sequence_once():
  levels = (lv.Level("base", 0),)
  params = {"base": jnp.arange(3.0)}
  states = lv.init_levels(levels, params)
  calls = []

  def fn(p, carry, xs):
    calls.append(xs.shape)
    return {}, (carry + jnp.sum(xs), xs * p["base"][0] + p["base"][1])

  out, carry, ys = lv.scan_levels(levels, fn, states, jnp.float32(0), jnp.arange(10.0))
  assert calls == [(10,)]
  np.testing.assert_allclose(ys, np.ones(10))
  assert float(carry) == 45.0
  assert out["base"] is states["base"]


def test_own_loss_only_moves_own_level():
  levels = (lv.Level("a", 2), lv.Level("b", 4))
  params = {"a": jnp.ones(2), "b": jnp.full(2, 3.0)}

  def fn(p, carry, xs):
    # a's loss depends strongly on b; b's loss has zero gradient w.r.t. b.
    return {"a": jnp.sum(p["a"] * p["b"]) * jnp.sum(xs), "b": 0.0 * jnp.sum(p["b"])}, (carry, xs)

  states = lv.init_levels(levels, params)
  out, _, _ = lv.scan_levels(levels, fn, states, (), jnp.ones(8))
  np.testing.assert_array_equal(out["b"].params, params["b"])
  # a: one update per chunk of 2 steps (4 in all), each with gradient b * sum(x) = 3 * 2.
  np.testing.assert_allclose(out["a"].params, 1.0 - 4 * 6.0)


# ---------------------------------------------------------------------------------------------
# 3. Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slow, fast", [(6, 4), (24, 16)])
def test_non_dividing_periods_refused(slow, fast):
  msg = (
      f"Level 'b' has period {slow}, which is not a multiple of level 'a''s period {fast}; "
      "periods of nested levels must divide one another"
  )
  with pytest.raises(ValueError, match=re.escape(msg)):
    lv.validate_levels([lv.Level("b", slow), lv.Level("a", fast)])
  with pytest.raises(ValueError, match=re.escape(msg)):
    lv.init_levels(
        [lv.Level("a", fast), lv.Level("b", slow)], {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    )


def test_validate_levels_sorts_and_accepts_equal_periods():
  levels = [lv.Level("c", 8), lv.Level("z", 0), lv.Level("a", 2), lv.Level("b", 8)]
  assert [x.name for x in lv.validate_levels(levels)] == ["z", "a", "c", "b"]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(name="", period=1), r"Level\.name must be a non-empty str, got ''"),
        (dict(name=3, period=1), r"Level\.name must be a non-empty str, got 3"),
        (dict(name="a", period=-1), r"'a': period must be an int >= 0.*got -1"),
        (dict(name="a", period=True), r"'a': period must be an int >= 0.*got True"),
        (dict(name="a", period=2.0), r"'a': period must be an int >= 0.*got 2\.0"),
        (dict(name="a", period=2, optimizer="adam"), r"'a': optimizer must be an optax"),
    ],
)
def test_level_fields_validated(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    lv.Level(**kwargs)


def test_duplicate_names_refused():
  with pytest.raises(ValueError, match=r"unique; duplicated: \['a'\]"):
    lv.validate_levels([lv.Level("a", 2), lv.Level("b", 4), lv.Level("a", 8)])


def test_params_and_states_must_match_levels():
  levels = (lv.Level("a", 2), lv.Level("b", 4))
  with pytest.raises(ValueError, match=r"missing: \['b'\], not a level: \['c'\]"):
    lv.init_levels(levels, {"a": jnp.zeros(1), "c": jnp.zeros(1)})
  with pytest.raises(ValueError, match=r"'a' \(period 2\).*floating point.*int32"):
    lv.init_levels(levels, {"a": jnp.zeros(1, jnp.int32), "b": jnp.zeros(1)})
  states = lv.init_levels(levels, {"a": jnp.zeros(1), "b": jnp.zeros(1)})
  with pytest.raises(ValueError, match=r"states must have exactly one entry per level"):
    lv.scan_levels(levels, chunk_fn, {"a": states["a"]}, (), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"grads has no entry for level 'b'"):
    lv.tick(levels, states, {"a": jnp.zeros(1)})
  with pytest.raises(ValueError, match=r"num_steps=3 does not divide level 'a'"):
    lv.tick(levels, states, {"a": jnp.zeros(1), "b": jnp.zeros(1)}, num_steps=3)


def test_sequence_length_not_multiple_of_fastest_period_refused():
  states = lv.init_levels(LEVELS, make_params())
  with pytest.raises(ValueError, match=r"T=18 is not a multiple of .*C_1=4 \(level 'fast'\)"):
    lv.scan_levels(LEVELS, chunk_fn, states, init_carry(), make_xs(18))


def test_bad_chunk_fn_outputs_refused():
  levels = (lv.Level("a", 2),)
  states = lv.init_levels(levels, {"a": jnp.zeros(2)})
  no_loss = lambda p, c, xs: ({"b": jnp.sum(p["a"])}, (c, xs))  # noqa: E731
  with pytest.raises(ValueError, match=r"no loss for level 'a'"):
    lv.scan_levels(levels, no_loss, states, (), jnp.zeros(4))
  vec_loss = lambda p, c, xs: ({"a": p["a"]}, (c, xs))  # noqa: E731
  with pytest.raises(ValueError, match=r"'a' must be a float scalar, got shape \(2,\)"):
    lv.scan_levels(levels, vec_loss, states, (), jnp.zeros(4))
  bad_ys = lambda p, c, xs: ({"a": jnp.sum(p["a"])}, (c, xs[:1]))  # noqa: E731
  with pytest.raises(ValueError, match=r"leading axis 2 \(one chunk\), got shape \(1,\)"):
    lv.scan_levels(levels, bad_ys, states, (), jnp.zeros(4))


# ---------------------------------------------------------------------------------------------
# 5. tick, one step at a time, equals scan_levels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_total", [64, 72])
def test_tick_stream_equals_scan_levels(t_total):
  params, xs = make_params(), make_xs(t_total)
  states0 = lv.init_levels(LEVELS, params)
  scanned, _, _ = lv.scan_levels(LEVELS, chunk_fn, states0, init_carry(), xs)

  tick = jax.jit(functools.partial(lv.tick, LEVELS))
  states = states0
  for t in range(t_total):
    p = {name: s.params for name, s in states.items()}
    states = tick(states, step_grads(p, xs["x"][t], xs["y"][t]))
  for name in (*ACTIVE, "base"):
    assert_tree_close(states[name].params, scanned[name].params)
    assert_tree_close(states[name].opt_state, scanned[name].opt_state)
    assert_tree_close(states[name].grad_sum, scanned[name].grad_sum)
    assert int(states[name].step) == int(scanned[name].step) == t_total % max(PERIODS[name], 1)


# ---------------------------------------------------------------------------------------------
# 6. jit, and continuing a stream across calls
# ---------------------------------------------------------------------------------------------


def test_jit_and_continuation_equal_one_call():
  params, xs = make_params(), make_xs(256)
  states0 = lv.init_levels(LEVELS, params)
  run = jax.jit(functools.partial(lv.scan_levels, LEVELS, chunk_fn))
  whole, carry_w, ys_w = run(states0, init_carry(), xs)

  first = jax.tree.map(lambda x: x[:128], xs)
  second = jax.tree.map(lambda x: x[128:], xs)
  s1, c1, ys1 = run(states0, init_carry(), first)
  s2, c2, ys2 = run(s1, c1, second)

  assert_tree_close(s2, whole)
  assert_tree_close(c2, carry_w)
  assert_tree_close(jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys1, ys2), ys_w)
  # Eager result agrees with the jitted one.
  eager, _, _ = lv.scan_levels(LEVELS, chunk_fn, states0, init_carry(), first)
  assert_tree_close(eager, s1)


def test_misaligned_concrete_counters_refused_but_short_calls_continue():
  params, xs = make_params(), make_xs(192)
  states = lv.init_levels(LEVELS, params)
  head = jax.tree.map(lambda x: x[:96], xs)
  s1, c1, ys1 = lv.scan_levels(LEVELS, chunk_fn, states, init_carry(), head)
  assert int(s1["slow"].step) == 32
  # A call of >= C_L steps would use the nested path from a misaligned start: refused.
  with pytest.raises(ValueError, match=r"level 'slow' \(period 64\) has step counter 32"):
    lv.scan_levels(LEVELS, chunk_fn, s1, c1, jax.tree.map(lambda x: x[96:], xs))
  # A call shorter than C_L uses the counters (flat path) and continues the stream exactly,
  # back to a boundary of every level; from there the nested path is allowed again.
  s2, c2, ys2 = lv.scan_levels(LEVELS, chunk_fn, s1, c1, jax.tree.map(lambda x: x[96:128], xs))
  assert all(int(s2[n].step) == 0 for n in ACTIVE)
  s3, _, ys3 = lv.scan_levels(LEVELS, chunk_fn, s2, c2, jax.tree.map(lambda x: x[128:], xs))
  ys = jax.tree.map(lambda *a: jnp.concatenate(a), ys1, ys2, ys3)
  check_against_reference(s3, ys, reference(params, xs, 192), 192)


# ---------------------------------------------------------------------------------------------
# Differentiability (meta-learning through the driver) and low-precision params
# ---------------------------------------------------------------------------------------------


def test_outer_gradient_through_nested_equals_flat():
  levels = (lv.Level("a", 2, optax.sgd(0.1, momentum=0.5)), lv.Level("b", 4, optax.sgd(0.05)))
  xs = jax.random.normal(jax.random.PRNGKey(3), (8, 2))

  def fn(p, carry, x):
    err = x @ p["a"] + jnp.dot(p["b"], p["a"]) - 1.0
    return {"a": jnp.sum(err**2), "b": jnp.sum((x @ p["b"]) ** 2)}, (carry, err)

  def outer(params, lengths):
    s = lv.init_levels(levels, params)
    total, start = 0.0, 0
    for n in lengths:
      s, _, ys = lv.scan_levels(levels, fn, s, (), xs[start : start + n])
      total, start = total + jnp.sum(ys**2), start + n
    return total + jnp.sum(s["a"].params ** 2)

  params = {"a": jnp.array([0.5, -0.2]), "b": jnp.array([0.3, 0.1])}
  g_nested = jax.grad(outer)(params, (8,))  # nested scans only
  g_flat = jax.grad(outer)(params, (2, 2, 2, 2))  # flat scans with tick only
  g_mixed = jax.grad(outer)(params, (6, 2))  # nested + tail, then a flat call
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g_nested))
  assert np.any(np.asarray(g_nested["b"]) != 0)
  assert_tree_close(g_nested, g_flat)
  assert_tree_close(g_nested, g_mixed)


def test_bfloat16_params_accumulate_in_float32():
  levels = (lv.Level("a", 2), lv.Level("b", 4, optax.adam(0.01)))
  params = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2, jnp.bfloat16)}
  states = lv.init_levels(levels, params)
  assert states["a"].grad_sum.dtype == jnp.float32

  def fn(p, carry, x):
    loss = jnp.sum(x[:, None] * (p["a"] * p["b"]).astype(jnp.float32))
    return {"a": 0.01 * loss, "b": loss}, (carry, x)

  out, _, _ = jax.jit(functools.partial(lv.scan_levels, levels, fn))(states, (), jnp.ones(10))
  assert out["a"].params.dtype == jnp.bfloat16 and out["b"].params.dtype == jnp.bfloat16
  assert out["a"].grad_sum.dtype == jnp.float32
  assert int(out["b"].step) == 2
