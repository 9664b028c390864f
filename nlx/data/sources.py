"""Text sources: the embedded corpus, text files and directories, jsonl, and seqio tasks.

``load_documents(data)`` returns ``(train, validation)`` lists of documents (strings) for
``config.data`` (an ``nlx.train.config.DataConfig``):

* ``embedded``: ``corpus/tinyshakespeare_400k.txt.gz`` in this package (the first 399,862
  characters of Karpathy's tinyshakespeare: Shakespeare's plays, public domain); its last
  ``val_fraction`` is the validation split.
* ``text``: a UTF-8 file (its tail is the validation split), or a directory holding
  ``*train*.txt`` and ``*valid*.txt`` files (PTB: ``ptb.train.txt``, ``ptb.valid.txt``), or a
  single ``.txt`` file (tinyshakespeare's ``input.txt``). A file is one document.
* ``jsonl``: one JSON object per line, the document in ``text_field``; a file is split like a text
  file (its last records), a directory like above.
* ``seqio``: the ``text`` feature of a registered seqio task's ``train`` and ``validation``
  splits (``nlx.data.seqio_adapter``; ``data.seqio_module`` is imported first).
* ``hf``: the ``text_field`` of a Hugging Face ``datasets`` dataset (``nlx.data.hf_source``).

These lists are the in-memory path (``data.token_cache=False``); the token cache reads the same
documents as a stream (``nlx.data.streams``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os

from nlx.errors import DataError

EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                               "tinyshakespeare_400k.txt.gz")


def load_documents(data) -> tuple[list[str], list[str]]:
  """``(train documents, validation documents)`` of ``config.data``."""
  source = data.resolved_source
  if source == "embedded":
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
      return split_tail([f.read()], data.val_fraction)
  if source == "seqio":
    from nlx.data import seqio_adapter  # pylint: disable=g-import-not-at-top  (optional extra)
    seqio_adapter.import_modules(data.seqio_module)
    return (seqio_adapter.task_documents(data.seqio_task, "train"),
            seqio_adapter.task_documents(data.seqio_task, "validation"))
  if source == "hf":
    from nlx.data import hf_source  # pylint: disable=g-import-not-at-top  (optional extra)
    return hf_source.load_documents(data)
  read = _read_text if source == "text" else (lambda p: _read_jsonl(p, data.text_field))
  if os.path.isdir(data.path):
    train_files, val_files = split_files(data.path, "txt" if source == "text" else "jsonl")
    if val_files:
      return _concat(read, train_files), _concat(read, val_files)
    return split_tail(_concat(read, train_files), data.val_fraction)
  if not os.path.isfile(data.path):
    raise DataError(f"data.path={data.path!r} does not exist (neither a file nor a directory)")
  return split_tail(read(data.path), data.val_fraction)


def file_documents(path: str, text_field: str = "text") -> list[str]:
  """The documents of one file: a ``.jsonl`` file's records (the text in ``text_field``), any
  other file's whole text (one document)."""
  if path.endswith(".jsonl"):
    documents = _read_jsonl(path, text_field)
    if not documents:
      raise DataError(f"data file {path!r} holds no records")
    return documents
  return _read_text(path)


def split_tail(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
  """Holds out the last ``fraction`` of the characters (at a line boundary when one is near)."""
  if len(documents) > 1:
    n_val = max(1, round(len(documents) * fraction))
    if n_val >= len(documents):
      raise DataError(f"data.val_fraction={fraction} leaves no training documents out of "
                       f"{len(documents)}")
    return documents[:-n_val], documents[-n_val:]
  text = documents[0]
  cut = int(len(text) * (1 - fraction))
  newline = text.rfind("\n", 0, cut)
  cut = newline + 1 if newline > cut * 0.9 else cut
  return [text[:cut]], [text[cut:]]


def split_files(directory: str, ext: str) -> tuple[list[str], list[str]]:
  """``(training files, validation files)`` of a directory: ``*train*.EXT`` and ``*valid*.EXT``
  (``*val.*``), or its single ``.EXT`` file (no validation files)."""
  files = sorted(glob.glob(os.path.join(directory, f"*.{ext}")))
  train = [f for f in files if "train" in os.path.basename(f)]
  valid = [f for f in files if any(s in os.path.basename(f) for s in ("valid", "val."))]
  if train:
    return train, valid
  if len(files) == 1:
    return files, []
  raise DataError(f"data.path={directory!r}: expected *train*.{ext} (and *valid*.{ext}) files "
                   f"or a single .{ext} file; found {[os.path.basename(f) for f in files]}")


def _concat(read, files: list[str]) -> list[str]:
  return [doc for f in files for doc in read(f)]


def read_utf8(path: str) -> str:
  """The text of the file ``path``.

  Raises:
    DataError: the file cannot be read, is empty (or only whitespace) or is not UTF-8 (naming
      the byte offset).
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"data file {path!r} cannot be read: {e.strerror or e}") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad = raw[e.start:e.start + 1]
    raise DataError(f"data file {path!r} is not UTF-8: byte {e.start} ({bad!r}) {e.reason}; "
                    "convert it (iconv -f LATIN1 -t UTF-8) or fix the byte") from None
  if not text.strip():
    raise DataError(f"data file {path!r} is empty")
  return text


def _read_text(path: str) -> list[str]:
  return [read_utf8(path)]


def _read_jsonl(path: str, field: str) -> list[str]:
  documents = []
  for line_no, line in enumerate(read_utf8(path).splitlines(), 1):
    record = parse_record(line, field, path, line_no)
    if record is not None:
      documents.append(record)
  return documents


def parse_record(line: str, field: str, path: str, line_no: int):
  """The text of one jsonl line's record (``str(record[field])``); None for a blank line.

  Raises:
    DataError: the line is not JSON, or not an object with ``field`` (naming line and file).
  """
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except ValueError as e:
    raise DataError(f"line {line_no} of {path!r} is not JSON ({e})") from None
  if not isinstance(record, dict) or field not in record:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"data.text_field={field!r} is not in record {line_no} of {path!r}; "
                    f"its fields: {fields}")
  return str(record[field])
