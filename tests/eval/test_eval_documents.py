"""``nlx eval`` over documents: scoring a packed stream (rows of several documents with segment ids)
equals scoring each document alone, per document and in the token-weighted aggregate, on a
stand-in model that reads documents apart (and on the real LM once it takes segment ids)."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nlx import configs
from nlx.data import tokenizers
from nlx.eval import loglik
from nlx.eval import run as eval_run
from nlx.nn import segments
from nlx.nn.model import LM

BYTES = tokenizers.ByteTokenizer()


class DocBag(nnx.Module):
  """``logits[t] = W · mean(E[x_s], s <= t in t's document) + table[x_t]``."""

  def __init__(self, vocab: int = 256, d: int = 8, seed: int = 0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    self.embed = nnx.Param(jax.random.normal(k[0], (vocab, d), dtype))
    self.out = nnx.Param(jax.random.normal(k[1], (d, vocab), dtype) * 0.5)
    self.table = nnx.Param(jax.random.normal(k[2], (vocab, vocab), dtype) * 0.5)

  def __call__(self, tokens, segment_ids=None):
    t = tokens.shape[1]
    visible = jnp.tril(jnp.ones((1, t, t), bool))
    if segment_ids is not None:
      doc = segments.from_ids(segments.check_segment_ids(segment_ids, tokens.shape))[0].doc
      visible = visible & (doc[:, :, None] == doc[:, None, :])
    e = self.embed[...][tokens]
    w = visible.astype(e.dtype)
    h = jnp.einsum("bts,bsd->btd", w, e) / w.sum(-1, keepdims=True)
    return h @ self.out[...] + self.table[...][tokens]


class Leaky(DocBag):
  """Takes segment ids and ignores them: its documents condition on each other."""

  def __call__(self, tokens, segment_ids=None):
    return super().__call__(tokens)


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)) for n in lengths]


# seq_len 10: documents shorter than a row, exactly a row (10 + EOS = 11), longer than two rows
# (the pieces of document_pieces), empty (EOS only: nothing to score), one token.
LENGTHS = [4, 10, 27, 0, 1, 6, 3, 9, 2, 15, 5]
SEQ_LEN = 10


_COMPILED = {}


def _alone(model, ids, seq_len):
  """(sum log p, targets) of one document scored alone: each window of its own stream (every
  seq_len tokens, seq_len + 1 long) run by itself, no segment ids (right-padded to one shape,
  which a causal model does not read)."""
  graphdef, params = nnx.split(model)
  key = (id(model), jax.config.jax_enable_x64)
  if key not in _COMPILED:  # the model is kept with its function: its id is not reused
    _COMPILED[key] = (model, jax.jit(lambda p, x: -optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(x[:, :-1]), x[:, 1:])))
  logp_of = _COMPILED[key][1]
  total, count = 0.0, 0
  for start in range(0, len(ids) - 1, seq_len):
    piece = ids[start:start + seq_len + 1]
    row = np.zeros((1, seq_len + 1), np.int32)
    row[0, :len(piece)] = piece
    total += float(np.asarray(logp_of(params, row), np.float64)[0, :len(piece) - 1].sum())
    count += len(piece) - 1
  return total, count


def test_document_pieces_score_every_token_but_the_first_once():
  for n in (0, 1, 2, 10, 11, 12, 21, 22, 23, 40):
    ids = list(range(100, 100 + n))
    pieces = loglik.document_pieces(ids, SEQ_LEN)
    assert all(2 <= len(p) <= SEQ_LEN + 1 for p in pieces)
    assert [t for p in pieces for t in p[1:]] == ids[1:]


def test_pieces_pack_in_order_with_segment_ids_and_padding():
  tokens, ids, places = loglik.pack_pieces([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]], width=6)
  assert tokens.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
  assert ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
  assert places == [(0, 0), (0, 3), (1, 0), (1, 4)]
  with pytest.raises(ValueError, match="a piece of 7 tokens does not fit rows of width=6"):
    loglik.pack_pieces([[1] * 7], width=6)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_a_packed_stream_scores_each_document_as_alone(x64):
  with jax.enable_x64(x64):
    model = DocBag(dtype=jnp.float64 if x64 else jnp.float32)
    docs = _docs(LENGTHS)
    ids = [BYTES.encode(d) + [BYTES.eos_id] for d in docs]
    scorer = loglik.DocumentScorer(model, SEQ_LEN, batch_size=2)
    packed = scorer.score(ids)
    tokens, _, _ = loglik.pack_pieces(
        [p for i in ids for p in loglik.document_pieces(i, SEQ_LEN)], SEQ_LEN + 1)
    assert len(tokens) < sum(len(loglik.document_pieces(i, SEQ_LEN)) for i in ids)  # shared rows
    rtol = 1e-12 if x64 else 2e-5
    for doc_ids, (logp, n) in zip(ids, packed):
      ref_logp, ref_n = _alone(model, doc_ids, SEQ_LEN)
      assert n == ref_n == len(doc_ids) - 1
      np.testing.assert_allclose(logp, ref_logp, rtol=rtol, atol=1e-12)
    one_per_row = loglik.DocumentScorer(model, SEQ_LEN, batch_size=3, packed=False).score(ids)
    np.testing.assert_allclose([s for s, _ in one_per_row], [s for s, _ in packed], rtol=rtol)
    # The aggregate is token-weighted: exp(total nll / total targets).
    result = eval_run.perplexity_of_documents(model, BYTES, docs, SEQ_LEN, batch_size=4)
    nll, n = -sum(s for s, _ in packed), sum(k for _, k in packed)
    assert result["tokens"] == n == sum(LENGTHS) and result["documents"] == len(docs)
    np.testing.assert_allclose(result["ppl"], math.exp(nll / n), rtol=rtol)
    np.testing.assert_allclose(result["bits_per_byte"], nll / sum(LENGTHS) / math.log(2),
                               rtol=rtol)


def test_a_model_that_ignores_segment_ids_fails_the_check():
  model = Leaky()
  ids = [BYTES.encode(d) + [BYTES.eos_id] for d in _docs(LENGTHS)]
  packed = loglik.DocumentScorer(model, SEQ_LEN, batch_size=2).score(ids)
  alone = [_alone(model, i, SEQ_LEN)[0] for i in ids]
  assert not np.allclose([s for s, _ in packed], alone, rtol=1e-3)


def test_documents_with_nothing_to_score_are_refused():
  with pytest.raises(ValueError, match="none of the 2 documents has a token to score"):
    eval_run.perplexity_of_documents(DocBag(), BYTES, ["", ""], SEQ_LEN)


class _Trained:
  def __init__(self, model, seq_len):
    self.model, self.tokenizer, self.step = model, BYTES, 1
    cfg = configs.load("transformer:tiny", [f"train.seq_len={seq_len}"])
    self.run = configs.validate(cfg)


def test_nlx_eval_scores_a_jsonl_file_document_by_document(monkeypatch, tmp_path, capsys):
  from nlx.train import trained  # pylint: disable=g-import-not-at-top
  model = DocBag()
  monkeypatch.setattr(trained, "load", lambda workdir, checkpoint_dir=None: _Trained(model,
                                                                                      SEQ_LEN))
  docs = _docs(LENGTHS)
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  parser = argparse.ArgumentParser()
  eval_run.configure_parser(parser)
  args = parser.parse_args(["--workdir", "w", "--task", "ppl", "--path", str(path)])
  assert eval_run.run_parsed(args) == 0
  printed = json.loads(capsys.readouterr().out)
  expected = eval_run.perplexity_of_documents(model, BYTES, docs, SEQ_LEN)
  assert printed == pytest.approx(expected)
  args = parser.parse_args(["--workdir", "w", "--task", "ppl", "--path", str(path), "--state",
                            str(tmp_path / "s.npz")])
  with pytest.raises(ValueError, match="--state reads one text as a session"):
    eval_run.run_parsed(args)


def test_real_lm_scores_a_packed_stream_as_each_document_alone():
  model = LM(configs.validate(configs.load("transformer:tiny")).model, rngs=nnx.Rngs(0))
  ids = [BYTES.encode(d) + [BYTES.eos_id] for d in _docs([4, 14, 0, 6, 2])]
  packed = loglik.DocumentScorer(model, SEQ_LEN, batch_size=4).score(ids)
  alone = loglik.DocumentScorer(model, SEQ_LEN, batch_size=4, packed=False).score(ids)
  np.testing.assert_allclose([s for s, _ in packed], [s for s, _ in alone], rtol=1e-4)
  assert [n for _, n in packed] == [4, 14, 0, 6, 2]
