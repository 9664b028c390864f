"""The seqio adapter: a seqio task over a local text file feeds nlx's data pipeline."""

import pytest

from nlx.data import pipeline, sources, tokenizers
from nlx.train import config as run_config

pytest.importorskip("seqio", reason="the seqio extra is not installed (pip install 'nlx[seqio]')")


def test_seqio_text_file_task_feeds_the_pipeline(tmp_path):
  from nlx.data import seqio_adapter  # pylint: disable=g-import-not-at-top
  train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
  train.write_text("first line\nsecond line\n")
  valid.write_text("held out\n")
  seqio_adapter.text_file_task("nlx_test_lines", str(train), str(valid))
  data = run_config.DataConfig(source="seqio", seqio_task="nlx_test_lines")
  train_docs, val_docs = sources.load_documents(data)
  assert train_docs == ["first line", "second line"] and val_docs == ["held out"]
  windows = pipeline.pack(train_docs, tokenizers.ByteTokenizer(), seq_len=4)
  assert bytes(windows[0, :4].tolist()) == b"firs"
