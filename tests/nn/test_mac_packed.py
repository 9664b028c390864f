"""Titans MAC with packed documents (``MemoryAsContext._packed``): a packed row equals each
document alone.

The reference of a document is the mixer run on it alone, without segments (the document at the
start of a row, then other inputs: MAC is causal, so its outputs are the document's alone), in
the unpacked scan over segments. The rows put documents at a segment's start and in its middle,
two and three in one segment, a document shorter than a segment that straddles two buffer
segments, one-token documents, documents of exactly one segment and longer, with a
``memory_chunk_size`` that divides the window and one that does not, and rows of different
layouts side by side. Outputs and gradients (w.r.t. every parameter and x) in float64 (tight)
and float32; the buffer layout of ``mac_slots`` is checked against its rules directly.

Each case compiles the packed and the reference program (tens of seconds on 2 cores): the
default run takes the outputs in float64 with the memory's recurrent form (``impl``) and the
non-dividing memory chunk; the chunked form, float32, the gradients and the token-by-token
path are marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx.nn import ModelConfig
from nlx.nn.segments import Segments, from_ids
from nlx.nn.titans import MemoryAsContext, buffer_segments, mac_slots
import packed_layouts

D, S, T = 8, 4, 24
# Per row (window S = 4): a segment's middle (5 = 4 + 1 straddles nothing, 3 starts mid-segment
# and straddles), a one-token document, exactly a segment (4), two and three short documents in
# one segment (2, 1, 1), a document longer than two segments (9).
LENGTHS = ((5, 3, 1, 7, 8), (4, 2, 1, 1, 9, 3, 4), (1, 1, 1, 2, 3, 16), (24,))


def layout(lengths=LENGTHS, t=T):
  """``packed_layouts.layout`` of this file's rows."""
  return packed_layouts.layout(lengths, t)


def mixer(chunk, dtype, impl="chunked"):
  cfg = ModelConfig(family="titans_mac", d_model=D, n_heads=2, window=S, n_persistent=2,
                    memory_chunk_size=chunk, conv_size=3, impl=impl)
  mac = MemoryAsContext(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mac)
  params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, params)
  return graphdef, params


@functools.lru_cache(maxsize=None)
def run(chunk, dtype_name, impl="chunked", grads=True):
  """Packed and alone outputs, and (``grads``) the gradients of the documents' summed losses."""
  with jax.enable_x64(dtype_name == "float64"):
    dtype = jnp.dtype(dtype_name)
    graphdef, params = mixer(chunk, dtype, impl)
    ids, docs = layout()
    segments, _ = from_ids(jnp.asarray(ids))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(LENGTHS), T, D)).astype(dtype_name)
    x[3] = x[0]  # one document, the tokens of row 0: its later tokens see the earlier ones
    w = rng.standard_normal((len(LENGTHS), T, D)).astype(dtype_name)  # a linear "loss"
    alone_x = rng.standard_normal((len(docs), T, D)).astype(dtype_name)
    alone_w = np.zeros_like(alone_x)
    for i, (row, lo, hi) in enumerate(docs):
      alone_x[i, :hi - lo], alone_w[i, :hi - lo] = x[row, lo:hi], w[row, lo:hi]

    def packed(p, x):
      y, _ = nnx.merge(graphdef, p)(x, segments=segments)
      return jnp.sum(jnp.tanh(y) * w), y

    def alone(p, x):
      y, _ = nnx.merge(graphdef, p)(x)
      return jnp.sum(jnp.tanh(y) * alone_w), y

    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    if not grads:
      yp, ya = jax.jit(lambda p, a, b: (packed(p, a)[1], alone(p, b)[1]))(
          params, jnp.asarray(x), jnp.asarray(alone_x))
      return to_np(dict(packed=yp, alone=ya))
    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    both = jax.jit(lambda p, a, b: (grad(packed)(p, a), grad(alone)(p, b)))
    ((lp, yp), (gp, gxp)), ((la, ya), (ga, gxa)) = both(params, jnp.asarray(x),
                                                        jnp.asarray(alone_x))
    return to_np(dict(packed=yp, alone=ya, loss=(lp, la), grads=(gp, ga), gx=(gxp, gxa)))


def tolerance(dtype_name, scale):
  return (2e-5 if dtype_name == "float32" else 1e-12) * scale


def assert_documents_equal(got, dtype_name):
  _, docs = layout()
  scale = float(np.abs(got["alone"]).max())
  for i, (row, lo, hi) in enumerate(docs):
    np.testing.assert_allclose(got["packed"][row, lo:hi], got["alone"][i, :hi - lo], rtol=0,
                               atol=tolerance(dtype_name, scale), err_msg=f"document {i}")
  # The documents do matter: row 3 (row 0's tokens as one document) agrees with row 0 on its
  # first document only.
  np.testing.assert_allclose(got["packed"][3, :5], got["packed"][0, :5], rtol=0,
                             atol=tolerance(dtype_name, scale))
  assert np.abs(got["packed"][0, 5:8] - got["packed"][3, 5:8]).max() > 1e-3


def test_packed_rows_equal_documents_alone_recurrent_memory():
  assert_documents_equal(run(3, "float64", "recurrent", grads=False), "float64")


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("chunk", [2, 3])  # memory_chunk_size dividing S = 4, and not
def test_packed_rows_equal_documents_alone(chunk, dtype_name):
  assert_documents_equal(run(chunk, dtype_name), dtype_name)


@pytest.mark.slow
@pytest.mark.parametrize("case", [(2, "float64"), (3, "float64"), (2, "float32"),
                                  (3, "float32"), (3, "float64", "recurrent")])
def test_gradients_of_packed_loss_equal_sum_over_documents(case):
  got, dtype_name = run(*case), case[1]
  _, docs = layout()
  lp, la = got["loss"]
  np.testing.assert_allclose(lp, la, rtol=tolerance(dtype_name, 1.0))
  gp, ga = (jax.tree.leaves(g) for g in got["grads"])
  assert len(gp) == len(ga)
  scale = max(float(np.abs(g).max()) for g in ga)
  assert scale > 0
  for a, b in zip(gp, ga):
    np.testing.assert_allclose(a, b, rtol=0, atol=tolerance(dtype_name, scale))
  gxp, gxa = got["gx"]
  scale = float(np.abs(gxa).max())
  for i, (row, lo, hi) in enumerate(docs):
    np.testing.assert_allclose(gxp[row, lo:hi], gxa[i, :hi - lo], rtol=0,
                               atol=tolerance(dtype_name, scale), err_msg=f"document {i}")


@pytest.mark.slow
def test_packed_equals_token_by_token_path():
  # The stateful path (token by token, unchanged) with the same segments: one more reference.
  graphdef, params = mixer(3, jnp.float32)
  ids, _ = layout()
  segments, _ = from_ids(jnp.asarray(ids))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((len(LENGTHS), T, D)), jnp.float32)
  mac = nnx.merge(graphdef, params)
  packed, _ = jax.jit(lambda x: mac(x, segments=segments))(x)
  state = mac.init_state(len(LENGTHS), T)
  steps, _ = jax.jit(lambda x, s: mac(x, s, 0, segments))(x, state)
  np.testing.assert_allclose(packed, steps, rtol=0, atol=2e-5 * float(np.abs(steps).max()))


slots_of = jax.jit(mac_slots, static_argnums=1)


def check_layout(lengths, s):
  """``mac_slots``' rules: slots increase, a document of at least s tokens starts a buffer
  segment (so its later segments are whole buffer segments), shorter ones follow the previous
  token, and every slot lies inside ``buffer_segments``."""
  t = sum(lengths)
  reset = np.zeros(t, bool)
  reset[np.cumsum(lengths)[:-1]] = True
  slots, pos = (np.asarray(a) for a in slots_of(jnp.asarray(reset), s))
  assert (np.diff(slots) >= 1).all()
  assert slots[-1] < buffer_segments(t, s) * s
  lo = 0
  for n in lengths:
    np.testing.assert_array_equal(pos[lo:lo + n], np.arange(n))
    np.testing.assert_array_equal(np.diff(slots[lo:lo + n]), 1)  # no placeholder inside
    if n >= s:
      assert slots[lo] % s == 0, (lengths, lo)
    elif lo > 0:
      assert slots[lo] == slots[lo - 1] + 1, (lengths, lo)
    lo += n
  return slots


def test_mac_slots_layout_and_worst_case_buffer():
  slots = check_layout((3, 5, 1, 4, 2, 9), 4)
  np.testing.assert_array_equal(slots[:3], [0, 1, 2])
  assert slots[3] == 4 and slots[8] == 9 and slots[9] == 12  # padded: 5 at 4, 4 at 12
  rng = np.random.default_rng(0)
  for _ in range(40):  # random layouts of T tokens
    s = int(rng.integers(1, 7))
    cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(0, 8)), replace=False))
    check_layout(tuple(int(n) for n in np.diff(np.concatenate([[0], cuts, [T]]))), s)
  # The worst layouts fill the buffer: one-token documents, each followed by one of s tokens
  # (padded by s − 1); documents of exactly s tokens alone pad nothing.
  for s in (2, 4, 8):
    t = 8 * s + 3
    k, rest = divmod(t, s + 1)
    slots = check_layout((1, s) * k + ((rest,) if rest else ()), s)
    assert slots[-1] == t + k * (s - 1) - 1 >= (buffer_segments(t, s) - 1) * s
    slots = check_layout((s,) * (t // s) + (t % s,), s)
    np.testing.assert_array_equal(slots, np.arange(t))


def test_bad_reset_shape_raises_naming_the_field():
  mac = nnx.merge(*mixer(3, jnp.float32))
  wrong = jnp.zeros((4, 23), jnp.int32)
  with pytest.raises(ValueError, match=r"segments.reset has shape \(4, 23\); it must be"):
    mac(jnp.zeros((4, T, D)), segments=Segments(wrong.astype(bool), wrong, wrong))
