"""Packed documents (``segment_ids``) in every family: a packed row equals each document alone.

The reference of a document is the model run on that document alone, without segment ids (the
document at the start of a row, followed by other tokens: the model is causal, so the document's
logits are those of the document alone; tests/nn/test_model.py tests causality). The packed rows
put document boundaries inside a chunk of the chunked ops (chunk 8), at a chunk edge, two and
three in one chunk, a one-token document, and starts in the middle of Titans MAC's segments
(window 4) and of the memories' gradient chunks (memory chunk 4).

Checks per family: logits (float32 and float64), gradients of the sum of the documents' losses,
one document per row given as constant ids equals no ids, prefill in two pieces and token steps
with segment ids equal the one call. The full matrix compiles a forward and backward program
per family and dtype (minutes on 2 cores): it is marked slow; the default run covers the
convolution's reset, the argument checks and the packed forward of a few families.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlx import configs
from nlx.nn import build_model, registry
from nlx.nn.attention import attend
from nlx.nn.conv import ShortConv
from nlx.nn.segments import from_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = registry.names()
# Extra cases: (family, config overrides). HOPE with CMS levels learning from the LM loss runs
# the model chunk by chunk (nlx.nn.next_token).
CASES = [(f, ()) for f in FAMILIES] + [("hope", (("cms_objective", "next_token"),)),
                                       ("titans_lmm", (("titans_rate", "gram"),))]
CASE_IDS = [f + "".join(f"-{v}" for _, v in fields) for f, fields in CASES]
FAST = ("transformer", "gated_deltanet", "samba")
T, SPLIT, VOCAB = 24, 12, 61
# Per row: document lengths and their ids (an id may come back: a new document where it changes).
LENGTHS = ((5, 3, 1, 7, 8), (12, 1, 2, 9))
NAMES = ((3, 7, 3, 1, 2), (0, 5, 0, 4))


def tiny_config(family, **fields):
  cfg = configs.load(os.path.join(ROOT, "configs", f"{family}.py:tiny")).model
  small = dict(d_model=32, mlp_dim=64, vocab_size=VOCAB, max_seq_len=48, memory_chunk_size=4,
               state_dim=8, mamba_head_dim=16, impl="chunked", chunk_size=8)
  if cfg.window is not None:
    small["window"] = 4
  if family.startswith("hope"):
    small["cms_periods"] = (4, 8)
  cfg.update(small)
  cfg.update(fields)
  return cfg


def layout():
  """``(segment_ids [2, T], documents as (row, lo, hi))``."""
  ids, docs = np.zeros((2, T), np.int32), []
  for row, (lengths, names) in enumerate(zip(LENGTHS, NAMES)):
    lo = 0
    for n, name in zip(lengths, names):
      ids[row, lo:lo + n] = name
      docs.append((row, lo, lo + n))
      lo += n
    assert lo == T
  return ids, docs


def inputs(seed=1):
  """Packed tokens, ids and targets; the documents alone (each at the start of a row, then
  other tokens) with their targets and loss mask, and the packed rows themselves at the end."""
  rng = np.random.default_rng(seed)
  ids, docs = layout()
  tok = rng.integers(0, VOCAB, (2, T)).astype(np.int32)
  targets = rng.integers(0, VOCAB, (2, T)).astype(np.int32)
  alone = rng.integers(0, VOCAB, (len(docs) + 2, T)).astype(np.int32)
  alone_targets, mask = np.zeros_like(alone), np.zeros(alone.shape, np.float32)
  for i, (row, lo, hi) in enumerate(docs):
    alone[i, :hi - lo], alone_targets[i, :hi - lo] = tok[row, lo:hi], targets[row, lo:hi]
    mask[i, :hi - lo] = 1.0
  alone[len(docs):] = tok
  return dict(tok=tok, ids=ids, targets=targets, alone=alone, alone_targets=alone_targets,
              mask=mask), docs


def token_loss(logits, targets):
  return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def floats(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


@functools.lru_cache(maxsize=None)
def run_case(family, fields, dtype_name):
  """Everything the slow tests compare, for one family and dtype (numpy arrays)."""
  x64 = dtype_name == "float64"
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    model = build_model(tiny_config(family, **dict(fields)), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = floats(params, dtype)
    data, _ = inputs()

    def packed_loss(p, tok, ids, targets):
      logits = nnx.merge(graphdef, p)(tok, segment_ids=ids)
      return token_loss(logits, targets).sum(), logits

    def alone_loss(p, tok, targets, mask):
      logits = nnx.merge(graphdef, p)(tok)
      return (token_loss(logits, targets) * mask).sum(), logits

    both = jax.jit(lambda p, d: (
        jax.value_and_grad(packed_loss, has_aux=True)(p, d["tok"], d["ids"], d["targets"]),
        jax.value_and_grad(alone_loss, has_aux=True)(p, d["alone"], d["alone_targets"],
                                                     d["mask"])))
    ((lp, packed), gp), ((la, alone), ga) = both(params, data)
    # One document per row, as constant ids: the program above, other ids.
    const = dict(data, ids=np.full_like(data["ids"], 9))
    (_, const_logits), _ = both(params, const)[0]

    prefill = jax.jit(lambda p, tok, s, ids: nnx.merge(graphdef, p).prefill(tok, s, ids))
    step = jax.jit(lambda p, tok, s, ids: nnx.merge(graphdef, p).step(tok, s, ids))
    state = floats(jax.jit(lambda p: nnx.merge(graphdef, p).init_state(2))(params), dtype)
    tok, ids = data["tok"], data["ids"]
    first, s1 = prefill(params, tok[:, :SPLIT], state, ids[:, :SPLIT])
    second, s2 = prefill(params, tok[:, SPLIT:], s1, ids[:, SPLIT:])
    steps, s = [], s1
    for t in range(SPLIT, SPLIT + 3):
      logits, s = step(params, tok[:, t], s, ids[:, t])
      steps.append(logits)
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    return to_np(dict(packed=packed, alone=alone, loss=(lp, la), grads=(gp, ga),
                      const=const_logits, pieces=jnp.concatenate([first, second], 1),
                      steps=jnp.stack(steps, 1), stream=s2["stream"]))


def tolerance(dtype_name, scale):
  """Of ``scale`` (the largest reference value): float32, the rounding of the chunked ops as
  documents move inside chunks (seen: up to 5e-6); float64 (norms in float64 too): seen 3e-15."""
  return (1e-4 if dtype_name == "float32" else 1e-11) * scale


def assert_documents_equal(packed, alone, docs, dtype_name):
  scale = float(np.abs(alone).max())
  for i, (row, lo, hi) in enumerate(docs):
    np.testing.assert_allclose(packed[row, lo:hi], alone[i, :hi - lo], rtol=0,
                               atol=tolerance(dtype_name, scale), err_msg=f"document {i}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("family,fields", CASES, ids=CASE_IDS)
def test_packed_rows_equal_documents_alone(family, fields, dtype_name):
  got = run_case(family, fields, dtype_name)
  _, docs = inputs()
  assert_documents_equal(got["packed"], got["alone"], docs, dtype_name)
  # One document per row as constant ids equals no ids.
  scale = float(np.abs(got["const"]).max())
  np.testing.assert_allclose(got["const"], got["alone"][len(docs):], rtol=0,
                             atol=tolerance(dtype_name, scale))


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("family,fields", CASES, ids=CASE_IDS)
def test_gradients_of_packed_loss_equal_sum_over_documents(family, fields, dtype_name):
  got = run_case(family, fields, dtype_name)
  lp, la = got["loss"]
  np.testing.assert_allclose(lp, la, rtol=tolerance(dtype_name, 1.0))
  gp, ga = (jax.tree.leaves(g) for g in got["grads"])
  assert len(gp) == len(ga)
  scale = max(float(np.abs(g).max()) for g in ga)
  for a, b in zip(gp, ga):
    np.testing.assert_allclose(a, b, rtol=0, atol=tolerance(dtype_name, scale))
  assert scale > 0


@pytest.mark.slow
@pytest.mark.parametrize("family,fields", CASES, ids=CASE_IDS)
def test_prefill_in_pieces_and_steps_with_segment_ids_equal_one_call(family, fields):
  got = run_case(family, fields, "float32")
  data, _ = inputs()
  scale = float(np.abs(got["packed"]).max())
  np.testing.assert_allclose(got["pieces"], got["packed"], rtol=0, atol=1e-4 * scale)
  np.testing.assert_allclose(got["steps"], got["packed"][:, SPLIT:SPLIT + 3], rtol=0,
                             atol=1e-4 * scale)
  _, stream = from_ids(jnp.asarray(data["ids"]))
  for a, b in zip(got["stream"], stream):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", FAST)
def test_packed_forward_float32(family):
  model = build_model(tiny_config(family), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  data, docs = inputs(seed=2)
  fn = jax.jit(lambda p, tok, ids, alone: (nnx.merge(graphdef, p)(tok, segment_ids=ids),
                                           nnx.merge(graphdef, p)(alone)))
  packed, alone = fn(params, data["tok"], data["ids"], data["alone"])
  assert_documents_equal(np.asarray(packed), np.asarray(alone), docs, "float32")
  # The documents do matter: without ids the later documents see the earlier ones.
  assert np.abs(np.asarray(alone[len(docs):] - packed)).max() > 1e-3


def conv_reference(w, past, x, reset):
  """numpy: ``y_t = Σ_i w_i x_{t−i}`` over the inputs of t's document only (SiLU after); the
  carried ``past`` inputs belong to the document of the call's first token unless it resets."""
  width = w.shape[0]
  full = np.concatenate([past, x], 1)
  b, t, _ = x.shape
  y = np.zeros_like(x)
  for r in range(b):
    start = -(width - 1)  # the carried inputs continue the document
    for i in range(t):
      if reset[r, i]:
        start = i
      for j in range(width):
        if i - j >= start:
          y[r, i] += w[j] * full[r, width - 1 + i - j]
  return y / (1 + np.exp(-y))


def test_short_conv_reset_hides_earlier_documents_and_streams():
  conv = ShortConv(3, 4, "c", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 10, 3)).astype(np.float32)
  past = rng.standard_normal((3, 3, 3)).astype(np.float32)
  reset = np.zeros((3, 10), bool)
  reset[0, [0, 4, 5]] = True   # a reset at t = 0 hides the carried inputs; a one-token document
  reset[1, [2, 9]] = True      # the carried inputs reach t < 2 only
  w = np.asarray(conv.kernel[...])
  want = conv_reference(w, past, x, reset)
  y, state = conv(jnp.asarray(x), jnp.asarray(past), jnp.asarray(reset))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  # In pieces (the second piece starts one token after a reset in row 0): the same outputs; the
  # state keeps the last document's inputs only.
  a, s = conv(jnp.asarray(x[:, :6]), jnp.asarray(past), jnp.asarray(reset[:, :6]))
  b, s = conv(jnp.asarray(x[:, 6:]), s, jnp.asarray(reset[:, 6:]))
  np.testing.assert_allclose(np.concatenate([a, b], 1), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s, state)
  np.testing.assert_array_equal(state[1], np.concatenate([np.zeros((2, 3)), x[1, 9:]]))
  # Without resets the reset path is the plain convolution.
  plain, _ = conv(jnp.asarray(x), jnp.asarray(past))
  same, _ = conv(jnp.asarray(x), jnp.asarray(past), jnp.zeros((3, 10), bool))
  np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="reset has shape"):
    conv(jnp.asarray(x), None, jnp.zeros((3, 9), bool))


def test_bad_segment_ids_raise_naming_the_argument():
  model = build_model(tiny_config("transformer"), rngs=nnx.Rngs(0))
  tok = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 5\)"):
    model(tok, segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids has dtype float32"):
    model(tok, segment_ids=jnp.zeros((2, 6), jnp.float32))
  state = model.init_state(2, 16)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(6,\)"):
    model.prefill(tok, state, jnp.zeros((6,), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_id has shape \(2, 1\)"):
    model.step(tok[:, 0], state, jnp.zeros((2, 1), jnp.int32))


def test_prefill_without_ids_then_with_ids_continues_the_document():
  # Without ids the tokens are one document with id 0 (a fresh stream's last id); a later call
  # whose first id is 0 continues it, at the positions that follow.
  model = build_model(tiny_config("transformer"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tok = jnp.asarray(inputs(seed=3)[0]["tok"])
  ids = np.zeros((2, T), np.int32)
  ids[0, 15:], ids[1, SPLIT:] = 4, 6  # row 0: the document continues for 3 tokens; row 1: not
  call = jax.jit(lambda p, tok, ids: nnx.merge(graphdef, p)(tok, segment_ids=ids))
  prefill = jax.jit(lambda p, tok, s, ids: nnx.merge(graphdef, p).prefill(tok, s, ids))
  state = model.init_state(2, 32)
  first, state = prefill(params, tok[:, :SPLIT], state, None)
  np.testing.assert_array_equal(state["stream"].position, [SPLIT, SPLIT])
  second, state = prefill(params, tok[:, SPLIT:], state, jnp.asarray(ids[:, SPLIT:]))
  want = call(params, tok, jnp.asarray(ids))
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(state["stream"].doc, [1, 1])
  np.testing.assert_array_equal(state["stream"].position, [T - 15, T - SPLIT])


def test_attend_with_documents_equals_each_document_alone_in_query_blocks():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((2, 11, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32) for _ in range(2))
  prefix = tuple(jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.float32) for _ in range(2))
  doc = jnp.asarray([[0] * 4 + [1] * 7, [0] * 1 + [1] * 9 + [2]])
  pos = jnp.arange(11)
  for window in (None, 3):
    got = attend(q, k, v, pos, pos, window, prefix, q_doc=doc, k_doc=doc, query_block=4)
    for row in range(2):
      for d in np.unique(doc[row]):
        idx = np.flatnonzero(doc[row] == d)
        sl = lambda x: x[row:row + 1, idx]
        alone = attend(sl(q), sl(k), sl(v), pos[:len(idx)], pos[:len(idx)], window,
                       tuple(p[row:row + 1] for p in prefix))
        np.testing.assert_allclose(got[row:row + 1, idx], alone, rtol=1e-5, atol=1e-6)
