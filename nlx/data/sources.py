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
  splits (``nlx.data.seqio_adapter``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os

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
    return (seqio_adapter.task_documents(data.seqio_task, "train"),
            seqio_adapter.task_documents(data.seqio_task, "validation"))
  read = _read_text if source == "text" else (lambda p: _read_jsonl(p, data.text_field))
  if os.path.isdir(data.path):
    train_files, val_files = _split_files(data.path, "txt" if source == "text" else "jsonl")
    if val_files:
      return _concat(read, train_files), _concat(read, val_files)
    return split_tail(_concat(read, train_files), data.val_fraction)
  if not os.path.isfile(data.path):
    raise ValueError(f"data.path={data.path!r} is neither a file nor a directory")
  return split_tail(read(data.path), data.val_fraction)


def split_tail(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
  """Holds out the last ``fraction`` of the characters (at a line boundary when one is near)."""
  if len(documents) > 1:
    n_val = max(1, round(len(documents) * fraction))
    if n_val >= len(documents):
      raise ValueError(f"data.val_fraction={fraction} leaves no training documents out of "
                       f"{len(documents)}")
    return documents[:-n_val], documents[-n_val:]
  text = documents[0]
  cut = int(len(text) * (1 - fraction))
  newline = text.rfind("\n", 0, cut)
  cut = newline + 1 if newline > cut * 0.9 else cut
  return [text[:cut]], [text[cut:]]


def _split_files(directory: str, ext: str) -> tuple[list[str], list[str]]:
  files = sorted(glob.glob(os.path.join(directory, f"*.{ext}")))
  train = [f for f in files if "train" in os.path.basename(f)]
  valid = [f for f in files if any(s in os.path.basename(f) for s in ("valid", "val."))]
  if train:
    return train, valid
  if len(files) == 1:
    return files, []
  raise ValueError(f"data.path={directory!r}: expected *train*.{ext} (and *valid*.{ext}) files "
                   f"or a single .{ext} file; found {[os.path.basename(f) for f in files]}")


def _concat(read, files: list[str]) -> list[str]:
  return [doc for f in files for doc in read(f)]


def _read_text(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [f.read()]


def _read_jsonl(path: str, field: str) -> list[str]:
  documents = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if field not in record:
        raise ValueError(f"data.text_field={field!r} is not in record {line_no} of {path!r}; "
                         f"its fields: {sorted(record)}")
      documents.append(str(record[field]))
  if not documents:
    raise ValueError(f"data.path={path!r} holds no jsonl records")
  return documents
