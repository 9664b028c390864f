"""The data pipeline: packing, order as a pure function of (seed, index), per-host sharding,
iterator state, sources (embedded, text directory, jsonl) and tokenizers (byte, SentencePiece)."""

import json

import numpy as np
import pytest

from nlx.data import pipeline, sources, tokenizers
from nlx.train import config as run_config


def test_pack_puts_every_token_in_one_window_and_ends_documents_with_eos():
  tok = tokenizers.ByteTokenizer()
  windows = pipeline.pack(["abc", "de"], tok, seq_len=2)
  stream = [97, 98, 99, 0, 100, 101, 0]
  assert windows.tolist() == [stream[0:3], stream[2:5], stream[4:7]]
  with pytest.raises(ValueError, match="train.seq_len=8: the text has only 4 tokens"):
    pipeline.pack(["abc"], tok, seq_len=8)


def test_order_is_a_pure_function_of_seed_and_index_and_hosts_split_each_batch():
  windows = np.arange(50 * 5).reshape(50, 5)
  one = pipeline.host_batches(windows, batch_size=4, steps=30, seed=7)
  again = pipeline.host_batches(windows, batch_size=4, steps=30, seed=7)
  hosts = [pipeline.host_batches(windows, batch_size=4, steps=30, seed=7, process_index=p,
                                 process_count=2) for p in range(2)]
  for s in (0, 13, 29):  # 29 is in the third epoch
    np.testing.assert_array_equal(one[s], again[s])
    np.testing.assert_array_equal(np.concatenate([h[s] for h in hosts]), one[s])
  epoch = np.concatenate([one[s] for s in range(13)])[:50, 0] // 5
  assert sorted(epoch.tolist()) == list(range(50))  # one epoch sees every window once
  other = pipeline.host_batches(windows, batch_size=4, steps=30, seed=8)
  assert not np.array_equal(one[0], other[0])


def test_iterator_state_restores_the_stream():
  windows = np.arange(40 * 3).reshape(40, 3)
  it = pipeline.train_iterator(windows, batch_size=2, steps=20, seed=0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iterator(windows, batch_size=2, steps=20, seed=0)
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed), batch)


def test_embedded_corpus_needs_no_files_and_holds_out_its_tail():
  train, val = sources.load_documents(run_config.DataConfig())
  assert len(train[0]) > 300_000 and 30_000 < len(val[0]) < 50_000
  assert train[0].startswith("First Citizen")


def test_text_directory_and_jsonl_sources(tmp_path):
  (tmp_path / "x.train.txt").write_text("train text\n")
  (tmp_path / "x.valid.txt").write_text("valid text\n")
  data = run_config.DataConfig(source="text", path=str(tmp_path))
  assert sources.load_documents(data) == (["train text\n"], ["valid text\n"])
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(10)))
  data = run_config.DataConfig(source="jsonl", path=str(path), text_field="body")
  train, val = sources.load_documents(data)
  assert train == [f"doc {i}" for i in range(9)] and val == ["doc 9"]
  with pytest.raises(ValueError, match=r"data.text_field='text' is not in record 1"):
    sources.load_documents(run_config.DataConfig(source="jsonl", path=str(path)))


def test_sentencepiece_trains_on_the_corpus_and_round_trips(tmp_path):
  train, _ = sources.load_documents(run_config.DataConfig())
  tok = tokenizers.build_tokenizer("sentencepiece", None, [train[0][:100_000]], 400,
                                   str(tmp_path))
  assert tok.vocab_size == 400 and tok.eos_id == 3
  text = "ROMEO: But soft, what light through yonder window breaks?"
  assert tok.decode(tok.encode(text)) == text
  loaded = tokenizers.build_tokenizer("sentencepiece", str(tmp_path / "spm.model"))
  assert loaded.encode(text) == tok.encode(text)
