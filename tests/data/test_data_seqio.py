"""The seqio adapter: a seqio task over a local text file feeds nlx's data pipeline; a task
module named by ``data.seqio_module`` is imported first, and the token cache streams the task."""

import dataclasses
import inspect

import numpy as np
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


MODULE = '''
from nlx.data import seqio_adapter
seqio_adapter.text_file_task("nlx_test_module_task", {train!r}, {valid!r})
'''


def test_seqio_module_registers_the_task_and_the_cache_streams_it(tmp_path, monkeypatch):
  from nlx.data import seqio_adapter, token_cache  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("NLX_CACHE", str(tmp_path / "cache"))
  train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
  train.write_text("".join(f"example {i} of the task\n" for i in range(20)))
  valid.write_text("held out\nand more\n")
  (tmp_path / "nlx_test_tasks.py").write_text(MODULE.format(train=str(train), valid=str(valid)))
  monkeypatch.syspath_prepend(str(tmp_path))
  data = run_config.DataConfig(source="seqio", seqio_task="nlx_test_module_task",
                               seqio_module=("nlx_test_tasks",))
  documents = seqio_adapter.iter_documents  # a generator over the examples, not a list
  _, windows, val = pipeline.load_splits(data, seq_len=6, segment_ids=True)
  assert isinstance(windows, token_cache.TokenWindows)
  assert inspect.isgenerator(documents("nlx_test_module_task", "train"))
  train_docs, val_docs = sources.load_documents(data)
  assert train_docs[3] == "example 3 of the task" and val_docs == ["held out", "and more"]
  memory = pipeline.pack_segments(train_docs, tokenizers.ByteTokenizer(), 6)
  for key in ("tokens", "segment_ids"):
    np.testing.assert_array_equal(windows[key], memory[key])
  with pytest.raises(ValueError, match=r"data.seqio_module: cannot import 'no_such_tasks' "
                                       r"\(ModuleNotFoundError"):
    pipeline.load_splits(dataclasses.replace(data, seqio_module=("no_such_tasks",),
                                             seqio_task="another"), seq_len=6)


def test_seqio_module_flag_sets_the_field(tmp_path, capsys):
  """``nlx train --seqio_module M`` is ``--config.data.seqio_module=('M',)``: the module is
  imported (here it does not exist: one error line naming it, exit 2)."""
  from nlx import cli  # pylint: disable=g-import-not-at-top
  code = cli.main(["train", "--config", "configs/transformer.py:tiny", "--workdir",
                   str(tmp_path / "run"), "--seqio_module", "nlx_no_such_tasks",
                   "--config.data.source=seqio", "--config.data.seqio_task=nlx_some_task",
                   "--config.train.steps=1", "--no_progress"])
  assert code == 2
  assert "data.seqio_module: cannot import 'nlx_no_such_tasks'" in capsys.readouterr().err
