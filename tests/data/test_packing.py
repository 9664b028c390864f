"""Segment ids of packed windows (``pipeline.pack_segments``) against a token-by-token reference,
for jsonl, text, seqio and the embedded corpus; batches of them (order, hosts, iterator state);
``train.pack_documents``: its check, its default (None: jsonl/seqio) and the presets' value."""

import json

import numpy as np
import pytest

from nlx import configs
from nlx.data import pipeline, sources, tokenizers
from nlx.train import config as run_config

BYTES = tokenizers.ByteTokenizer()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  """``load_splits`` reads through the token cache: one of this test's own."""
  monkeypatch.setenv("NLX_CACHE", str(tmp_path / "nlx_cache"))


def _reference(documents, tokenizer, seq_len):
  """Windows and ids built token by token: (token, document) pairs, cut every seq_len."""
  pairs = [(t, d) for d, text in enumerate(documents)
           for t in tokenizer.encode(text) + [tokenizer.eos_id]]
  n = (len(pairs) - 1) // seq_len
  tokens, ids = [], []
  for w in range(n):
    window = pairs[w * seq_len:w * seq_len + seq_len + 1]
    tokens.append([t for t, _ in window])
    ids.append([d - window[0][1] for _, d in window])
  return np.asarray(tokens), np.asarray(ids)


def _doc(n: int, seed: int) -> str:
  """A document of exactly n bytes (lowercase letters)."""
  rng = np.random.default_rng(seed)
  return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n))


# Lengths chosen against seq_len = 8 (windows of 9 tokens starting every 8): a document that
# ends exactly at a window edge (7 + EOS = 8), one longer than two windows (20), a one-token one
# (0 + EOS), and ones whose EOS falls on a window's first or last token.
LENGTHS = [7, 20, 0, 3, 11, 1, 6, 15, 2, 8]


@pytest.mark.parametrize("seq_len", [8, 5, 13])
def test_segment_ids_of_a_jsonl_corpus_match_the_token_by_token_reference(tmp_path, seq_len):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": _doc(n, i)}) + "\n"
                          for i, n in enumerate(LENGTHS)))
  data = run_config.DataConfig(source="jsonl", path=str(path), val_fraction=0.1)
  train_docs, _ = sources.load_documents(data)
  assert [len(d) for d in train_docs] == LENGTHS[:-1]
  packed = pipeline.pack_segments(train_docs, BYTES, seq_len)
  tokens, ids = _reference(train_docs, BYTES, seq_len)
  np.testing.assert_array_equal(packed["tokens"], tokens)
  np.testing.assert_array_equal(packed["segment_ids"], ids)
  np.testing.assert_array_equal(packed["tokens"], pipeline.pack(train_docs, BYTES, seq_len))
  assert packed["segment_ids"].dtype == np.int32 and packed["tokens"].dtype == np.int32
  # A new document starts exactly after an end-of-document id (the byte tokenizer's 0).
  starts = packed["segment_ids"][:, 1:] != packed["segment_ids"][:, :-1]
  np.testing.assert_array_equal(starts, packed["tokens"][:, :-1] == BYTES.eos_id)
  assert (packed["segment_ids"][:, 0] == 0).all()  # counted within the row


def test_known_layout_by_hand():
  # "ab" EOS, "" EOS, "cde" EOS: the stream a b 0 0 c d e 0 of documents 0 0 0 1 2 2 2 2;
  # windows of 4 tokens at 0 and 3 (the last token, alone, is no window).
  packed = pipeline.pack_segments(["ab", "", "cde"], BYTES, seq_len=3)
  assert packed["tokens"].tolist() == [[97, 98, 0, 0], [0, 99, 100, 101]]
  assert packed["segment_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]


class _EosInsideTokenizer:
  """Encodes every text as [5, eos, 6]: an end-of-document id inside the document."""

  eos_id = 1
  vocab_size = 8

  def encode(self, text):
    return [5, self.eos_id, 6] if text else []


def test_ids_follow_the_documents_not_eos_tokens_inside_them():
  packed = pipeline.pack_segments(["x", "y"], _EosInsideTokenizer(), seq_len=7)
  assert packed["tokens"].tolist() == [[5, 1, 6, 1, 5, 1, 6, 1]]
  assert packed["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_a_text_directory_is_one_document_per_file(tmp_path):
  for i, n in enumerate([5, 9, 4]):
    (tmp_path / f"part{i}.train.txt").write_text(_doc(n, i))
  (tmp_path / "x.valid.txt").write_text(_doc(12, 7))
  data = run_config.DataConfig(source="text", path=str(tmp_path))
  _, train, val = pipeline.load_splits(data, seq_len=4, segment_ids=True)
  docs = sources.load_documents(data)[0]
  np.testing.assert_array_equal(train["segment_ids"], _reference(docs, BYTES, 4)[1])
  assert train["segment_ids"].max() >= 1
  assert (val["segment_ids"] == 0).all()  # one validation file: one document
  _, plain, _ = pipeline.load_splits(data, seq_len=4)
  np.testing.assert_array_equal(plain, train["tokens"])


def test_the_embedded_corpus_is_one_document():
  data = run_config.DataConfig()
  _, train, val = pipeline.load_splits(data, seq_len=256, segment_ids=True)
  assert not train["segment_ids"].any() and not val["segment_ids"].any()
  _, plain, _ = pipeline.load_splits(data, seq_len=256)
  np.testing.assert_array_equal(plain, train["tokens"])


def test_seqio_examples_are_documents(tmp_path):
  pytest.importorskip("seqio", reason="the seqio extra is not installed")
  from nlx.data import seqio_adapter  # pylint: disable=g-import-not-at-top
  train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
  train.write_text("".join(_doc(n, i) + "\n" for i, n in enumerate([3, 6, 2, 9])))
  valid.write_text("held out\n")
  seqio_adapter.text_file_task("nlx_test_packing_lines", str(train), str(valid))
  data = run_config.DataConfig(source="seqio", seqio_task="nlx_test_packing_lines")
  docs = sources.load_documents(data)[0]
  assert [len(d) for d in docs] == [3, 6, 2, 9]
  _, windows, _ = pipeline.load_splits(data, seq_len=5, segment_ids=True)
  np.testing.assert_array_equal(windows["segment_ids"], _reference(docs, BYTES, 5)[1])


def _windows(n=37, width=6):
  tokens = np.arange(n * width, dtype=np.int32).reshape(n, width)
  return {"tokens": tokens, "segment_ids": (tokens // 4 - tokens[:, :1] // 4).astype(np.int32)}


def test_batches_of_segment_ids_follow_the_rows_of_their_tokens():
  windows = _windows()
  plain = pipeline.host_batches(windows["tokens"], batch_size=4, steps=25, seed=3)
  packed = pipeline.host_batches(windows, batch_size=4, steps=25, seed=3)
  hosts = [pipeline.host_batches(windows, batch_size=4, steps=25, seed=3, process_index=p,
                                 process_count=2) for p in range(2)]
  for s in (0, 9, 24):  # 24 is in the third epoch
    assert set(packed[s]) == {"tokens", "segment_ids"}
    np.testing.assert_array_equal(packed[s]["tokens"], plain[s])
    rows = packed[s]["tokens"][:, 0] // 6
    np.testing.assert_array_equal(packed[s]["segment_ids"], windows["segment_ids"][rows])
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(np.concatenate([h[s][key] for h in hosts]), packed[s][key])
  val = pipeline.eval_batches(windows, batch_size=4, n_batches=11)
  np.testing.assert_array_equal(val[10]["segment_ids"],
                                windows["segment_ids"][[40 % 37, 41 % 37, 42 % 37, 43 % 37]])
  np.testing.assert_array_equal(
      np.stack([b["tokens"] for b in val]),
      np.stack(pipeline.eval_batches(windows["tokens"], batch_size=4, n_batches=11)))


def test_iterator_state_restores_a_stream_of_segment_ids():
  windows = _windows()
  it = pipeline.train_iterator(windows, batch_size=2, steps=20, seed=0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iterator(windows, batch_size=2, steps=20, seed=0)
  resumed.set_state(state)
  for batch in expected:
    got = next(resumed)
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(got[key], batch[key])


def test_windows_of_unequal_lengths_are_refused():
  with pytest.raises(ValueError, match="the same number of rows"):
    pipeline.examples({"tokens": np.zeros((3, 4)), "segment_ids": np.zeros((2, 4))}, seed=0)


def _run(spec, *overrides):
  return configs.validate(configs.load(spec, list(overrides)))


def test_pack_documents_default_follows_the_data_and_the_presets(tmp_path):
  assert _run("hope:tiny").train.pack_documents is None
  assert not _run("hope:tiny").pack_documents  # the main job: one document, unchanged
  assert not _run("transformer:tiny", "data.path=x.txt").pack_documents  # a text file
  assert _run("transformer:tiny", "data.source=jsonl", "data.path=x.jsonl").pack_documents
  assert _run("transformer:tiny", "data.source=seqio", "data.seqio_task=t").pack_documents
  assert not _run("transformer:tiny", "data.source=jsonl", "data.path=x.jsonl",
                  "train.pack_documents=False").pack_documents
  assert _run("transformer:tiny", "train.pack_documents=True").pack_documents
  for spec in ("hope:340m", "titans_mac:760m", "titans_lmm:1.3b", "transformer:1.3b",
               "gated_deltanet:340m", "hope:20m"):
    assert _run(spec).train.pack_documents is True, spec
  for spec in ("hope", "titans_mac", "transformer"):  # the gin files: the tiny configs
    gin = configs.load_gin([f"configs/{spec}.gin"])
    assert gin.train.pack_documents is None


@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_pack_documents_must_be_a_bool_or_none(value):
  with pytest.raises(ValueError, match=rf"train.pack_documents={value!r} must be True .*False "
                                       r".*or None"):
    run_config.TrainConfig(pack_documents=value)
