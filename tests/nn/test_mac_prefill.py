"""Titans MAC's stateful call in pieces (``MemoryAsContext._stateful``) against the token-by-token
path (``MemoryAsContext._tokens``, the reference).

A sequence of odd length is run from the initial state in calls ("splits") that start at a
segment's start and in its middle, end in a segment's middle, fit inside one segment, and span
several segments (window S = 4, so a call's head and tail have up to 3 tokens). Each call of the
new path is compared with the reference given the same state: the outputs and every leaf of the
returned state (the memory with its gradient chunk in progress, the segment-start weights and
both attention caches), in float64; the calls chained also equal one call without a state.

The default run takes one split in float64 with a ``memory_chunk_size`` (3) that does not divide
the window, with the memory's recurrent form (``impl``; the fastest to compile), and also checks
it against one call without a state: without documents a token step of the reference is a piece
of one token (``_token`` calls ``_piece``), so the whole-sequence path is the independent check.
Marked slow: the gradients of a loss on the outputs of two chained calls w.r.t. every parameter
and the input (tens of seconds to compile), and the matrix over chunk sizes, the chunked memory,
a memory without momentum, more splits and float32, each also against one call without a state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx.nn import ModelConfig
from nlx.nn.neural_memory import NeuralMemory
from nlx.nn.titans import MemoryAsContext

D, S, B, T = 8, 4, 3, 23
# Positions 0, 7, 14, 21: calls start at a segment's start and 3, 2 and 1 tokens into one; the
# calls of 7 tokens span three segments, the last call (2 tokens) ends inside its segment.
SPLITS = (7, 7, 7, 2)
GRADIENT_SPLITS = (6, 17)
MORE_SPLITS = ((6, 1, 13, 3), (5, 10, 8), (5, 2, 16), (1, 1, 3, 18), (23,))


def tolerance(dtype_name):
  return 1e-10 if dtype_name == "float64" else 2e-5


@functools.lru_cache(maxsize=None)
def mixer(chunk, impl, momentum, dtype_name):
  """Graph, float parameters in ``dtype_name``, the new and the reference stateful call (jitted),
  the call without a state and the initial state."""
  dtype = jnp.dtype(dtype_name)
  cfg = ModelConfig(family="titans_mac", d_model=D, n_heads=2, window=S, n_persistent=2,
                    memory_chunk_size=chunk, conv_size=3, impl=impl)
  mac = MemoryAsContext(cfg, rngs=nnx.Rngs(0))
  if not momentum:  # titans_lmm always has momentum: the memory without it, for the test only
    mac.memory = NeuralMemory(cfg, rngs=nnx.Rngs(1), memory="mlp", lr_max=cfg.titans_lr,
                              momentum=False, decay=True)
  graphdef, params = nnx.split(mac)
  to = lambda tree: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
  new = jax.jit(lambda p, x, st, pos: nnx.merge(graphdef, p)(x, st, pos))
  ref = jax.jit(lambda p, x, st, pos: nnx.merge(graphdef, p)._tokens(x, st, pos))
  whole = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  return graphdef, to(params), new, ref, whole, to(mac.init_state(B, T))


def inputs(dtype_name, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), dtype_name)


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def check_splits(splits, chunk=3, impl="chunked", momentum=True, dtype_name="float64",
                 one_call=True):
  """Runs ``splits`` with both paths; returns the largest relative error of outputs and states
  (and checks the chained calls against one call without a state where ``one_call``)."""
  with jax.enable_x64(dtype_name == "float64"):
    _, params, new, ref, whole, state = mixer(chunk, impl, momentum, dtype_name)
    x = inputs(dtype_name)
    new_state = ref_state = state
    pos, ys, worst = 0, [], 0.0
    for n in splits:
      y_new, new_state = new(params, x[:, pos:pos + n], new_state, pos)
      y_ref, ref_state = ref(params, x[:, pos:pos + n], ref_state, pos)
      assert jax.tree.structure(new_state) == jax.tree.structure(ref_state)
      worst = max(worst, relative_error(y_new, y_ref))
      for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(b.dtype, jnp.floating):
          worst = max(worst, relative_error(a, b))
        else:  # chunk offsets, cache positions and segment numbers
          np.testing.assert_array_equal(a, b, err_msg=f"split {splits} at {pos}")
      ys.append(y_new)
      pos += n
    assert pos == T
    if one_call:
      error = relative_error(jnp.concatenate(ys, 1), whole(params, x))
      assert error < tolerance(dtype_name), (splits, error)
    return worst


def test_pieces_equal_token_by_token():
  # Also against one call without a state (the segment scan, ``_segment``): without documents
  # the token-by-token path steps through ``_piece`` too, so this is the independent check.
  worst = check_splits(SPLITS, impl="recurrent")
  assert worst < tolerance("float64"), worst


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_gradients_equal_token_by_token(impl):
  # A loss on the outputs of two chained calls from the initial state (the second starts 2
  # tokens into a segment, spans three and ends 3 tokens into one): gradients w.r.t. every
  # parameter and the input.
  with jax.enable_x64(True):
    graphdef, params, *_, state = mixer(3, impl, True, "float64")
    x = inputs("float64")
    w = inputs("float64", seed=1)

    def loss(stateful, p, x):
      mac, st, pos, ys = nnx.merge(graphdef, p), state, 0, []
      for n in GRADIENT_SPLITS:
        y, st = stateful(mac)(x[:, pos:pos + n], st, pos)
        ys.append(y)
        pos += n
      return jnp.sum(jnp.tanh(jnp.concatenate(ys, 1)) * w)

    grad = lambda stateful: jax.jit(jax.grad(functools.partial(loss, stateful), (0, 1)))
    got = grad(lambda mac: mac)(params, x)
    want = grad(lambda mac: mac._tokens)(params, x)
    leaves = jax.tree.leaves(want)
    assert len(jax.tree.leaves(got)) == len(leaves) and max(np.abs(g).max() for g in leaves) > 0
    for a, b in zip(jax.tree.leaves(got), leaves):
      assert relative_error(a, b) < tolerance("float64")


@pytest.mark.slow
@pytest.mark.parametrize("splits", MORE_SPLITS)
@pytest.mark.parametrize("chunk", [2, 3, 5])  # dividing S = 4, not dividing, longer than S
def test_pieces_equal_token_by_token_matrix(chunk, splits):
  worst = check_splits(splits, chunk)
  assert worst < tolerance("float64"), worst


@pytest.mark.slow
@pytest.mark.parametrize("case", [dict(), dict(impl="recurrent"), dict(momentum=False),
                                  dict(momentum=False, chunk=2), dict(dtype_name="float32")])
def test_pieces_equal_token_by_token_variants(case):
  for splits in (SPLITS,) + MORE_SPLITS[:2]:
    worst = check_splits(splits, **case)
    assert worst < tolerance(case.get("dtype_name", "float64")), (splits, worst)
