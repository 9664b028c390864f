"""Hugging Face data: the ``datasets`` source (``data.source='hf'``) on local json and parquet
files, streamed and not, with and without a validation split, through the token cache and in
memory; and ``tokenizer='hf'`` with a ``tokenizer.json`` trained here by the ``tokenizers``
library. No network: the Hub is offline and the ``datasets`` cache is in a temporary directory."""

import dataclasses
import json

import numpy as np
import pytest

from nlx.data import hf_source, pipeline, streams, token_cache, tokenizers
from nlx.errors import DataError
from nlx.train import config as run_config

datasets = pytest.importorskip("datasets", reason="the hf extra is not installed")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
  """No network, and every cache (nlx's, the datasets library's) in this test's directory."""
  monkeypatch.setenv("NLX_CACHE", str(tmp_path / "nlx_cache"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _docs(n: int, offset: int = 0) -> list:
  return [f"row {i + offset}: " + "caf\u00e9 " * (i % 5) + "end." for i in range(n)]


def _write(tmp_path, kind: str, name: str, docs: list):
  path = tmp_path / f"{name}.{kind}"
  if kind == "jsonl":
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
  else:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), str(path))
  return path


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_local_files_stream_into_the_cache_as_in_memory(tmp_path, kind, streaming, capsys):
  path = _write(tmp_path, kind, "train", _docs(30))
  data = run_config.DataConfig(source="hf", hf_dataset="json" if kind == "jsonl" else kind,
                               path=str(path), hf_streaming=streaming, val_fraction=0.2)
  train_docs, val_docs = hf_source.load_documents(data)  # no 'validation' split: the tail
  assert train_docs == _docs(24) and val_docs == _docs(30)[24:]
  assert "data.hf_validation_split='validation' is not a split" in capsys.readouterr().err
  _, train, val = pipeline.load_splits(data, 8, segment_ids=True)
  assert isinstance(train, token_cache.TokenWindows)
  _, mem_train, mem_val = pipeline.load_splits(dataclasses.replace(data, token_cache=False), 8,
                                               segment_ids=True)
  for key in ("tokens", "segment_ids"):
    np.testing.assert_array_equal(train[key], mem_train[key])
    np.testing.assert_array_equal(val[key], mem_val[key])
  assert train["segment_ids"].max() >= 1  # a row per document boundary
  assert bytes(train["tokens"][0, :8].tolist()) == b"row 0: e"


def test_a_validation_split_a_text_field_and_its_errors(tmp_path):
  directory = tmp_path / "splits"
  directory.mkdir()
  _write(directory, "jsonl", "train", _docs(12))
  _write(directory, "jsonl", "validation", _docs(5, offset=100))
  data = run_config.DataConfig(source="hf", hf_dataset="json", path=str(directory),
                               hf_streaming=True)
  documents = streams.documents(data)
  pieces = list(documents.pieces())
  assert [t for t, _ in pieces] == _docs(12) + _docs(5, offset=100) and documents.n_train == 12
  _, train, val = pipeline.load_splits(data, 4)
  assert bytes(np.asarray(val)[0].tolist()) == b"row 1"
  with pytest.raises(DataError, match=r"data.text_field='body' is not a column .*\['n', 'text'\]"):
    pipeline.load_splits(dataclasses.replace(data, text_field="body"), 4)
  with pytest.raises(DataError, match="data.hf_train_split='nope' is not a split"):
    pipeline.load_splits(dataclasses.replace(data, hf_train_split="nope"), 4)
  with pytest.raises(DataError, match="data.hf_dataset='json' reads local files: set data.path"):
    pipeline.load_splits(dataclasses.replace(data, path=None), 4)
  with pytest.raises(DataError, match="data.hf_dataset=no_such/dataset cannot be loaded"):
    pipeline.load_splits(dataclasses.replace(data, hf_dataset="no_such/dataset", path=None), 4)
  assert len(train) > 10


def _bpe(tmp_path, post_processor: bool):
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token=None))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_docs(200) * 3, trainer)
  if post_processor:  # Llama-style: BOS first
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  path = tmp_path / "tok" / "tokenizer.json"
  path.parent.mkdir(exist_ok=True)
  tok.save(str(path))
  return path


@pytest.mark.parametrize("post_processor", [False, True])
def test_a_tokenizers_tokenizer_json_packs_like_in_memory(tmp_path, post_processor):
  path = _bpe(tmp_path, post_processor)
  tok = tokenizers.build_tokenizer("hf", tokenizer_file=str(path))
  assert tok.eos_id == tok._tok.token_to_id("</s>") and tok.vocab_size == 300
  text = "row 7: caf\u00e9 end."
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
  assert (tok.encode(text)[0] == tok._tok.token_to_id("<s>")) == post_processor
  jsonl = _write(tmp_path, "jsonl", "docs", _docs(40))
  data = run_config.DataConfig(source="jsonl", path=str(jsonl), tokenizer="hf",
                               tokenizer_file=str(path))
  got, train, val = pipeline.load_splits(data, 6, segment_ids=True)
  _, mem_train, mem_val = pipeline.load_splits(dataclasses.replace(data, token_cache=False), 6,
                                               segment_ids=True)
  for key in ("tokens", "segment_ids"):
    np.testing.assert_array_equal(train[key], mem_train[key])
    np.testing.assert_array_equal(val[key], mem_val[key])
  assert got.fingerprint()["kind"] == "hf"
  manifest = token_cache.read_manifest(train.directory)
  assert manifest["tokenizer"] == got.fingerprint() and manifest["eos_id"] == tok.eos_id
  (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
  other = tokenizers.build_tokenizer("hf", tokenizer_file=str(path))
  assert other.eos_id == tok._tok.token_to_id("<s>")  # its config names another eos: a new key
  assert other.fingerprint() != tok.fingerprint()
  (path.parent / "bad.json").write_text("{}")
  with pytest.raises(DataError, match="is not a tokenizers tokenizer.json"):
    tokenizers.build_tokenizer("hf", tokenizer_file=str(path.parent / "bad.json"))
