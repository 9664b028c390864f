"""Packed documents in the Continuum Memory System (nlx.nn.cms, nlx.nn.next_token): a packed row
equals each document alone.

The reference of a document is the same module run on it alone, without segments (the document
at the start of a row, followed by other inputs: the CMS and the LM are causal, so its outputs
are those of the document alone). The rows put document boundaries inside a period, on a period
edge, two in one period, a one-token document and documents longer than the longest period.

CMS alone: outputs and gradients (w.r.t. the CMS parameters and x) in float64 (tight) and
float32, for every variant and periods (2, 4) and (3, 6); the stateful path in pieces with
segments equals one call; a frozen CMS ignores segments. The LM with ``cms_objective=
"next_token"``: the buffer layout of ``call_documents``, logits and gradients of the packed loss,
constant ids equal no ids, and prefill pieces with token steps equal one call (slow).
"""

import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nlx
from nlx.nn import ModelConfig, norms
from nlx.nn import next_token
from nlx.nn.cms import CMS
from nlx.nn.segments import from_ids
import packed_layouts

D, HIDDEN, LR, T = 8, 16, 0.05, 24
# Per row: document lengths. Periods (2, 4) and (3, 6): boundaries inside periods and on edges,
# two in one period (… 3, 1 …), a one-token document, documents longer than C_L.
LENGTHS = ((5, 3, 1, 7, 8), (12, 1, 2, 9), (6, 6, 4, 8))


def layout(lengths=LENGTHS, t=T):
  """``packed_layouts.layout`` of this file's rows."""
  return packed_layouts.layout(lengths, t)


def alone_rows(packed, docs, filler):
  """Each document at the start of its own row, the rest of the row ``filler``."""
  rows = np.array(filler[:len(docs)])
  for i, (row, lo, hi) in enumerate(docs):
    rows[i, :hi - lo] = packed[row, lo:hi]
  return rows


def doc_mask(docs, t=T):
  mask = np.zeros((len(docs), t), bool)
  for i, (_, lo, hi) in enumerate(docs):
    mask[i, :hi - lo] = True
  return mask


def floats(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


# ---------------------------------------------------------------------------------------------
# The CMS module
# ---------------------------------------------------------------------------------------------


def make_cms(variant, periods, lr=LR):
  cms = CMS(ModelConfig(d_model=D, mlp_dim=HIDDEN, cms_periods=periods, cms_variant=variant,
                        cms_lr=lr), rngs=nnx.Rngs(3))
  if cms.mix is not None:
    cms.mix[...] = jnp.asarray([0.7, 1.3], jnp.float32)
  return cms


@functools.lru_cache(maxsize=None)
def cms_case(variant, periods, dtype_name):
  """Packed and alone outputs and gradients of one CMS (numpy)."""
  ids, docs = layout()
  with jax.enable_x64(dtype_name == "float64"):
    dtype = jnp.dtype(dtype_name)
    graphdef, params = nnx.split(make_cms(variant, periods))
    params = floats(params, dtype)
    rng = np.random.default_rng(0)
    x = (0.5 * rng.normal(size=(len(LENGTHS), T, D))).astype(dtype)  # (1: the levels diverge)
    cot = rng.normal(size=x.shape).astype(dtype)
    x_alone = alone_rows(x, docs, (0.5 * rng.normal(size=(len(docs), T, D))).astype(dtype))
    cot_alone = alone_rows(cot, docs, np.zeros((len(docs), T, D), dtype))  # zero off documents
    segments, _ = from_ids(jnp.asarray(ids))

    def loss(p, x, cot, segments):
      y, _ = nnx.merge(graphdef, p)(x, segments=segments)
      return jnp.sum(y * cot), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (gp, gx) = grad(params, x, cot, segments)
    (_, ya), (gpa, gxa) = grad(params, x_alone, cot_alone, None)
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    return to_np(dict(y=y, alone=ya, gp=gp, gpa=gpa, gx=gx, gxa=gxa)), docs


def tol(dtype_name):
  return dict(float64=1e-12, float32=2e-5)[dtype_name]


def check_cms_case(variant, periods, dtype_name):
  got, docs = cms_case(variant, periods, dtype_name)
  atol = tol(dtype_name)
  for key, ref in (("y", "alone"), ("gx", "gxa")):
    scale = float(np.abs(got[ref]).max())
    for i, (row, lo, hi) in enumerate(docs):
      np.testing.assert_allclose(got[key][row, lo:hi], got[ref][i, :hi - lo], rtol=0,
                                 atol=atol * scale, err_msg=f"{key}, document {i}")
  gp, gpa = jax.tree.leaves(got["gp"]), jax.tree.leaves(got["gpa"])
  assert len(gp) == len(gpa)
  scale = max(float(np.abs(g).max()) for g in gpa)
  for a, b in zip(gp, gpa):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol * scale)


FAST_CASES = [("sequential", (2, 4)), ("nested", (3, 6)), ("independent", (3, 6))]
SLOW_CASES = [("sequential", (3, 6)), ("nested", (2, 4)), ("independent", (2, 4))]
# A level whose period is at least T reads its initial weights (no document reaches an update).
LONG_PERIODS = [("sequential", (4, 32)), ("nested", (24, 48))]


@pytest.mark.parametrize("variant,periods", FAST_CASES + [
    pytest.param(v, p, marks=pytest.mark.slow) for v, p in SLOW_CASES + LONG_PERIODS])
def test_packed_cms_equals_documents_alone_float64(variant, periods):
  check_cms_case(variant, periods, "float64")


@pytest.mark.parametrize("variant,periods", LONG_PERIODS[:1] + [
    pytest.param(v, p, marks=pytest.mark.slow) for v, p in FAST_CASES + SLOW_CASES])
def test_packed_cms_equals_documents_alone_float32(variant, periods):
  check_cms_case(variant, periods, "float32")


def test_the_updates_matter_and_a_leak_would_show():
  """The levels learn (the outputs differ from a frozen CMS), and ignoring the boundaries
  changes the later documents: the comparison above can fail."""
  got, docs = cms_case("sequential", (2, 4), "float64")
  x = 0.5 * np.random.default_rng(0).normal(size=(len(LENGTHS), T, D))  # cms_case's inputs
  with jax.enable_x64(True):
    outs = []
    for lr in (LR, 0.0):
      graphdef, params = nnx.split(make_cms("sequential", (2, 4), lr=lr))
      outs.append(np.asarray(nnx.merge(graphdef, floats(params, jnp.float64))(x)[0]))
  leaky, frozen = outs
  row, lo, hi = docs[-1]
  assert float(np.abs(leaky[row, lo:hi] - got["y"][row, lo:hi]).max()) > 1e-3
  assert float(np.abs(frozen - got["y"]).max()) > 1e-3


@pytest.mark.parametrize("variant", ["sequential", pytest.param("nested", marks=pytest.mark.slow)])
def test_stateful_pieces_with_segments_equal_one_call(variant):
  ids, _ = layout()
  with jax.enable_x64(True):
    graphdef, params = nnx.split(make_cms(variant, (2, 4)))
    cms = nnx.merge(graphdef, floats(params, jnp.float64))
    x = jnp.asarray(0.5 * np.random.default_rng(1).normal(size=(len(LENGTHS), T, D)))
    segments, _ = from_ids(jnp.asarray(ids))
    whole, _ = cms(x, segments=segments)
    state = floats(cms.init_state(len(LENGTHS), T), jnp.float64)
    run = jax.jit(lambda s, x, seg: nnx.merge(graphdef, floats(params, jnp.float64))(
        x, s, segments=seg))
    outs = []
    for a, b in [(0, 5), (5, 17), (17, T)]:  # pieces that start at and inside documents
      piece = jax.tree.map(lambda z, a=a, b=b: z[:, a:b], segments)
      y, state = run(state, x[:, a:b], piece)
      outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, rtol=0, atol=1e-12)
    # Row 1 ends with a document of 9 tokens: the counters count from its first token.
    assert int(state["level1"].step[1]) == 9 % 4 and int(state["level0"].step[1]) == 9 % 2


def test_frozen_cms_ignores_segments():
  ids, _ = layout()
  cms = make_cms("sequential", (2, 4), lr=0.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (len(LENGTHS), T, D))
  segments, _ = from_ids(jnp.asarray(ids))
  np.testing.assert_array_equal(cms(x, segments=segments)[0], cms(x)[0])
  state = cms.init_state(len(LENGTHS), T)
  np.testing.assert_array_equal(cms(x, state, segments=segments)[0], cms(x)[0])


def test_segments_of_the_wrong_shape_are_refused_by_name():
  cms = make_cms("sequential", (2, 4))
  x = jnp.zeros((2, 6, D))
  segments, _ = from_ids(jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"segments.reset has shape \(2, 5\); it must be"):
    cms(x, segments=segments)


# ---------------------------------------------------------------------------------------------
# The next_token objective
# ---------------------------------------------------------------------------------------------

BASE = dict(vocab_size=32, d_model=16, n_heads=2, mlp_dim=24, cms_periods=(2, 4), cms_lr=0.5,
            cms_objective="next_token", max_seq_len=64)
LM_LENGTHS = ((5, 3, 1, 7, 8), (12, 1, 2, 9))


def test_document_layout_starts_every_long_document_on_a_chunk():
  rng = np.random.default_rng(0)
  for c in (2, 3, 4):
    for t in (1, 7, 24):
      n = -(-(t + (t // (c + 1)) * (c - 1)) // c)
      rate = rng.choice([0.05, 0.3, 0.7], (16, 1))
      ids = np.cumsum(rng.random((16, t)) < rate, axis=1).astype(np.int32)
      seg, _ = from_ids(jnp.asarray(ids))
      tok = np.broadcast_to(np.arange(t) + 1, ids.shape)
      layout_rows = jax.jit(jax.vmap(lambda *r, c=c, n=n: next_token.document_layout(*r, c, n)))
      out = jax.tree.map(np.asarray, layout_rows(tok, *seg))
      for row in range(ids.shape[0]):
        slots, (btok, _, pos, _, real) = jax.tree.map(lambda a, row=row: a[row], out)
        assert (np.diff(slots) >= 1).all() and slots[-1] < n * c
        np.testing.assert_array_equal(btok[slots], np.arange(t) + 1)
        assert real.sum() == t and (btok[~real] == 0).all()
        np.testing.assert_array_equal(pos[slots], np.asarray(seg.positions[row]))
        starts = np.append(0, np.flatnonzero(np.asarray(seg.reset[row])))
        for s, e in zip(starts, np.append(starts[1:], t)):
          if e - s > c:  # a document longer than a chunk starts on a chunk boundary
            assert slots[s] % c == 0
          assert (np.diff(slots[s:e]) == 1).all()  # no placeholder inside a document


def lm(family="hope_attention", **fields):
  return nlx.build_model(ModelConfig(family=family, n_layers=2, **{**BASE, **fields}),
                         rngs=nnx.Rngs(0))


def _rms_norm(self, x, gate=None):
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps) * self.scale[...]
  return (y if gate is None else y * jax.nn.silu(gate.astype(dtype))).astype(x.dtype)


def lm_inputs():
  ids, docs = layout(LM_LENGTHS)
  rng = np.random.default_rng(1)
  tok = rng.integers(0, BASE["vocab_size"], ids.shape).astype(np.int32)
  targets = rng.integers(0, BASE["vocab_size"], ids.shape).astype(np.int32)
  filler = rng.integers(0, BASE["vocab_size"], (len(docs), T)).astype(np.int32)
  return ids, docs, tok, targets, alone_rows(tok, docs, filler), alone_rows(targets, docs, filler)


@functools.lru_cache(maxsize=None)
def lm_case(dtype_name, grads):
  """Packed and alone logits (and loss gradients) of the LM, and its logits for constant ids."""
  ids, docs, tok, targets, tok_alone, targets_alone = lm_inputs()
  x64 = dtype_name == "float64"
  patch = mock.patch.object(norms.RMSNorm, "__call__", _rms_norm) if x64 else (
      contextlib.nullcontext())
  with jax.enable_x64(x64), patch:
    graphdef, params = nnx.split(lm())
    params = floats(params, jnp.dtype(dtype_name))

    def loss(p, tok, targets, mask, ids):
      logits = nnx.merge(graphdef, p)(tok, segment_ids=ids)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return jnp.sum(jnp.where(mask, nll, 0.0)), logits

    run = jax.value_and_grad(loss, has_aux=True) if grads else (
        lambda *a: (loss(*a), None))
    run = jax.jit(run)
    (lp, packed), gp = run(params, tok, targets, np.ones(tok.shape, bool), ids)
    (la, alone), ga = run(params, tok_alone, targets_alone, doc_mask(docs), None)
    const = None
    if not grads:  # one document per row as constant ids: the packed program, other ids
      (_, const), _ = run(params, tok, targets, np.ones(tok.shape, bool), np.full_like(ids, 7))
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    return to_np(dict(packed=packed, alone=alone, loss=(lp, la), gp=gp, ga=ga, const=const)), docs


def assert_lm_documents(got, docs, atol):
  scale = float(np.abs(got["alone"]).max())
  for i, (row, lo, hi) in enumerate(docs):
    np.testing.assert_allclose(got["packed"][row, lo:hi], got["alone"][i, :hi - lo], rtol=0,
                               atol=atol * scale, err_msg=f"document {i}")
  np.testing.assert_allclose(*got["loss"], rtol=atol)


def test_next_token_packed_rows_equal_documents_alone():
  got, docs = lm_case("float32", False)
  assert_lm_documents(got, docs, 1e-5)
  _, _, tok, _, _, _ = lm_inputs()
  graphdef, params = nnx.split(lm())
  plain = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tok)
  np.testing.assert_allclose(got["const"], plain, rtol=0, atol=1e-5 * float(np.abs(plain).max()))


@pytest.mark.slow  # ~30 s each: the gradient of the chunk scan (second order)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_next_token_gradients_of_packed_loss_equal_documents_alone(dtype_name):
  got, docs = lm_case(dtype_name, True)
  atol = dict(float32=1e-5, float64=1e-11)[dtype_name]
  assert_lm_documents(got, docs, atol)
  gp, ga = jax.tree.leaves(got["gp"]), jax.tree.leaves(got["ga"])
  assert len(gp) == len(ga)
  scale = max(float(np.abs(g).max()) for g in ga)
  for a, b in zip(gp, ga):
    np.testing.assert_allclose(a, b, rtol=0, atol=10 * atol * scale)


@pytest.mark.slow  # ~90 s: the token steps compile the chunk's forward and gradient in a cond
def test_next_token_prefill_pieces_and_steps_with_ids_equal_one_call():
  ids, _, tok, _, _, _ = lm_inputs()
  model = lm()
  whole = model(tok, segment_ids=ids)
  state, outs = model.init_state(2, T), []
  for a, b in [(0, 3), (3, 13)]:
    out, state = model.prefill(tok[:, a:b], state, ids[:, a:b])
    outs.append(out)
  for t in range(13, T):
    out, state = model.step(tok[:, t], state, ids[:, t])
    outs.append(out[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, rtol=0, atol=1e-5)
