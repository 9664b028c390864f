"""titans_memory and dgd_memory continued across calls split anywhere (mid-chunk) equals one call.

The state returned by ``titans_memory`` carries the chunk in progress (``chunk_start`` weights and
``offset``), so prefill-then-decode (pieces of any length, single tokens included) reproduces the
one-call result of chunk-start gradients, for the recurrence, the chunked dual form (static and
traced offsets) and the kernels, with gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlx import ops
import ops_cases as cases

TITANS = ["titans_linear", "titans_linear_full", "titans_mlp", "titans_mlp_full",
          "dgd_linear_full", "dgd_mlp_full", "dgd_mlp_g_before"]
CUTS = (0, 13, 14, 15, 40, 45, 70)  # pieces of 13, 1, 1, 25, 5 and 25 tokens; chunk 16


def call(arrays, lo, hi, state, impl, variant, chunk=16):
  a = {n: x[:, lo:hi] for n, x in arrays.items() if n not in ("s0", "p0")}
  return cases.memory_op(variant, a, state, chunk, impl)


def pieces(arrays, impl, variant, cuts=CUTS):
  state = ops.TitansState(arrays["s0"], arrays.get("p0"))
  outs = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    o, state = call(arrays, lo, hi, state, impl, variant)
    outs.append(o)
  return jnp.concatenate(outs, axis=1), state


def assert_states_equal(got, want, tol):
  assert int(got.offset) == int(want.offset)
  for name in ("memory", "momentum", "chunk_start"):
    for a, b in zip(jax.tree.leaves(getattr(got, name)), jax.tree.leaves(getattr(want, name))):
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("variant, impl", [
    # The recurrence's split path is the same code for every variant: the `_full` ones are slow.
    pytest.param(v, i, marks=pytest.mark.slow if (i == "recurrent" and (v.endswith("_full") or
                                                                       v.startswith("dgd")))
                 else ()) for v in TITANS for i in ("recurrent", "chunked")])
def test_split_anywhere_equals_one_call_float64(variant, impl):
  with jax.enable_x64(True):
    arrays = cases.make_arrays(variant, 2, 70, 2, 16, 16, jnp.float64)
    o_one, s_one = pieces(arrays, "recurrent", variant, (0, 70))
    o, s = pieces(arrays, impl, variant)
    np.testing.assert_allclose(o, o_one, rtol=1e-10, atol=1e-10)
    assert_states_equal(s, s_one, 1e-10)
    assert s.offset == 70 % 16


def test_traced_offset_under_jit():
  """Decoding in a jitted step: the offset is a traced int32 inside the state."""
  variant = "titans_mlp_full"
  arrays = cases.make_arrays(variant, 1, 40, 2, 16, 16, jnp.float32)
  o_one, s_one = pieces(arrays, "recurrent", variant, (0, 40))
  _, state = call(arrays, 0, 13, ops.TitansState(arrays["s0"], arrays.get("p0")), "chunked",
                  variant)
  step = jax.jit(lambda lo, state: call(jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, lo, 1, axis=1) if x.ndim >= 3 and
      x.shape[1] == 40 else x, arrays), 0, 1, state, "chunked", variant))
  outs = []
  for t in range(13, 40):
    o, state = step(t, state)
    outs.append(o)
  assert state.offset.dtype == jnp.int32 and int(state.offset) == 40 % 16
  np.testing.assert_allclose(jnp.concatenate(outs, 1), o_one[:, 13:], rtol=2e-5, atol=2e-5)
  assert_states_equal(state, s_one, 2e-5)


@pytest.mark.parametrize("variant", ["titans_linear_full", "titans_mlp_full", "dgd_mlp_full"])
def test_gradients_through_a_mid_chunk_split(variant):
  """d(loss)/d(every input) of two calls split mid-chunk (chunked) == one recurrent call."""
  with jax.enable_x64(True):
    arrays = cases.make_arrays(variant, 1, 40, 2, 16, 16, jnp.float64)

    def loss(arrays, impl, cuts):
      o, s = pieces(arrays, impl, variant, cuts)
      leaves = [o] + jax.tree.leaves((s.memory, s.momentum, s.chunk_start))
      return sum(jnp.sum(jnp.sin(x)) for x in leaves)

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))  # one program each, not op by op
    got = grad(arrays, "chunked", (0, 21, 40))
    want = grad(arrays, "recurrent", (0, 40))
    for name in want:
      for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)


def test_kernels_split_anywhere():
  """impl="pallas" (interpreted): the chunk in progress finishes in XLA, whole chunks on the
  kernel, a final partial chunk as its own kernel call."""
  variant = "titans_linear_full"
  arrays = cases.make_arrays(variant, 1, 70, 2, 16, 16, jnp.float32)
  o_one, s_one = pieces(arrays, "recurrent", variant, (0, 70))
  o, s = pieces(arrays, "pallas", variant)
  np.testing.assert_allclose(o, o_one, rtol=1e-4, atol=1e-4)
  assert_states_equal(s, s_one, 1e-4)


S = jnp.zeros((1, 2, 16, 16))
Q = jnp.zeros((1, 5, 2, 16))
LR = jnp.zeros((1, 5, 2))


@pytest.mark.parametrize("state,match", [
    (ops.TitansState(S, None, S, 16), r"initial_state.offset=16 must be in \[0, chunk_size=16\)"),
    (ops.TitansState(S, None, S, -1), r"initial_state.offset=-1"),
    (ops.TitansState(S, None, None, 3), r"chunk_start and initial_state.offset must be given"),
    (ops.TitansState(S, None, S, None), r"chunk_start and initial_state.offset must be given"),
    (ops.TitansState(S, None, S, jnp.float32(2)), r"offset must be an int, an integer scalar"),
    (ops.TitansState(S, None, jnp.zeros((1, 2, 16, 8)), 2),
     r"initial_state.chunk_start must have shape"),
])
def test_bad_continuation_state(state, match):
  with pytest.raises(ValueError, match=match):
    ops.titans_memory(Q, Q, Q, lr=LR, initial_state=state, chunk_size=16)


def test_traced_offset_refused_by_kernels():
  state = ops.TitansState(S, None, S, jnp.int32(3))
  with pytest.raises(ValueError, match=r"impl='pallas': initial_state.offset is a traced array"):
    jax.jit(lambda st: ops.titans_memory(Q, Q, Q, lr=LR, initial_state=st, chunk_size=16,
                                         impl="pallas"))(state)
