"""The documents of a source read as a stream, for the token cache (``nlx.data.token_cache``).

``documents(data)`` returns a ``Documents`` for ``config.data``: its ``pieces()`` yield the text of
the training documents, then of the validation documents, as ``(text, ends_document)`` pieces,
never the whole corpus at once: a file is read in chunks of ``CHUNK_BYTES``, and a document longer
than a chunk comes in several pieces, cut after a line end (``"\\n"``) when the chunk has one.
The documents, their order and the two splits are those of ``nlx.data.sources.load_documents``
(the in-memory path, ``data.token_cache=False``), and so are the errors (an empty file, invalid
UTF-8 naming the byte, a record without ``text_field``), so that the cached windows are the
in-memory ones. After ``pieces()`` is exhausted, ``n_train`` is the number of training documents.

* A single text file (and the embedded corpus) is read twice: once to count its characters and
  find the cut of ``sources.split_tail`` (the last ``val_fraction``, at a line end when one is
  near), once to yield it.
* Records (jsonl, seqio examples, Hugging Face rows) are read once; without a validation split,
  the last ``val_fraction`` of them are the validation documents (known at the end: the store
  keeps one stream of tokens and the split is a document index).

``fingerprint()`` says what the text is without reading it (the kind, the files with their sizes
and modification times, the fields and fractions that change the splits): the source half of the
token cache's key.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from typing import Callable, Iterable, Iterator, Optional

from nlx.data import sources
from nlx.errors import DataError

CHUNK_BYTES = 1 << 22
Piece = tuple  # (text: str, ends_document: bool)


class Documents:
  """Training then validation documents of a source, read as pieces (a base class).

  Attributes:
    n_train: the number of training documents; set once ``pieces()`` is exhausted.
  """

  n_train: Optional[int] = None

  def fingerprint(self) -> dict:
    """What identifies the text (JSON-able), without reading it."""
    raise NotImplementedError

  def pieces(self) -> Iterator[Piece]:
    """``(text, ends_document)`` of the training documents, then of the validation ones."""
    raise NotImplementedError

  def train_texts(self) -> Iterator[str]:
    """Text of the training documents (to train a SentencePiece model on): the pieces up to the
    end of the training split where it is known before reading, else all of them."""
    ended = 0
    for text, ends in self.pieces():
      if self.n_train is not None and ended >= self.n_train:
        return
      yield text
      ended += ends


def documents(data) -> Documents:
  """The ``Documents`` of ``config.data`` (an ``nlx.train.config.DataConfig``)."""
  source = data.resolved_source
  if source == "embedded":
    return OneText(sources.EMBEDDED_CORPUS, data.val_fraction, embedded=True)
  if source == "seqio":
    from nlx.data import seqio_adapter  # pylint: disable=g-import-not-at-top  (optional extra)
    return seqio_adapter.TaskDocuments(data.seqio_task, data.seqio_module)
  if source == "hf":
    from nlx.data import hf_source  # pylint: disable=g-import-not-at-top  (optional extra)
    return hf_source.HFDocuments(data)
  path = data.path
  if "://" in str(path):
    raise DataError(f"data.path={path!r}: the {source} source reads local files; allowed: a "
                    "local file or directory (or data.source='hf' with data.hf_dataset="
                    "'text'/'json', which reads URLs through fsspec)")
  field = data.text_field if source == "jsonl" else None
  if os.path.isdir(path):
    train, val = sources.split_files(path, "txt" if source == "text" else "jsonl")
    if val:
      return Files(train, val, field, None)
    if source == "text" and len(train) == 1:
      return OneText(train[0], data.val_fraction)
    return Files(train, [], field, data.val_fraction)
  if not os.path.isfile(path):
    raise DataError(f"data.path={path!r} does not exist (neither a file nor a directory)")
  if source == "text":
    return OneText(path, data.val_fraction)
  return Files([path], [], field, data.val_fraction)


def _stat(path: str) -> list:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _open(path: str, gz: bool):
  try:
    return gzip.open(path, "rb") if gz else open(path, "rb")
  except OSError as e:
    raise DataError(f"data file {path!r} cannot be read: {e.strerror or e}") from None


def _char_start(data: bytes) -> int:
  """Where a UTF-8 character cut off at the end of ``data`` starts (``len(data)`` if none is)."""
  for back in range(1, min(4, len(data)) + 1):
    byte = data[-back]
    if byte & 0xC0 != 0x80:  # not a continuation byte: a character starts here
      need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
      return len(data) - back if need > back else len(data)
  return len(data)


def text_chunks(path: str, start: int = 0, gz: bool = False) -> Iterator[tuple[int, str]]:
  """``(byte offset, text)`` of a UTF-8 file (``gz``: gzipped) read in chunks cut between
  characters, from byte ``start`` on.

  Raises:
    DataError: the file cannot be read or is not UTF-8 (naming the byte offset, as
      ``sources.read_utf8`` does).
  """
  with _open(path, gz) as f:
    f.seek(start)
    offset, carry = start, b""
    while True:
      raw = f.read(CHUNK_BYTES)
      data = carry + raw
      cut = _char_start(data) if raw else len(data)
      try:
        text = data[:cut].decode("utf-8")
      except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1]
        raise DataError(f"data file {path!r} is not UTF-8: byte {offset + e.start} ({bad!r}) "
                        f"{e.reason}; convert it (iconv -f LATIN1 -t UTF-8) or fix the byte"
                        ) from None
      if text:
        yield offset, text
      offset, carry = offset + cut, data[cut:]
      if not raw:
        return


def document_pieces(texts: Iterable[str], cuts: Iterable[int] = ()) -> Iterator[Piece]:
  """Pieces of one text read in chunks: documents end at the character positions ``cuts`` and at
  the end; a piece that does not end a document ends after a line end when its chunk has one."""
  cuts = list(cuts)
  pos, carry = 0, ""
  for text in texts:
    while cuts and cuts[0] <= pos + len(text):
      k = cuts.pop(0) - pos
      yield carry + text[:k], True
      carry, text, pos = "", text[k:], pos + k
    line_end = text.rfind("\n") + 1
    if line_end or len(carry) + len(text) > CHUNK_BYTES:
      line_end = line_end or len(text)
      if carry or line_end:
        yield carry + text[:line_end], False
      carry = text[line_end:]
    else:
      carry += text
    pos += len(text)
  for _ in cuts:  # a cut at the very end (an empty last document)
    yield carry, True
    carry = ""
  yield carry, True


class OneText(Documents):
  """One UTF-8 text file (or the embedded corpus), split by ``sources.split_tail``."""

  def __init__(self, path: str, fraction: float, embedded: bool = False):
    self.path, self.fraction, self.embedded = path, fraction, embedded

  def fingerprint(self) -> dict:
    if self.embedded:
      with open(self.path, "rb") as f:
        return {"source": "embedded", "sha256": hashlib.sha256(f.read()).hexdigest(),
                "val_fraction": self.fraction}
    return {"source": "text", "files": [_stat(self.path)], "val_fraction": self.fraction}

  def _cut(self) -> int:
    """``split_tail``'s cut (in characters) of the file's text."""
    chunks, total, blank = [], 0, True
    for offset, text in text_chunks(self.path, gz=self.embedded):
      chunks.append((offset, total, len(text), text.rfind("\n")))
      total += len(text)
      blank = blank and not text.strip()
    if blank:
      raise DataError(f"data file {self.path!r} is empty")
    cut = int(total * (1 - self.fraction))
    newline = -1  # the last "\n" before the cut (text.rfind("\n", 0, cut))
    for offset, start, n, last in chunks:
      if start + n <= cut:
        newline = start + last if last >= 0 else newline
      elif start < cut:  # the chunk of the cut: read it again (a prefix of it comes back)
        found = next(text_chunks(self.path, offset, self.embedded))[1].rfind("\n", 0,
                                                                           cut - start)
        newline = start + found if found >= 0 else newline
        break
    return newline + 1 if newline > cut * 0.9 else cut

  def pieces(self) -> Iterator[Piece]:
    cut = self._cut()
    self.n_train = 1
    yield from document_pieces((t for _, t in text_chunks(self.path, gz=self.embedded)), [cut])


class Files(Documents):
  """Text files (each one document) or jsonl files (a document per record): the training files,
  then the validation files; without validation files the last ``fraction`` of the documents (by
  count, or of the characters when there is one document) are the validation split."""

  def __init__(self, train: list, val: list, field: Optional[str], fraction: Optional[float]):
    self.train, self.val, self.field, self.fraction = train, val, field, fraction

  def fingerprint(self) -> dict:
    out = {"source": "text" if self.field is None else "jsonl",
           "files": [_stat(f) for f in self.train], "val_files": [_stat(f) for f in self.val]}
    if self.field is not None:
      out["text_field"] = self.field
    if not self.val:
      out["val_fraction"] = self.fraction
    return out

  def _documents(self, files: list) -> Iterator[Callable[[], Iterator[Piece]]]:
    """A reader of the pieces of each document of ``files``."""
    for path in files:
      if self.field is None:
        yield lambda path=path: _file_pieces(path)
      else:
        for record in jsonl_records(path, self.field):
          yield lambda record=record: iter([(record, True)])

  def pieces(self) -> Iterator[Piece]:
    if self.val:
      n = 0
      for read in self._documents(self.train):
        yield from read()
        n += 1
      self.n_train = n
      for read in self._documents(self.val):
        yield from read()
      return
    if self.field is None:  # text files: their number is known
      n_val = tail_count(len(self.train), self.fraction)
      self.n_train = len(self.train) - n_val
      for read in self._documents(self.train):
        yield from read()
      return
    yield from tail_split(self, (record for read in self._documents(self.train)
                                 for record, _ in read()), self.fraction)


def _file_pieces(path: str) -> Iterator[Piece]:
  blank = True
  for _, text in text_chunks(path):
    blank = blank and not text.strip()
    yield text, False
  if blank:
    raise DataError(f"data file {path!r} is empty")
  yield "", True


def tail_count(n: int, fraction: float) -> int:
  """The validation documents of ``sources.split_tail`` out of ``n`` (``n > 1``)."""
  n_val = max(1, round(n * fraction))
  if n_val >= n:
    raise DataError(f"data.val_fraction={fraction} leaves no training documents out of {n}")
  return n_val


def tail_split(owner: Documents, records: Iterator[str], fraction: float) -> Iterator[Piece]:
  """Pieces of ``records`` (one document each) held out as ``sources.split_tail`` does: the last
  ``fraction`` of them (known at the end; sets ``owner.n_train``); one record is split by its
  characters."""
  first = next(records, None)
  second = next(records, None) if first is not None else None
  if first is None:
    raise DataError("the data source holds no documents")
  if second is None:
    train, val = sources.split_tail([first], fraction)
    owner.n_train = 1
    yield train[0], True
    yield val[0], True
    return
  n = 2
  yield first, True
  yield second, True
  for record in records:
    yield record, True
    n += 1
  owner.n_train = n - tail_count(n, fraction)


def jsonl_records(path: str, field: str) -> Iterator[str]:
  """The ``field`` of each record of a jsonl file, read in chunks (lines as ``str.splitlines``;
  blank lines skipped; errors as ``sources``' in-memory reader)."""
  line_no, carry, blank = 0, "", True
  for _, text in text_chunks(path):
    blank = blank and not text.strip()
    lines = (carry + text).splitlines(keepends=True)
    carry = lines.pop() if lines else ""
    for line in lines:
      line_no += 1
      record = sources.parse_record(line.splitlines()[0], field, path, line_no)
      if record is not None:
        yield record
  if blank:
    raise DataError(f"data file {path!r} is empty")
  if carry:
    record = sources.parse_record(carry.splitlines()[0], field, path, line_no + 1)
    if record is not None:
      yield record
