"""Document boundaries (``reset``) in ``linear_attention`` and ``delta_rule``.

A packed batch (several documents per row, ``reset`` true at each document's first token) must
equal every document run alone: separate calls with a zero initial state (the row's
``initial_state`` for a first document that does not reset at t = 0), the outputs concatenated,
the final state the last document's. Forward and gradients, every XLA form, chunk sizes that put
boundaries inside a chunk, at a chunk edge, two in one chunk, at t = 0 and at the last token.
The kernels (``impl="pallas"``) are compared in tests/pallas_kernels/test_pallas_reset.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops

import ops_cases as cases

B, T, H, DK, DV = 2, 19, 2, 3, 5  # T is not a multiple of the chunk sizes 4 and 16; K != V
# Row 0: t = 0 (discards initial_state), 5 and 6 (two in one chunk of 4 and of 16), 8 (a chunk
# edge for C = 4), 18 (the last token, in the remainder chunk). Row 1: 3, then 12 (a chunk edge)
# and 13 (two in one chunk of 4); its first document starts from initial_state.
BOUNDARIES = ((0, 5, 6, 8, 18), (3, 12, 13))
OPS = ("linear_attention", "delta_rule")
TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def _reset(boundaries=BOUNDARIES, t=T):
  r = np.zeros((len(boundaries), t), bool)
  for row, starts in enumerate(boundaries):
    r[row, list(starts)] = True
  return jnp.asarray(r)


def _arrays(op, dtype, seed=0):
  a = cases.make_arrays("delta_rule_g" if op == "delta_rule" else "linear_attention_g", B, T, H,
                        DK, DV, jnp.float32, seed=seed)
  a["s0"] = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 7), (B, H, DK, DV), jnp.float32)
  return {name: x.astype(dtype) for name, x in a.items()}


def _call(op, a, impl, chunk_size=4, reset=None, initial_state="s0"):
  fn = getattr(ops, op)
  extra = {"beta": a["beta"]} if op == "delta_rule" else {}
  s0 = a[initial_state] if initial_state else None
  return fn(a["q"], a["k"], a["v"], g=a["g"], initial_state=s0, chunk_size=chunk_size,
            impl=impl, reset=reset, **extra)


def _packed(op, impl, chunk_size):
  return lambda a: _call(op, a, impl, chunk_size, _reset())


def _documents(op, a):
  """Every document of every row run alone (the reference), outputs put back in place.

  The documents are the rows of one recurrent call, each from a zero initial state (its row's
  ``initial_state`` for a first document that does not reset at t = 0) and padded at its end to
  T tokens with zero keys, values, queries and log-decays: such tokens leave the state as it is
  (no decay, an outer product with a zero key), so the padded call's final state is the
  document's own, and batch rows never interact.
  """
  docs, places = [], []
  for row, starts in enumerate(BOUNDARIES):
    edges = sorted(set((0,) + starts + (T,)))
    for lo, hi in zip(edges[:-1], edges[1:]):
      docs.append((row, lo, hi, lo == 0 and 0 not in starts))
  pad = lambda x, row, lo, hi: jnp.pad(x[row, lo:hi], [(0, T - hi + lo)] + [(0, 0)] * (x.ndim - 2))
  batch = {name: jnp.stack([pad(x, row, lo, hi) for row, lo, hi, _ in docs])
           for name, x in a.items() if name != "s0"}
  batch["s0"] = jnp.stack([a["s0"][row] * keep for row, _, _, keep in docs])
  o, s = _call(op, batch, "recurrent")
  outs = [jnp.concatenate([o[i, :hi - lo] for i, (r, lo, hi, _) in enumerate(docs) if r == row])
          for row in range(B)]
  last = [max(i for i, d in enumerate(docs) if d[0] == row) for row in range(B)]
  return jnp.stack(outs), s[jnp.asarray(last)]


def _value_and_grad(fn, a, seed=1):
  """(o, state) and the gradients of a fixed random projection of them w.r.t. every input."""
  def loss(a):
    o, s = fn(a)
    ko, ks = jax.random.split(jax.random.PRNGKey(seed))
    co = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)  # the same in every dtype
    cs = jax.random.normal(ks, s.shape, jnp.float32).astype(s.dtype)
    return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(a)
  return o, s, grads


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), what
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("chunks", [(4,), pytest.param((1, 16), marks=pytest.mark.slow)])
@pytest.mark.parametrize("op", OPS)
def test_packed_equals_documents_alone(op, chunks):
  """float64 (the recurrent form, the chunked form at ``chunks``) and float32 (chunked at 4,
  against the float64 reference). The default run takes chunk size 4 (boundaries inside a chunk,
  at its edge, two in one chunk); ``-m slow`` adds 1 (token by token) and 16 (one chunk and a
  remainder of 3)."""
  with jax.enable_x64(True):
    a = _arrays(op, jnp.float64)
    want_o, want_s, want_g = _value_and_grad(lambda x: _documents(op, x), a)
    assert set(want_g) == {"q", "k", "v", "g", "s0"} | ({"beta"} if op == "delta_rule" else set())
    # The reference has to see the boundaries: a packed call without reset differs from it.
    o_plain, _ = _call(op, a, "recurrent")
    assert np.max(np.abs(np.asarray(o_plain - want_o))) > 1e-3
    # Row 0 resets at t = 0: initial_state does not reach it at all.
    assert not np.any(np.asarray(want_g["s0"][0]))
    assert np.any(np.asarray(want_g["s0"][1]))
    forms = [(jnp.float64, "chunked", c) for c in chunks]
    if chunks == (4,):
      forms += [(jnp.float64, "recurrent", 4), (jnp.float32, "chunked", 4)]
    for dtype, impl, chunk in forms:
      o, s, grads = _value_and_grad(_packed(op, impl, chunk),
                                    {name: x.astype(dtype) for name, x in a.items()})
      what = f"{op} {jnp.dtype(dtype).name} impl={impl} chunk_size={chunk}"
      assert o.dtype == dtype
      _close(o, want_o, TOLERANCE[dtype], what + " o")
      _close(s, want_s, TOLERANCE[dtype], what + " final state")
      for name in want_g:
        _close(grads[name], want_g[name], TOLERANCE[dtype], what + f" d/d{name}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_no_reset_is_all_false_and_int_is_bool(op, impl):
  with jax.enable_x64(True):
    a = _arrays(op, jnp.float64)
    o, s = _call(op, a, impl)
    o_false, s_false = _call(op, a, impl, reset=jnp.zeros((B, T), bool))
    np.testing.assert_allclose(o_false, o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s_false, s, rtol=1e-12, atol=1e-12)
    o_bool, s_bool = _call(op, a, impl, reset=_reset())
    o_int, s_int = _call(op, a, impl, reset=_reset().astype(jnp.int32))
    np.testing.assert_array_equal(o_int, o_bool)
    np.testing.assert_array_equal(s_int, s_bool)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_reset_at_start_discards_a_non_finite_initial_state(op, impl):
  a = _arrays(op, jnp.float32)
  a["bad"] = a["s0"].at[0].set(jnp.nan).at[1].set(jnp.inf)
  reset = jnp.zeros((B, T), bool).at[:, 0].set(True).at[1, 9].set(True)
  o, s = _call(op, a, impl, reset=reset, initial_state="bad")
  want_o, want_s = _call(op, a, impl, reset=reset, initial_state=None)
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(s)))
  np.testing.assert_allclose(o, want_o, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s, want_s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reset, error, message", [
    (np.zeros((B, T, H), bool), ValueError, r"reset must have shape \[B, T\] = \(2, 19\).*"
     r"\(2, 19, 2\)"),
    (np.zeros((B, T + 1), bool), ValueError, r"reset must have shape .*\(2, 20\)"),
    (np.zeros((T,), bool), ValueError, r"reset must have shape .*\(19,\)"),
    ([[False] * T] * B, ValueError, "reset must have shape .*got list"),
    (np.zeros((B, T), np.float32), TypeError, "reset must be a bool or integer .*float32"),
])
def test_reset_validation(op, reset, error, message):
  a = _arrays(op, jnp.float32)
  with pytest.raises(error, match=message):
    _call(op, a, "recurrent", reset=reset)
