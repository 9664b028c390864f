"""The grain pipeline of language-model training: tokenize, pack, shuffle, batch, shard per host.

Documents are tokenized, each followed by ``eos_id``, and concatenated into one token stream
(document packing: no padding; a sequence may span documents). The stream is cut into windows of
``seq_len + 1`` tokens starting every ``seq_len`` tokens (every token is a target once per epoch).

Segment ids (``train.pack_documents``): ``pack_segments`` returns the windows as a dict
``{"tokens": [N, seq_len + 1], "segment_ids": [N, seq_len + 1]}`` (int32). A document is its
tokens and the ``eos_id`` that ends it; the ids count the documents within each row (0 for the
row's first token, +1 where a new document starts), so a new document starts where the id
changes. The documents are the sources' own (``nlx.data.sources``): a jsonl record, a seqio
example, a text file (the embedded corpus is one document: its ids are all 0). Every function
below takes either form of windows (an array, or that dict) and returns batches of the same form.

Windows are an array (or that dict) in memory, or any sequence of rows: the token cache's
``nlx.data.token_cache.TokenWindows`` reads each row from a memory-mapped store when grain asks
for it, so a host reads only its rows.

The order is a pure function of (seed, global index): example ``g`` of the run is window
``shuffle(seed, epoch)[g mod N]`` (grain's ``MapDataset.shuffle`` reshuffles each epoch), and
global batch ``s`` holds examples ``s·B .. s·B + B - 1``; host ``p`` of ``P`` loads rows
``p·B/P .. (p+1)·B/P - 1`` of it. So neither the host count nor a restart changes what is trained
on. The iterator's state (grain's ``get_state``) is saved with every checkpoint.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import grain
import numpy as np

from nlx.data import sources, tokenizers
from nlx.errors import DataError

Windows = Union[np.ndarray, Mapping[str, np.ndarray]]
KEYS = ("tokens", "segment_ids")


def pack_segments(documents: Sequence[str], tokenizer, seq_len: int,
                  split: str = "training") -> dict[str, np.ndarray]:
  """``{"tokens", "segment_ids"}``: windows ``[N, seq_len + 1]`` (int32) of the packed stream.

  ``tokens`` are ``pack``'s windows; ``segment_ids[n, i]`` is the number of documents that start
  in window ``n`` after its first token and up to token ``i`` (a document starts after the
  ``eos_id`` that ends the one before). The ids come from the documents' lengths, not from the
  ``eos_id`` tokens, so a text that encodes to ``eos_id`` does not split its document.

  Args:
    documents: the texts.
    tokenizer: a tokenizer of ``nlx.data.tokenizers``.
    seq_len: ``train.seq_len``.
    split: the split's name in the error message.

  Raises:
    DataError: when the text is shorter than one window.
  """
  pieces, lengths = [], []
  for doc in documents:
    ids = np.asarray(tokenizer.encode(doc), np.int32)
    pieces += [ids, np.asarray([tokenizer.eos_id], np.int32)]
    lengths.append(len(ids) + 1)
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise DataError(f"train.seq_len={seq_len}: the text has only {len(stream)} tokens ({split} "
                    f"split), fewer than one window of {seq_len + 1}; allowed: seq_len <= "
                    f"{max(len(stream) - 1, 0)}, or more text")
  doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
  index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return {"tokens": stream[index], "segment_ids": doc[index] - doc[index[:, :1]]}


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
  return pack_segments(documents, tokenizer, seq_len, split)["tokens"]


class _Rows:
  """The rows of a dict of ``[N, ...]`` arrays as a sequence of dicts (a grain source)."""

  def __init__(self, windows: Mapping[str, np.ndarray]):
    self.windows = dict(windows)
    sizes = {k: len(v) for k, v in self.windows.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"windows: every array needs the same number of rows; got {sizes}")
    self._len = next(iter(sizes.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    return {k: v[i] for k, v in self.windows.items()}


def _source(windows: Windows):
  return _Rows(windows) if isinstance(windows, Mapping) else windows


def _stack(rows: list):
  """``[B, ...]``: the rows stacked (dict rows: each key stacked)."""
  if rows and isinstance(rows[0], Mapping):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return np.stack(rows)


def _host_rows(batch_size: int, process_index: int, process_count: int) -> range:
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {process_count} "
                     "processes")
  per_host = batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def examples(windows: Windows, seed: int, shuffle: bool = True) -> grain.MapDataset:
  """Example ``g`` of the run (infinite; reshuffled every epoch when ``shuffle``)."""
  ds = grain.MapDataset.source(_source(windows))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None)


def host_batches(windows: Windows, *, batch_size: int, steps: int, seed: int,
                 shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Step ``s`` -> this host's rows ``[B / P, seq_len + 1]`` of global batch ``s``."""
  rows = _host_rows(batch_size, process_index, process_count)
  ds = examples(windows, seed, shuffle)
  return grain.MapDataset.range(steps).map(
      lambda s: _stack([ds[s * batch_size + r] for r in rows]))


def train_iterator(windows: Windows, *, batch_size: int, steps: int, seed: int,
                   shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                   threads: int = 2) -> grain.DatasetIterator:
  """A grain iterator over this host's training batches (``get_state``/``set_state``)."""
  ds = host_batches(windows, batch_size=batch_size, steps=steps, seed=seed, shuffle=shuffle,
                    process_index=process_index, process_count=process_count)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1))
  return iter(ds.to_iter_dataset(options))


def eval_batches(windows: Windows, *, batch_size: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list:
  """The first ``n_batches`` global batches of the validation windows, in order (this host's)."""
  rows = _host_rows(batch_size, process_index, process_count)
  source = _source(windows)
  n = len(source)
  return [_stack([source[(b * batch_size + r) % n] for r in rows]) for b in range(n_batches)]


def load_splits(data, seq_len: int, workdir: Optional[str] = None, segment_ids: bool = False):
  """``(tokenizer, train windows, validation windows)`` of ``config.data``.

  With ``data.token_cache`` (the default) the windows are ``nlx.data.token_cache.TokenWindows``
  over the source's token store (tokenized once, then reused: lazy rows, the same values);
  otherwise the documents are tokenized into memory (``pack``/``pack_segments``).

  Args:
    data: the ``DataConfig``.
    seq_len: ``train.seq_len``.
    workdir: where a SentencePiece model is trained (or found) when ``data.spm_model`` is None
      (a local path or a URL such as ``gs://``).
    segment_ids: windows as ``pack_segments``' dicts (``train.pack_documents``), else arrays.
  """
  if getattr(data, "token_cache", False):
    from nlx.data import token_cache  # pylint: disable=g-import-not-at-top
    return token_cache.load_splits(data, seq_len, workdir, segment_ids)
  train_docs, val_docs = sources.load_documents(data)
  tokenizer = tokenizers.from_config(data, workdir, train_docs)
  windows = pack_segments if segment_ids else pack
  return (tokenizer, windows(train_docs, tokenizer, seq_len),
          windows(val_docs, tokenizer, seq_len, "validation"))
