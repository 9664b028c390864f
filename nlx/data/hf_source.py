"""Hugging Face ``datasets`` source (extra ``nlx[hf]``): ``data.source='hf'``.

``datasets.load_dataset(data.hf_dataset, data.hf_config, split=..., streaming=data.hf_streaming)``
with, for the builders of local files (``json``, ``parquet``, ``csv``, ``text``), ``data.path`` as
the ``data_files`` (a file or a glob; a directory is ``data_dir``, whose file names give the
splits). A row's document is ``str(row[data.text_field])`` (the ``text`` builder's column is
``text``).

The splits are ``data.hf_train_split`` and ``data.hf_validation_split``; with no validation split
(None, or a split the dataset does not have: said on stderr) the last ``data.val_fraction`` of the
training rows are the validation documents, as for a jsonl file. Rows are read in batches of
``BATCH`` (``Dataset.iter``), never the whole split as a list; a streaming dataset is iterated
once. ``HFDocuments`` is the source of the token cache (``nlx.data.streams``), ``load_documents``
the lists of the in-memory path (``data.token_cache=False``).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Iterator, Optional

from nlx.data import sources, streams
from nlx.errors import DataError

BUILDERS = ("json", "parquet", "csv", "text")
BATCH = 1024


def _datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"data.source='hf' needs the hf extra: pip install 'nlx[hf]' ({e})") from None
  return datasets


def _name(data) -> str:
  return data.hf_dataset + (f" ({data.hf_config})" if data.hf_config else "")


def _files_kwargs(data) -> dict:
  if data.hf_dataset in BUILDERS and not data.path:
    raise DataError(f"data.hf_dataset={data.hf_dataset!r} reads local files: set data.path to a "
                    "file, a glob or a directory")
  if not data.path:
    return {}
  if os.path.isdir(data.path):
    return {"data_dir": data.path}
  return {"data_files": data.path}


def load_split(data, split: str):
  """``datasets.load_dataset`` of ``split`` (a ``Dataset``, or an ``IterableDataset`` when
  streaming); None when the dataset has no such split.

  Raises:
    DataError: the dataset or its files cannot be found or read.
  """
  datasets = _datasets()
  try:
    return datasets.load_dataset(data.hf_dataset, data.hf_config, split=split,
                                 streaming=data.hf_streaming, **_files_kwargs(data))
  except ValueError as e:
    if "split" in str(e).lower() and split in str(e):
      return None
    raise DataError(f"data.hf_dataset={_name(data)}: {e}") from None
  except (OSError, ImportError) as e:  # not found, offline, unreadable files
    raise DataError(f"data.hf_dataset={_name(data)} cannot be loaded (data.path={data.path!r}): "
                    f"{type(e).__name__}: {e}") from None


def records(ds, data, split: str) -> Iterator[str]:
  """The documents of a loaded split: ``str(row[text_field])``, read in batches."""
  field = data.text_field

  def missing(columns) -> DataError:
    return DataError(f"data.text_field={field!r} is not a column of the {split!r} split of "
                     f"{_name(data)}; its columns: {sorted(columns)}")

  if ds.column_names is None:  # a stream whose features are unknown: checked on its first row
    for i, row in enumerate(ds):
      if i == 0 and field not in row:
        raise missing(row)
      yield str(row[field])
    return
  if field not in ds.column_names:
    raise missing(ds.column_names)
  for batch in ds.select_columns([field]).iter(batch_size=BATCH):
    for text in batch[field]:
      yield str(text)


def _validation(data):
  """The validation split, or None (hold out the tail of the training split)."""
  if data.hf_validation_split is None:
    return None
  ds = load_split(data, data.hf_validation_split)
  if ds is None:
    print(f"data.hf_validation_split={data.hf_validation_split!r} is not a split of "
          f"{_name(data)}: the last data.val_fraction={data.val_fraction} of "
          f"{data.hf_train_split!r} is the validation split", file=sys.stderr)
  return ds


def _train(data):
  ds = load_split(data, data.hf_train_split)
  if ds is None:
    raise DataError(f"data.hf_train_split={data.hf_train_split!r} is not a split of "
                    f"{_name(data)}")
  return ds


def load_documents(data) -> tuple[list[str], list[str]]:
  """``(train documents, validation documents)`` as lists (the in-memory path)."""
  val = _validation(data)
  train = list(records(_train(data), data, data.hf_train_split))
  if val is not None:
    return train, list(records(val, data, data.hf_validation_split))
  if not train:
    raise DataError(f"the {data.hf_train_split!r} split of {_name(data)} holds no rows")
  return sources.split_tail(train, data.val_fraction)


def _local_files(path: Optional[str]) -> list:
  if not path or "://" in path:
    return []
  if os.path.isdir(path):
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
  else:
    files = glob.glob(path)
  return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns]
          for f in sorted(files) if os.path.isfile(f)]


class HFDocuments(streams.Documents):
  """A ``datasets`` dataset's training then validation rows, one document each."""

  def __init__(self, data):
    self.data = data

  def fingerprint(self) -> dict:
    d = self.data
    return {"source": "hf", "dataset": d.hf_dataset, "config": d.hf_config, "path": d.path,
            "files": _local_files(d.path), "train_split": d.hf_train_split,
            "validation_split": d.hf_validation_split, "text_field": d.text_field,
            "val_fraction": d.val_fraction}

  def pieces(self) -> Iterator[streams.Piece]:
    d = self.data
    val = _validation(d)
    train = records(_train(d), d, d.hf_train_split)
    if val is None:
      yield from streams.tail_split(self, train, d.val_fraction)
      return
    n = 0
    for text in train:
      yield text, True
      n += 1
    self.n_train = n
    for text in records(val, d, d.hf_validation_split):
      yield text, True
