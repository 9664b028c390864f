"""The token cache: a source is tokenized once into a memory-mapped store that every start reuses.

``load_splits(data, seq_len, workdir, segment_ids)`` (``nlx.data.pipeline.load_splits`` with
``data.token_cache=True``, the default) returns the tokenizer and the training and validation
windows as ``TokenWindows``: lazy sequences over the store, so a host reads only the rows it
trains on and nothing is tokenized again at a restart, on another host, or for another
``seq_len``. The windows, tokens and segment ids alike, are those of the in-memory
``pipeline.pack``/``pack_segments`` (the same documents, in the same order: ``nlx.data.streams``).

The store (one directory, ``CACHE/tokens/<source>-<tokenizer>-<hash>``):

* ``tokens.bin``: the token stream of all documents, training then validation, each ended by
  ``eos_id``: a flat ``uint16`` array (``uint32`` for a vocabulary over 65,536), read with
  ``np.memmap``.
* ``doc_ends.bin``: ``int64`` offsets, the end (exclusive) of every document in the stream.
* ``manifest.json``: the key's parts (the source's ``fingerprint()``, the tokenizer's), the counts,
  ``n_train_docs`` (the training split is the first that many documents) and the dtype. It is
  written last: a store without it is not read.

A flat stream rather than ArrayRecord records: a window is a slice, whatever ``seq_len`` (records
would fix the window length, or need a document index to rebuild windows across records), and
``np.memmap`` reads it with no decoding; the segment ids come from ``doc_ends.bin`` by binary
search.

The key is a hash of the source (kind, files with sizes and modification times, or the dataset
name, config and splits; ``text_field``; ``val_fraction`` where it splits) and the tokenizer
(kind and a hash of its model file): a change of either builds a new store. ``CACHE`` is
``data.cache_dir``, else ``$NLX_CACHE``, else ``~/.cache/nlx``.

Building streams the documents through the tokenizer in pieces (``FLUSH_CHARS`` at a time) into a
temporary directory beside the store, renamed into place when complete: a killed build leaves no
store that is read. With several processes (``jax.process_count() > 1``) process 0 builds while
the others wait (``multihost_utils.sync_global_devices``); a host that still sees no store (a
local cache directory on each host's own disk) builds its own. A ``gs://`` cache directory is
written through ``etils.epath`` (the data files first, the manifest last) and read by copying the
store once per host into the local mirror ``LOCAL/mirror/<name>`` (``LOCAL``: ``$NLX_CACHE`` when
local, else ``~/.cache/nlx``), which later starts reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import numpy as np
from etils import epath

from nlx.data import streams, tokenizers
from nlx.errors import DataError

FORMAT = 1
MANIFEST, TOKENS, ENDS = "manifest.json", "tokens.bin", "doc_ends.bin"
FLUSH_CHARS = 1 << 22
COPY_BYTES = 1 << 24
# The names of the stores this process built (a restart that reuses a store adds none).
BUILT: list = []


def cache_root(data) -> str:
  """``data.cache_dir``, else ``$NLX_CACHE``, else ``~/.cache/nlx``."""
  return (data.cache_dir or os.environ.get("NLX_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "nlx"))


def local_root() -> str:
  """Where the local mirrors of remote stores go: ``$NLX_CACHE`` when local, else
  ``~/.cache/nlx``."""
  env = os.environ.get("NLX_CACHE")
  return env if env and not _is_url(env) else os.path.join(os.path.expanduser("~"), ".cache",
                                                             "nlx")


def store_name(source: dict, tokenizer: dict) -> str:
  """``<source>-<tokenizer>-<hash of both fingerprints>``: the store's directory name."""
  blob = json.dumps({"format": FORMAT, "source": source, "tokenizer": tokenizer}, sort_keys=True)
  return f"{source['source']}-{tokenizer['kind']}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _is_url(path: str) -> bool:
  return "://" in str(path)


def _processes() -> tuple[int, int]:
  """``(process index, process count)``: ``(0, 1)`` unless ``jax.distributed`` is initialised
  (``nlx.train.sharding.maybe_initialize_distributed``); never initialises a JAX backend."""
  if "jax" not in sys.modules:
    return 0, 1
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    if distributed.global_state.client is None:
      return 0, 1
  except (ImportError, AttributeError):  # another JAX: ask it (this initialises the backend)
    pass
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def _sync(tag: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(tag)


def _say(message: str) -> None:
  if _processes()[0] == 0:
    print(f"token cache: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Writing a store
# ----------------------------------------------------------------------------------------------


def _encode(tokenizer, texts: list, firsts: list) -> list:
  """The ids of each piece (``firsts[i]``: the piece starts its document)."""
  if hasattr(tokenizer, "encode_array"):
    return [tokenizer.encode_array(t) for t in texts]
  if hasattr(tokenizer, "encode_batch"):  # Hugging Face: in parallel; special tokens once per doc
    out = [None] * len(texts)
    for first in (True, False):
      index = [i for i, f in enumerate(firsts) if f == first]
      if index:
        ids = tokenizer.encode_batch([texts[i] for i in index], add_special_tokens=first)
        for i, x in zip(index, ids):
          out[i] = x
    return out
  return [tokenizer.encode(t) for t in texts]


class _Writer:
  """Appends pieces of documents to ``tokens.bin`` and ``doc_ends.bin``."""

  def __init__(self, directory: str, tokenizer):
    self.tokenizer = tokenizer
    self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    self.tokens = open(os.path.join(directory, TOKENS), "wb")
    self.ends = open(os.path.join(directory, ENDS), "wb")
    self.n_tokens = self.n_docs = 0
    self.batch, self.chars, self.first = [], 0, True

  def add(self, text: str, ends: bool) -> None:
    self.batch.append((text, ends, self.first))
    self.first, self.chars = ends, self.chars + len(text)
    if self.chars >= FLUSH_CHARS:
      self.flush()

  def flush(self) -> None:
    if not self.batch:
      return
    texts, ends, firsts = zip(*self.batch)
    arrays = [np.asarray(ids) for ids in _encode(self.tokenizer, list(texts), list(firsts))]
    limit = np.iinfo(self.dtype).max
    for ids in arrays:
      if ids.size and (ids.min() < 0 or ids.max() > limit):
        raise DataError(f"data.tokenizer={self.tokenizer.fingerprint()['kind']!r}: id "
                        f"{int(ids.max())} does not fit the store's {self.dtype.name} "
                        f"(vocab_size {self.tokenizer.vocab_size})")
    stream = np.empty(sum(len(ids) for ids in arrays) + sum(ends), self.dtype)
    offsets, pos = [], 0
    for ids, end in zip(arrays, ends):
      stream[pos:pos + len(ids)] = ids
      pos += len(ids)
      if end:
        stream[pos] = self.tokenizer.eos_id
        pos += 1
        offsets.append(self.n_tokens + pos)
    n = self.n_tokens + pos
    stream.tofile(self.tokens)
    np.asarray(offsets, np.int64).tofile(self.ends)
    self.n_tokens, self.n_docs = n, self.n_docs + len(offsets)
    self.batch, self.chars = [], 0

  def close(self) -> None:
    self.flush()
    self.tokens.close()
    self.ends.close()


def write_store(documents: streams.Documents, tokenizer, directory: str, name: str) -> dict:
  """Tokenizes ``documents`` into the store files of ``directory``; returns its manifest."""
  start = time.perf_counter()
  writer = _Writer(directory, tokenizer)
  try:
    for text, ends in documents.pieces():
      writer.add(text, ends)
  finally:
    writer.close()
  manifest = {"format": FORMAT, "name": name, "source": documents.fingerprint(),
              "tokenizer": tokenizer.fingerprint(), "dtype": writer.dtype.name,
              "n_tokens": writer.n_tokens, "n_docs": writer.n_docs,
              "n_train_docs": documents.n_train, "vocab_size": tokenizer.vocab_size,
              "eos_id": tokenizer.eos_id, "build_s": round(time.perf_counter() - start, 3)}
  with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _complete(directory: str, name: str) -> bool:
  try:
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return False
  return manifest.get("format") == FORMAT and manifest.get("name") == name


def _publish(tmp: str, final: str, name: str) -> None:
  """Renames the complete store ``tmp`` to ``final`` (atomic); keeps another process's complete
  store there, replaces anything else (a directory left without a manifest)."""
  os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
  try:
    os.rename(tmp, final)
  except OSError:
    if _complete(final, name):
      return
    shutil.rmtree(final)
    os.rename(tmp, final)


def _build(documents, tokenizer, final: str, name: str) -> None:
  """Builds the store ``final`` (local) in a temporary directory beside it, then renames it."""
  parent, tmp = os.path.dirname(final), None
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    _say(f"tokenizing {documents.fingerprint()['source']} data into {final} (once: restarts "
         "and other hosts reuse it)")
    manifest = write_store(documents, tokenizer, tmp, name)
    BUILT.append(name)
    _publish(tmp, final, name)
    _say(f"{manifest['n_tokens']:,} tokens in {manifest['n_docs']:,} documents, "
         f"{manifest['build_s']:.1f} s")
  except OSError as e:  # the cache directory: not writable, full
    raise DataError(f"the token cache cannot be written in {parent!r} ({e.strerror or e}); "
                    "allowed: a writable data.cache_dir (or $NLX_CACHE) with room for about 2 "
                    "bytes per token, or data.token_cache=False") from None
  finally:
    if tmp and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _copy(src, dst) -> None:
  with src.open("rb") as f, dst.open("wb") as g:
    shutil.copyfileobj(f, g, COPY_BYTES)


def _upload(local: str, remote: epath.Path) -> None:
  remote.mkdir(parents=True, exist_ok=True)
  for name in (TOKENS, ENDS, MANIFEST):  # the manifest last: it marks the store complete
    _copy(epath.Path(local) / name, remote / name)


def _download(remote: epath.Path, final: str, name: str) -> None:
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    for file in (TOKENS, ENDS, MANIFEST):
      _copy(remote / file, epath.Path(tmp) / file)
    _publish(tmp, final, name)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def open_store(data, documents: streams.Documents, tokenizer) -> str:
  """The local directory of the store of ``(documents, tokenizer)``, built or copied if needed."""
  root = cache_root(data)
  name = store_name(documents.fingerprint(), tokenizer.fingerprint())
  index, count = _processes()
  builds = index == 0 or count == 1
  if not _is_url(root):
    final = os.path.join(os.path.abspath(os.path.expanduser(root)), "tokens", name)
    if builds and not _complete(final, name):
      _build(documents, tokenizer, final, name)
    elif builds:
      _say(f"reusing {final}")
    if count > 1:
      _sync(f"nlx_token_cache_{name}")
      if not _complete(final, name):  # this host's own disk: build its own copy
        _build(documents, tokenizer, final, name)
    return final
  try:
    remote = epath.Path(root) / "tokens" / name
  except (KeyError, NotImplementedError):
    raise DataError(f"data.cache_dir={root!r}: no file system handles this scheme; allowed: a "
                    "local directory, gs://, s3://") from None
  local = os.path.join(os.path.abspath(os.path.expanduser(local_root())), "mirror", name)
  if builds and _complete(local, name):
    _say(f"reusing {local} (the local copy of {remote})")
  elif builds:
    if (remote / MANIFEST).exists():
      _say(f"copying {remote} to {local}")
      _download(remote, local, name)
    else:
      _build(documents, tokenizer, local, name)
      _upload(local, remote)
  if count > 1:
    _sync(f"nlx_token_cache_{name}")
    if not _complete(local, name):
      if not (remote / MANIFEST).exists():
        raise DataError(f"data.cache_dir={root!r}: process 0 wrote no store {name}")
      _download(remote, local, name)
  return local


# ----------------------------------------------------------------------------------------------
# Reading: windows over a store
# ----------------------------------------------------------------------------------------------


def read_manifest(directory: str) -> dict:
  with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def split_range(manifest: dict, directory: str, split: str) -> tuple[int, int]:
  """``(first token, end token)`` of ``split`` (``training`` or ``validation``) in the stream."""
  n_train = manifest["n_train_docs"]
  boundary = 0
  if n_train:
    ends = np.memmap(os.path.join(directory, ENDS), np.int64, "r", shape=(manifest["n_docs"],))
    boundary = int(ends[n_train - 1])
  return (0, boundary) if split == "training" else (boundary, manifest["n_tokens"])


class TokenWindows:
  """Windows ``[seq_len + 1]`` (int32) of one split of a store, starting every ``seq_len`` tokens:
  a lazy sequence (``len``, ``windows[i]``) that reads a row from the memory map when asked.

  ``windows[i]`` is the row's tokens, or with ``segment_ids`` the dict ``{"tokens",
  "segment_ids"}`` of ``pipeline.pack_segments`` (the ids count the documents that start in the
  row after its first token). For small data and tests, ``np.asarray(windows)`` (tokens) and
  ``windows["tokens"]``/``windows["segment_ids"]`` (with segment ids) read every row at once.
  """

  def __init__(self, directory: str, split: str, seq_len: int, segment_ids: bool = False):
    manifest = read_manifest(directory)
    self.directory, self.split, self.seq_len = directory, split, seq_len
    self.segment_ids = segment_ids
    self._dtype, self._n_tokens = np.dtype(manifest["dtype"]), manifest["n_tokens"]
    self._n_docs = manifest["n_docs"]
    self.start, end = split_range(manifest, directory, split)
    n_tokens = end - self.start
    self._len = (n_tokens - 1) // seq_len
    if self._len < 1:
      raise DataError(f"train.seq_len={seq_len}: the text has only {n_tokens} tokens ({split} "
                      f"split), fewer than one window of {seq_len + 1}; allowed: seq_len <= "
                      f"{max(n_tokens - 1, 0)}, or more text")
    self._maps = None

  def _open(self):
    if self._maps is None:  # opened on first use (and again after pickling)
      self._maps = (
          np.memmap(os.path.join(self.directory, TOKENS), self._dtype, "r",
                    shape=(self._n_tokens,)),
          np.memmap(os.path.join(self.directory, ENDS), np.int64, "r", shape=(self._n_docs,)))
    return self._maps

  def __getstate__(self):
    return {**self.__dict__, "_maps": None}

  def __len__(self) -> int:
    return self._len

  @property
  def shape(self) -> tuple[int, int]:
    return (self._len, self.seq_len + 1)

  def _row(self, i: int):
    tokens, ends = self._open()
    s = self.start + i * self.seq_len
    row = np.asarray(tokens[s:s + self.seq_len + 1], np.int32)
    if not self.segment_ids:
      return row
    first, last = np.searchsorted(ends, [s, s + self.seq_len], "right")
    starts = np.asarray(ends[first:last]) - s  # documents that start inside the row
    ids = np.searchsorted(starts, np.arange(self.seq_len + 1), "right").astype(np.int32)
    return {"tokens": row, "segment_ids": ids}

  def __getitem__(self, key):
    if isinstance(key, str):
      if not self.segment_ids or key not in ("tokens", "segment_ids"):
        allowed = "'tokens', 'segment_ids'" if self.segment_ids else "none (an array of tokens)"
        raise KeyError(f"windows[{key!r}]: allowed keys: {allowed}")
      return self._all(key)
    i = int(key)
    if not -self._len <= i < self._len:
      raise IndexError(f"window {i} of {self._len}")
    return self._row(i % self._len)

  def __iter__(self):
    return (self._row(i) for i in range(self._len))

  def _all(self, key: str) -> np.ndarray:
    tokens, ends = self._open()
    index = (self.start + np.arange(self._len)[:, None] * self.seq_len
             + np.arange(self.seq_len + 1)[None, :])
    if key == "tokens":
      return np.asarray(tokens[index], np.int32)
    doc = np.searchsorted(ends, index, "right")
    return (doc - doc[:, :1]).astype(np.int32)

  def __array__(self, dtype=None, copy=None):
    del copy
    if self.segment_ids:
      raise TypeError("windows with segment ids are a dict per row: use windows['tokens']")
    out = self._all("tokens")
    return out if dtype is None else out.astype(dtype)


def _tokenizer(data, workdir: Optional[str], documents: streams.Documents):
  """The tokenizer of ``data``; a SentencePiece model to train is trained once (process 0)."""
  texts = documents.train_texts()
  index, count = _processes()
  trains = data.tokenizer == "sentencepiece" and not data.spm_model
  if count > 1 and trains:
    if index == 0:
      tokenizer = tokenizers.from_config(data, workdir, texts)
      _sync("nlx_spm_model")
      return tokenizer
    _sync("nlx_spm_model")  # a workdir each host sees: process 0's model; else this host trains
  return tokenizers.from_config(data, workdir, texts)


def load_splits(data, seq_len: int, workdir: Optional[str] = None, segment_ids: bool = False):
  """``(tokenizer, train windows, validation windows)`` of ``config.data`` from its store.

  Args:
    data: the ``DataConfig``.
    seq_len: ``train.seq_len``.
    workdir: where a SentencePiece model is trained (or found) when ``data.spm_model`` is None.
    segment_ids: windows of ``{"tokens", "segment_ids"}`` rows (``train.pack_documents``).
  """
  documents = streams.documents(data)
  tokenizer = _tokenizer(data, workdir, documents)
  directory = open_store(data, documents, tokenizer)
  return (tokenizer, TokenWindows(directory, "training", seq_len, segment_ids),
          TokenWindows(directory, "validation", seq_len, segment_ids))
