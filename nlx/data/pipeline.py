"""The grain pipeline of language-model training: tokenize, pack, shuffle, batch, shard per host.

Documents are tokenized, each followed by ``eos_id``, and concatenated into one token stream
(document packing: no padding; a sequence may span documents). The stream is cut into windows of
``seq_len + 1`` tokens starting every ``seq_len`` tokens (every token is a target once per epoch).

The order is a pure function of (seed, global index): example ``g`` of the run is window
``shuffle(seed, epoch)[g mod N]`` (grain's ``MapDataset.shuffle`` reshuffles each epoch), and
global batch ``s`` holds examples ``s·B .. s·B + B - 1``; host ``p`` of ``P`` loads rows
``p·B/P .. (p+1)·B/P - 1`` of it. So neither the host count nor a restart changes what is trained
on. The iterator's state (grain's ``get_state``) is saved with every checkpoint.
"""

from __future__ import annotations

from typing import Optional, Sequence

import grain
import numpy as np

from nlx.data import sources, tokenizers
from nlx.errors import DataError


def pack(documents: Sequence[str], tokenizer, seq_len: int, split: str = "training") -> np.ndarray:
  """Windows ``[N, seq_len + 1]`` (int32) of the packed token stream of ``documents``.

  Args:
    documents: the texts.
    tokenizer: a tokenizer of ``nlx.data.tokenizers``.
    seq_len: ``train.seq_len``.
    split: the split's name in the error message.

  Raises:
    DataError: when the text is shorter than one window.
  """
  pieces = []
  for doc in documents:
    pieces.append(np.asarray(tokenizer.encode(doc), np.int32))
    pieces.append(np.asarray([tokenizer.eos_id], np.int32))
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise DataError(f"train.seq_len={seq_len}: the text has only {len(stream)} tokens ({split} "
                    f"split), fewer than one window of {seq_len + 1}; allowed: seq_len <= "
                    f"{max(len(stream) - 1, 0)}, or more text")
  starts = np.arange(n)[:, None] * seq_len
  return stream[starts + np.arange(seq_len + 1)[None, :]]


def _host_rows(batch_size: int, process_index: int, process_count: int) -> range:
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {process_count} "
                     "processes")
  per_host = batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def examples(windows: np.ndarray, seed: int, shuffle: bool = True) -> grain.MapDataset:
  """Example ``g`` of the run (infinite; reshuffled every epoch when ``shuffle``)."""
  ds = grain.MapDataset.source(windows)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None)


def host_batches(windows: np.ndarray, *, batch_size: int, steps: int, seed: int,
                 shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Step ``s`` -> this host's rows ``[B / P, seq_len + 1]`` of global batch ``s``."""
  rows = _host_rows(batch_size, process_index, process_count)
  ds = examples(windows, seed, shuffle)
  return grain.MapDataset.range(steps).map(
      lambda s: np.stack([ds[s * batch_size + r] for r in rows]))


def train_iterator(windows: np.ndarray, *, batch_size: int, steps: int, seed: int,
                   shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                   threads: int = 2) -> grain.DatasetIterator:
  """A grain iterator over this host's training batches (``get_state``/``set_state``)."""
  ds = host_batches(windows, batch_size=batch_size, steps=steps, seed=seed, shuffle=shuffle,
                    process_index=process_index, process_count=process_count)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1))
  return iter(ds.to_iter_dataset(options))


def eval_batches(windows: np.ndarray, *, batch_size: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The first ``n_batches`` global batches of the validation windows, in order (this host's)."""
  rows = _host_rows(batch_size, process_index, process_count)
  n = len(windows)
  return [np.stack([windows[(b * batch_size + r) % n] for r in rows]) for b in range(n_batches)]


def load_splits(data, seq_len: int, workdir: Optional[str] = None):
  """``(tokenizer, train windows, validation windows)`` of ``config.data``.

  Args:
    data: the ``DataConfig``.
    seq_len: ``train.seq_len``.
    workdir: where a SentencePiece model is trained (or found) when ``data.spm_model`` is None.
  """
  train_docs, val_docs = sources.load_documents(data)
  tokenizer = tokenizers.from_config(data, workdir, train_docs)
  return (tokenizer, pack(train_docs, tokenizer, seq_len),
          pack(val_docs, tokenizer, seq_len, "validation"))
