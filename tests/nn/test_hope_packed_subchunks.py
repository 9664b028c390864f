"""Packed documents in HOPE when the output memory writes in sub-chunks of its own
(``memory_chunk_size`` S < ``hope_chunk_size`` C; nlx.nn.hope_packed): a packed row equals each
document alone.

The reference of a document is the mixer (or the LM) run on it alone, without segments: the
document at the start of a row, then zeros (the mixer is causal). The rows, with C = 4 and 6, put
document starts in the middle of a chunk and of a sub-chunk, on a chunk edge (12), three
one-token documents in one chunk, documents of several chunks whose first chunk straddles two
buffer chunks, a row of one document; the rows' layouts differ.

Mixer, float64 (tight): outputs, and the gradients of a weighted sum of the documents' outputs
w.r.t. every parameter and the inputs; prefill in pieces (starting inside documents, at their
first tokens and at chunk edges) and token-by-token steps with segments equal the one call; the
documents do matter (the row without segments differs). LM, float32 (slow): logits, the
gradients of the packed loss, and prefill pieces plus token steps with segment ids equal the one
call. The default run covers C = 4, S = 2 (outputs, and the stateful path); the other chunk
sizes, the gradients, the ablation switches and the LM are slow (compiling a forward and backward
program per case: tens of seconds each on 2 cores).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import configs
from nlx.nn import build_model
from nlx.nn.config import ModelConfig
from nlx.nn.hope import SelfModifyingTitans
from nlx.nn.segments import from_ids
import packed_layouts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, DK, T = 2, 4, 20
# Per row: document lengths (starts 0 3 9 10 11 12 | 0 4 5 14 | 0 6 | 0).
LENGTHS = ((3, 6, 1, 1, 1, 8), (4, 1, 9, 6), (6, 14), (20,))
# (hope_chunk_size C, memory_chunk_size S): S divides C, S < C.
FAST_CASES = [(4, 2)]
SLOW_CASES = [(4, 1), (6, 3), (6, 2), (6, 1)]
ALL_CASES = FAST_CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES]
# Pieces of the stateful path: [0, 5) [5, 9) [9, 10) ... token steps ... [16, 20).
PIECES = ((0, 5), (5, 9)) + tuple((i, i + 1) for i in range(9, 16)) + ((16, T),)


def layout(lengths=LENGTHS, t=T):
  """``packed_layouts.layout`` of this file's rows."""
  return packed_layouts.layout(lengths, t)


def alone_rows(packed, docs):
  """Each document at the start of its own row, zeros after."""
  rows = np.zeros((len(docs),) + packed.shape[1:], packed.dtype)
  for i, (row, lo, hi) in enumerate(docs):
    rows[i, :hi - lo] = packed[row, lo:hi]
  return rows


def packed_rows(alone, docs, shape):
  """The inverse of ``alone_rows``: each document's rows put back at its place."""
  rows = np.zeros(shape, alone.dtype)
  for i, (row, lo, hi) in enumerate(docs):
    rows[row, lo:hi] = alone[i, :hi - lo]
  return rows


def mixer(chunk, sub, **fields):
  """A float64 HOPE mixer (MLP memories, every default switch on): ``(graphdef, params)``."""
  fields = {"hope_memory": "mlp", "memory_expand": 2, **fields}
  cfg = ModelConfig(family="hope", d_model=H * DK, n_heads=H, hope_chunk_size=chunk,
                    memory_chunk_size=sub, **fields)
  graphdef, params = nnx.split(SelfModifyingTitans(cfg, rngs=nnx.Rngs(0)))
  return graphdef, jax.tree.map(lambda a: a.astype(jnp.float64), params)


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(len(LENGTHS), T, H * DK))
  weights = rng.normal(size=x.shape)  # the cotangent of the outputs
  return x, weights


def assert_documents_equal(packed, alone, docs, tol=1e-12):
  scale = float(np.abs(alone).max())
  assert scale > 0
  for i, (row, lo, hi) in enumerate(docs):
    np.testing.assert_allclose(packed[row, lo:hi], alone[i, :hi - lo], rtol=0, atol=tol * scale,
                               err_msg=f"document {i} (row {row}, tokens {lo}:{hi})")


@functools.lru_cache(maxsize=None)
def outputs(chunk, sub, fields=()):
  """``(packed, alone, unsegmented)`` outputs of the mixer (numpy, float64)."""
  with jax.enable_x64(True):
    graphdef, params = mixer(chunk, sub, **dict(fields))
    ids, docs = layout()
    x, _ = data()
    segments, _ = from_ids(jnp.asarray(ids))
    run = jax.jit(lambda p, x, s: (nnx.merge(graphdef, p)(x, segments=s)[0],
                                   nnx.merge(graphdef, p)(x)[0]))
    packed, plain = run(params, jnp.asarray(x), segments)
    alone = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params,
                                                                  jnp.asarray(alone_rows(x, docs)))
    return np.asarray(packed), np.asarray(alone), np.asarray(plain)


@pytest.mark.parametrize("chunk,sub", ALL_CASES)
def test_packed_rows_equal_documents_alone(chunk, sub):
  packed, alone, plain = outputs(chunk, sub)
  _, docs = layout()
  assert_documents_equal(packed, alone, docs)
  # The documents do matter: without segments a later document sees the earlier ones.
  for row, lo, hi in docs:
    if lo > 0:
      assert np.abs(plain[row, lo:hi] - packed[row, lo:hi]).max() > 1e-3, (row, lo, hi)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    (("hope_read", "before_write"),), (("hope_dgd", "off"),), (("hope_dgd", "neurips"),),
    (("hope_memory", "linear"), ("hope_objective", "dot")), (("hope_momentum", False),),
    (("hope_weight_decay", False), ("hope_adaptive_q", True)), (("hope_stop_gradient", True),),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f))
def test_packed_rows_equal_documents_alone_with_every_switch(fields):
  packed, alone, _ = outputs(4, 2, fields)
  assert_documents_equal(packed, alone, layout()[1])


@pytest.mark.slow
@pytest.mark.parametrize("chunk,sub", [(4, 2)] + SLOW_CASES)
def test_gradients_of_packed_rows_equal_documents_alone(chunk, sub):
  with jax.enable_x64(True):
    graphdef, params = mixer(chunk, sub)
    ids, docs = layout()
    x, weights = data()
    segments, _ = from_ids(jnp.asarray(ids))

    def packed_loss(p, x):
      return jnp.sum(weights * nnx.merge(graphdef, p)(x, segments=segments)[0])

    alone_weights = alone_rows(weights, docs)

    def alone_loss(p, x):
      return jnp.sum(alone_weights * nnx.merge(graphdef, p)(x)[0])

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))
    gp, gx = grad(packed_loss)(params, jnp.asarray(x))
    ga, gxa = grad(alone_loss)(params, jnp.asarray(alone_rows(x, docs)))
    leaves_p, leaves_a = jax.tree.leaves(gp), jax.tree.leaves(ga)
    assert len(leaves_p) == len(leaves_a)
    scale = max(float(np.abs(g).max()) for g in leaves_a)
    assert scale > 0
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gp), leaves_p, leaves_a):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale, err_msg=str(path[0]))
    gx_alone = packed_rows(np.asarray(gxa), docs, x.shape)
    np.testing.assert_allclose(gx, gx_alone, rtol=0, atol=1e-12 * float(np.abs(gx_alone).max()))


@pytest.mark.parametrize("chunk,sub", FAST_CASES + [
    pytest.param(6, 3, marks=pytest.mark.slow), pytest.param(6, 1, marks=pytest.mark.slow)])
def test_prefill_in_pieces_and_token_steps_with_segments_equal_one_call(chunk, sub):
  packed, _, _ = outputs(chunk, sub)
  with jax.enable_x64(True):
    graphdef, params = mixer(chunk, sub)
    ids, _ = layout()
    x, _ = data()
    segments, _ = from_ids(jnp.asarray(ids))
    run = jax.jit(lambda p, x, s, seg: nnx.merge(graphdef, p)(x, s, segments=seg))
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
                         nnx.merge(graphdef, params).init_state(len(LENGTHS), T))
    outs = []
    for lo, hi in PIECES:
      piece = jax.tree.map(lambda z, lo=lo, hi=hi: z[:, lo:hi], segments)
      o, state = run(params, jnp.asarray(x[:, lo:hi]), state, piece)
      outs.append(o)
    scale = float(np.abs(packed).max())
    np.testing.assert_allclose(np.concatenate(outs, 1), packed, rtol=0, atol=1e-12 * scale)
    # Each row's state is in the chunk of its last document's last token, counted from the
    # document's first token (lengths 8, 6, 14, 20).
    np.testing.assert_array_equal(state.offset, [n[-1] % chunk for n in LENGTHS])


def lm_config(chunk, sub):
  cfg = configs.load(os.path.join(ROOT, "configs", "hope.py:tiny")).model
  cfg.update(dict(d_model=32, mlp_dim=64, vocab_size=61, max_seq_len=48, cms_periods=(4, 8),
                  hope_chunk_size=chunk, memory_chunk_size=sub))
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("chunk,sub", [(4, 2), (6, 3)])
def test_lm_packed_loss_and_stateful_calls_equal_documents_alone(chunk, sub):
  """The LM (HOPE blocks with CMS): logits and the gradients of the packed loss equal each
  document alone; prefill in pieces and token steps with segment ids equal the one call."""
  graphdef, params = nnx.split(build_model(lm_config(chunk, sub), rngs=nnx.Rngs(0)))
  ids, docs = layout()
  rng = np.random.default_rng(5)
  tok = rng.integers(0, 61, ids.shape).astype(np.int32)
  targets = rng.integers(0, 61, ids.shape).astype(np.int32)
  alone, alone_targets = alone_rows(tok, docs), alone_rows(targets, docs)
  mask = alone_rows(np.ones(ids.shape, np.float32), docs)
  token_loss = lambda logits, y: jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None],
                                                     -1)[..., 0]

  def packed_loss(p):
    logits = nnx.merge(graphdef, p)(jnp.asarray(tok), segment_ids=jnp.asarray(ids))
    return token_loss(logits, jnp.asarray(targets)).sum(), logits

  def alone_loss(p):
    logits = nnx.merge(graphdef, p)(jnp.asarray(alone))
    return (token_loss(logits, jnp.asarray(alone_targets)) * mask).sum(), logits

  (lp, packed), gp = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(params)
  (la, by_doc), ga = jax.jit(jax.value_and_grad(alone_loss, has_aux=True))(params)
  assert_documents_equal(np.asarray(packed), np.asarray(by_doc), docs, tol=1e-4)
  np.testing.assert_allclose(lp, la, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ga))
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ga)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)

  prefill = jax.jit(lambda p, tok, s, ids: nnx.merge(graphdef, p).prefill(tok, s, ids))
  step = jax.jit(lambda p, tok, s, ids: nnx.merge(graphdef, p).step(tok, s, ids))
  state = jax.jit(lambda p: nnx.merge(graphdef, p).init_state(len(LENGTHS)))(params)
  first, state = prefill(params, tok[:, :7], state, ids[:, :7])
  steps = []
  for t in range(7, 11):
    logits, state = step(params, tok[:, t], state, ids[:, t])
    steps.append(logits)
  last, _ = prefill(params, tok[:, 11:], state, ids[:, 11:])
  scale = float(np.abs(packed).max())
  np.testing.assert_allclose(np.concatenate([first, np.stack(steps, 1), last], 1), packed,
                             rtol=0, atol=1e-4 * scale)
