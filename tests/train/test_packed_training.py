"""Packed documents in training: with segment ids the loss (and its gradients) equals the loss of
each document piece read alone, leaving out only the targets that start a document; without
them the step is today's mean over every target. The whole loop runs on a jsonl corpus.

A stand-in model that reads documents apart (``DocBag``: a causal mean of the embeddings of its
document's tokens, ``nlx.nn.segments`` deciding the documents) checks the step on its own; the
real LM is checked too once ``LM.__call__`` takes ``segment_ids``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nlx import configs
from nlx.data import pipeline, tokenizers
from nlx.nn import segments
from nlx.nn.model import LM
from nlx.train import loop
from nlx.train import metrics as metrics_lib
from nlx.train import sharding
from nlx.train import step as step_lib

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


class TokensOnly(nnx.Module):
  """A model that takes no segment ids (today's call): ``logits[t] = table[x_t]``."""

  def __init__(self):
    self.table = nnx.Param(jax.random.normal(jax.random.PRNGKey(1), (256, 256)))

  def __call__(self, tokens):
    return self.table[...][tokens]


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)) for n in lengths]


def _batch(lengths=(5, 17, 0, 9, 3, 30, 2, 11, 7, 4), seq_len=12):
  return pipeline.pack_segments(_docs(lengths), BYTES, seq_len)


def _alone_loss(model, tokens, segment_ids):
  """Each document piece of each row alone in a row of its own (no segment ids; right padding,
  which a causal model does not read), its own targets only; the mean over all of them."""
  pieces = [row[ids == doc] for row, ids in zip(tokens, segment_ids) for doc in np.unique(ids)]
  pieces = [p for p in pieces if len(p) >= 2]
  rows = np.zeros((len(pieces), max(len(p) for p in pieces)), np.int32)
  for r, piece in enumerate(pieces):
    rows[r, :len(piece)] = piece
  lengths = np.asarray([len(p) for p in pieces])
  keep = np.arange(rows.shape[1] - 1)[None, :] < lengths[:, None] - 1
  logits = model(jnp.asarray(rows[:, :-1]))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(rows[:, 1:]))
  return jnp.where(keep, ce, 0.0).sum() / keep.sum()


def _alone(model, tokens, segment_ids):
  """``_alone_loss`` compiled (eager nnx calls are slow)."""
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p: _alone_loss(nnx.merge(graphdef, p), tokens, segment_ids))(params)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_packed_loss_and_gradients_equal_each_document_alone(x64):
  batch = _batch()
  assert batch["segment_ids"].max() >= 2  # rows hold several documents
  with jax.enable_x64(x64):
    model = DocBag(dtype=jnp.float64 if x64 else jnp.float32)
    graphdef, params = nnx.split(model)
    tokens, ids = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
    packed = jax.jit(jax.value_and_grad(
        lambda p: step_lib.loss_fn(graphdef, p, tokens, segment_ids=ids)))
    alone = jax.jit(jax.value_and_grad(
        lambda p: _alone_loss(nnx.merge(graphdef, p), batch["tokens"], batch["segment_ids"])))
    rtol = 1e-12 if x64 else 2e-5
    (loss, grads), (ref_loss, ref_grads) = packed(params), alone(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-12 if x64 else 1e-6)
    # Without segment ids the documents condition on each other: another loss.
    unpacked = step_lib.loss_fn(graphdef, params, tokens)
    assert abs(float(unpacked) - float(loss)) > 1e-3


def test_only_the_targets_that_start_a_document_are_left_out():
  batch = _batch()
  keep = np.asarray(step_lib.target_mask(jnp.asarray(batch["segment_ids"])))
  starts = batch["tokens"][:, :-1] == BYTES.eos_id  # the input is an EOS: the target starts one
  np.testing.assert_array_equal(keep, ~starts)
  graphdef, params = nnx.split(DocBag())
  tokens, ids = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
  losses = step_lib.token_losses(graphdef, params, tokens, segment_ids=ids)
  mean, n = step_lib.masked_mean(losses, ids)
  assert int(n) == keep.sum() == keep.size - starts.sum()
  np.testing.assert_allclose(mean, np.asarray(losses)[keep].mean(), rtol=1e-6)


def test_without_segment_ids_the_loss_is_the_mean_of_every_target():
  batch = _batch()
  graphdef, params = nnx.split(TokensOnly())  # a model that takes no segment ids at all
  tokens = jnp.asarray(batch["tokens"])
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  assert float(step_lib.loss_fn(graphdef, params, tokens)) == float(expected)


def test_one_document_per_row_packs_to_the_unpacked_loss():
  batch = pipeline.pack_segments(_docs([400]), BYTES, 16)  # the embedded corpus' case
  assert not batch["segment_ids"].any()
  graphdef, params = nnx.split(DocBag())
  tokens = jnp.asarray(batch["tokens"])
  np.testing.assert_allclose(
      step_lib.loss_fn(graphdef, params, tokens, segment_ids=jnp.asarray(batch["segment_ids"])),
      step_lib.loss_fn(graphdef, params, tokens), rtol=1e-6)


def _trainer(monkeypatch, *overrides):
  monkeypatch.setattr(step_lib, "build_model", lambda cfg, rngs: DocBag())
  run = configs.validate(configs.load("transformer:tiny", ["optimizer.warmup_steps=0",
                                                           *overrides]), n_devices=1)
  mesh = sharding.make_mesh(run.mesh)
  trainer = step_lib.build(run, mesh)
  return run, trainer, step_lib.init_state(trainer, run.model, 0)


def test_train_step_with_pack_documents_on_and_off(monkeypatch):
  batch = _batch()
  run, trainer, state = _trainer(monkeypatch, "train.pack_documents=True")
  assert trainer.pack_documents and run.pack_documents
  abstract = step_lib.abstract_batch(trainer, *batch["tokens"].shape)
  assert set(abstract) == {"tokens", "segment_ids"}
  step = jax.jit(step_lib.train_step_fn(trainer))
  model = nnx.merge(trainer.graphdef, state["params"])
  expected = _alone(model, batch["tokens"], batch["segment_ids"])
  new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(metrics["loss"], expected, rtol=2e-5)
  starts = (batch["tokens"][:, :-1] == 0).mean()
  np.testing.assert_allclose(metrics["scored_fraction"], 1 - starts, rtol=1e-6)
  assert int(new["step"]) == 1
  # Off: tokens alone, today's step (no segment ids reach the model, every target counts).
  _, off, state = _trainer(monkeypatch, "train.pack_documents=False")
  assert not off.pack_documents
  assert step_lib.abstract_batch(off, 4, 8).shape == (4, 9)
  _, metrics = jax.jit(step_lib.train_step_fn(off))(state, jnp.asarray(batch["tokens"]))
  graphdef, params = off.graphdef, state["params"]
  np.testing.assert_allclose(metrics["loss"],
                             step_lib.loss_fn(graphdef, params, jnp.asarray(batch["tokens"])),
                             rtol=1e-6)
  assert "scored_fraction" not in metrics
  assert abs(float(metrics["loss"]) - float(expected)) > 1e-3


def test_eval_loss_is_token_weighted_over_batches(monkeypatch):
  run, trainer, state = _trainer(monkeypatch, "train.pack_documents=True")
  batches = pipeline.eval_batches(_batch(), batch_size=2, n_batches=3)
  eval_step = step_lib.jit_eval_step(trainer)
  loss = loop.evaluate(eval_step, state["params"], batches, trainer.batch_sharding)
  model = nnx.merge(trainer.graphdef, state["params"])
  tokens = np.concatenate([b["tokens"] for b in batches])
  ids = np.concatenate([b["segment_ids"] for b in batches])
  np.testing.assert_allclose(loss, _alone(model, tokens, ids), rtol=2e-5)


def test_the_loop_trains_on_a_jsonl_corpus_with_segment_ids(monkeypatch, tmp_path):
  monkeypatch.setattr(step_lib, "build_model", lambda cfg, rngs: DocBag())
  corpus = tmp_path / "docs.jsonl"
  corpus.write_text("".join(json.dumps({"text": d}) + "\n"
                            for d in _docs([int(n) for n in np.arange(40) % 23 + 3])))
  cfg = configs.load("transformer:tiny", [
      "data.source=jsonl", f"data.path={corpus}", "train.steps=3", "train.batch_size=2",
      "train.seq_len=16", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
      "train.plots=False"])
  seen = []
  real_step = step_lib.train_step_fn
  monkeypatch.setattr(step_lib, "train_step_fn",
                      lambda t: (seen.append(t.pack_documents), real_step(t))[1])
  record = loop.train(cfg, str(tmp_path / "run"), progress=False, async_checkpoints=False)
  assert seen == [True]  # jsonl data: pack_documents=None packs
  records = metrics_lib.read_records(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(0.5 < r["scored_fraction"] < 1.0 for r in records)
  assert np.isfinite(record["eval_loss"]) and record["step"] == 3


@pytest.mark.parametrize("family", ["transformer", "hope"])
def test_real_lm_packed_loss_equals_each_document_alone(family):
  cfg = configs.load(f"{family}:tiny", ["model.n_layers=2"])
  model = LM(configs.validate(cfg).model, rngs=nnx.Rngs(0))
  batch = _batch(seq_len=24)
  graphdef, params = nnx.split(model)
  packed = jax.jit(lambda p: step_lib.loss_fn(graphdef, p, jnp.asarray(batch["tokens"]),
                                              segment_ids=jnp.asarray(batch["segment_ids"])))
  loss = packed(params)
  np.testing.assert_allclose(loss,
                             _alone(model, batch["tokens"], batch["segment_ids"]), rtol=1e-4)

