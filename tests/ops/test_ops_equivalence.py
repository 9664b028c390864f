"""Chunked forms against the token-by-token reference: forward and every gradient.

float64 at atol 1e-10 and float32 at rtol 1e-4 over B ∈ {1,2}, T ∈ {1,17,64,130}, H ∈ {1,3},
K, V ∈ {16,32}, chunk ∈ {1,16,64} (see ``ops_cases.SHAPES``). The default run checks every shape
once: the even-numbered shapes in float64, the odd-numbered in float32; ``-m slow`` adds float64
on the odd-numbered shapes (each case is a few seconds of compilation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops_cases as cases


def _cases(shapes_per_variant, slow_if_odd=False):
  """(variant, shape) params; with ``slow_if_odd`` the odd-numbered shapes are marked slow. The
  DGD variants (tests/ops/test_dgd.py checks them against the equation) run two shapes by default,
  the proximal one a single shape."""
  def slow(v, i):
    return (slow_if_odd and i % 2) or (v.startswith("dgd") and i >= 3) or ("_prox" in v and i)

  return [pytest.param(v, s, id=f"{v}-B{s[0]}T{s[1]}H{s[2]}K{s[3]}V{s[4]}C{s[5]}",
                       marks=pytest.mark.slow if slow(v, i) else ())
          for v in cases.VARIANTS for i, s in enumerate(shapes_per_variant(v))]


# The other tests run every variant by default but the proximal DGD one (test_dgd.py and the
# float64 comparison above cover it by default; `-m slow` runs these too).
VARIANTS = [pytest.param(v, marks=pytest.mark.slow if "_prox" in v else ()) for v in cases.VARIANTS]


def _compare(variant, shape, dtype, tol):
  b, t, h, dk, dv, chunk = shape
  arrays = cases.make_arrays(variant, b, t, h, dk, dv, dtype, seed=t + 7 * dk)
  g_ref, (o_ref, s_ref) = cases.loss_and_grads(variant, "recurrent", chunk)(arrays)
  g_chk, (o_chk, s_chk) = cases.loss_and_grads(variant, "chunked", chunk)(arrays)
  assert o_chk.dtype == dtype and all(s.dtype == dtype for s in s_chk)
  tol(o_chk, o_ref, "o")
  for i, (a, r) in enumerate(zip(s_chk, s_ref)):
    tol(a, r, f"final state leaf {i}")
  flat_ref = jax.tree_util.tree_flatten_with_path(g_ref)[0]
  flat_chk = jax.tree.leaves(g_chk)
  assert len(flat_ref) == len(flat_chk) == len(jax.tree.leaves(arrays))
  for (path, r), a in zip(flat_ref, flat_chk):
    tol(a, r, f"gradient of {jax.tree_util.keystr(path)}")


def _tol64(a, r, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-10, atol=1e-10, err_msg=what)


def _tol32(a, r, what):
  r = np.asarray(r, np.float64)
  np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=1e-4,
                             atol=1e-4 * max(np.abs(r).max(), 1e-30), err_msg=what)


@pytest.mark.parametrize("variant,shape", _cases(cases.shapes_for, slow_if_odd=True))
def test_chunked_matches_recurrent_float64(variant, shape):
  with jax.enable_x64(True):
    _compare(variant, shape, jnp.float64, _tol64)


@pytest.mark.parametrize("variant,shape", _cases(lambda v: cases.shapes_for(v)[1::2]))
def test_chunked_matches_recurrent_float32(variant, shape):
  _compare(variant, shape, jnp.float32, _tol32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_input_gets_a_gradient(variant):
  """Gradients reach q, k, v, every gate and every initial state (none is silently cut)."""
  arrays = cases.make_arrays(variant, 2, 40, 2, 16, 16, jnp.float32)
  grads, _ = cases.loss_and_grads(variant, "chunked", 16)(arrays)
  for path, gr in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.isfinite(np.asarray(gr)).all(), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(gr)).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_inputs_close_to_float32(variant):
  arrays = cases.make_arrays(variant, 2, 50, 2, 16, 16, jnp.float32)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), arrays)
  o32, s32 = cases.run(variant, rounded, "chunked", 16)
  o16, s16 = cases.run(variant, jax.tree.map(lambda x: x.astype(jnp.bfloat16), arrays),
                       "chunked", 16)
  assert o16.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in s16)
  scale = np.abs(np.asarray(o32)).max()
  np.testing.assert_allclose(np.asarray(o16, np.float32), o32, rtol=2e-2, atol=2e-2 * scale)
  for a, r in zip(s16, s32):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(r)).max())


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_final_state_continues_the_sequence(variant, impl):
  """Two calls, the second starting from the first's final state, equal one call."""
  chunk = 16
  # Titans' chunk-start gradients tie the result to the chunk grid: split on a chunk boundary.
  split = 48 if variant.startswith(("titans", "dgd")) else 37
  with jax.enable_x64(True):
    arrays = cases.make_arrays(variant, 2, 100, 2, 16, 16, jnp.float64)
    o_full, s_full = cases.run(variant, arrays, impl, chunk)
    seq = {k: v for k, v in arrays.items() if k not in ("s0", "p0")}
    first = dict(jax.tree.map(lambda x: x[:, :split], seq), s0=arrays["s0"])
    second = jax.tree.map(lambda x: x[:, split:], seq)
    if "p0" in arrays:
      first["p0"] = arrays["p0"]
    o1, s1 = cases.run(variant, first, impl, chunk)
    treedef = jax.tree.structure(arrays["s0"])
    n = treedef.num_leaves
    second["s0"] = jax.tree.unflatten(treedef, s1[:n])
    if "p0" in arrays:
      second["p0"] = jax.tree.unflatten(treedef, s1[n:2 * n])
    o2, s2 = cases.run(variant, second, impl, chunk)
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), o_full, rtol=1e-10, atol=1e-10)
    for a, r in zip(s2, s_full):
      np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
