"""Tokenizers: byte-level (the default; no files), SentencePiece (trained or loaded) and Hugging
Face ``tokenizers`` (a ``tokenizer.json``, e.g. of a model converted by ``nlx convert llama``).

Each has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id`` (the
id that ends a document when documents are packed) and ``fingerprint()`` (what the token cache,
``nlx.data.token_cache``, keys its stores by: the kind and a hash of the model file).

Model files are read through ``etils.epath``, so a workdir or a model on ``gs://`` works; a
SentencePiece model trained for a run is trained in a local temporary directory, then copied
into the workdir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np
from etils import epath

from nlx.errors import DataError


def _path(path: str) -> epath.Path:
  """``path`` as an ``epath.Path`` (a local path or a URL such as ``gs://bucket/x``)."""
  try:
    return epath.Path(path)
  except (KeyError, NotImplementedError):  # epath has no backend for the scheme
    raise DataError(f"{path!r}: no file system handles this scheme; allowed: a local path, "
                    "gs://, s3://") from None


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class ByteTokenizer:
  """UTF-8 bytes as ids ``0..255``; id 0 (NUL, removed from the text) ends a document."""

  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> list[int]:
    return [b for b in text.encode("utf-8") if b != self.eos_id]

  def encode_array(self, text: str) -> np.ndarray:
    """``encode(text)`` as a uint8 array (fast: no Python list)."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8)
    return ids[ids != self.eos_id]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

  def fingerprint(self) -> dict:
    return {"kind": "byte"}


class SentencePieceTokenizer:
  """A SentencePiece model (``.model`` file); ``eos_id`` is the model's ``</s>``."""

  def __init__(self, model_file: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    path = _path(model_file)
    if not path.is_file():
      raise DataError(f"data.spm_model={model_file!r} does not exist")
    self.model_file = model_file
    proto = path.read_bytes()
    self._hash = _sha256(proto)
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"data.spm_model={model_file!r} has no </s> piece (eos_id=-1); train it "
                       "with eos_id >= 0")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def fingerprint(self) -> dict:
    return {"kind": "sentencepiece", "sha256": self._hash}


class HFTokenizer:
  """A Hugging Face tokenizer from its ``tokenizer.json`` (the ``tokenizers`` package).

  ``encode`` applies the file's post-processor (a Llama tokenizer puts BOS first, as
  ``transformers`` does); ``encode(text, add_special_tokens=False)`` does not (a session's later
  turns). ``eos_id`` is the ``eos_token`` of the ``tokenizer_config.json`` beside the file (its
  Hugging Face home), else the first of the usual end-of-text tokens the vocabulary has.
  """

  EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")

  def __init__(self, path: str):
    import json  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    file = _path(path)
    if not file.is_file():
      raise DataError(f"data.tokenizer_file={path!r} does not exist")
    self.path = path
    text = file.read_text(encoding="utf-8")
    try:
      self._tok = Tokenizer.from_str(text)
    except Exception as e:  # pylint: disable=broad-except  (the Rust library's own exception)
      raise DataError(f"data.tokenizer_file={path!r} is not a tokenizers tokenizer.json: "
                      f"{e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    names = list(self.EOS_NAMES)
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
      eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
      names.insert(0, eos.get("content") if isinstance(eos, dict) else eos)
    ids = [self._tok.token_to_id(n) for n in names if n]
    ids = [i for i in ids if i is not None]
    if not ids:
      raise DataError(f"{path}: no end-of-text token (looked for {names}); add a "
                      "tokenizer_config.json with an 'eos_token' beside it")
    self.eos_id = ids[0]
    self._hash = _sha256(text.encode("utf-8"))

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list:
    """``[encode(t) for t in texts]``, tokenized in parallel by the library."""
    return [e.ids for e in self._tok.encode_batch(list(texts),
                                                  add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def fingerprint(self) -> dict:
    return {"kind": "hf", "sha256": self._hash, "eos_id": self.eos_id}


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int) -> str:
  """Trains a unigram SentencePiece model on ``texts``; returns the ``.model`` path.

  Args:
    texts: documents (each may hold many lines).
    model_prefix: output path without extension (``DIR/spm`` writes ``DIR/spm.model``); may be
      a URL (``gs://...``): the model is trained locally, then copied there.
    vocab_size: pieces, including ``<pad>=0``, ``<unk>=1``, ``<s>=2``, ``</s>=3``.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  target = _path(model_prefix + ".model")
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  with tempfile.TemporaryDirectory(prefix="nlx_spm_") as tmp:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size,
          model_type="unigram", character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2,
          eos_id=3, byte_fallback=True, input_sentence_size=2_000_000,
          shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
      raise ValueError(f"data.spm_vocab_size={vocab_size}: SentencePiece training failed on "
                       f"this corpus ({e}); allowed: a size the corpus supports (byte fallback "
                       "needs 256 + its characters)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.tmp-{os.getpid()}"
    with open(os.path.join(tmp, "spm.model"), "rb") as src, partial.open("wb") as dst:
      shutil.copyfileobj(src, dst)
    partial.replace(target)  # complete or absent: a killed copy leaves no half model
  return model_prefix + ".model"


def build_tokenizer(kind: str, spm_model: Optional[str] = None,
                    train_texts: Optional[Iterable[str]] = None, spm_vocab_size: int = 1024,
                    workdir: Optional[str] = None, tokenizer_file: Optional[str] = None):
  """The tokenizer of ``data.tokenizer``.

  Args:
    kind: ``"byte"``, ``"sentencepiece"`` or ``"hf"``.
    spm_model: a ``.model`` to load; None trains one on ``train_texts``.
    train_texts: the training documents (SentencePiece training only).
    spm_vocab_size: the vocabulary of a trained model.
    workdir: where a trained model is written (``workdir/spm.model``); reused when present.
    tokenizer_file: the ``tokenizer.json`` of ``"hf"`` (default ``workdir/tokenizer.json``).
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind == "hf":
    if tokenizer_file is None and workdir is None:
      raise ValueError("data.tokenizer='hf' needs data.tokenizer_file (a tokenizer.json)")
    return HFTokenizer(tokenizer_file or os.path.join(workdir, "tokenizer.json"))
  if kind != "sentencepiece":
    raise ValueError(f"data.tokenizer={kind!r} is not allowed; allowed: ['byte', "
                     "'sentencepiece', 'hf']")
  if spm_model:
    return SentencePieceTokenizer(spm_model)
  if workdir is None:
    raise ValueError("data.spm_model=None: training a SentencePiece model needs a workdir")
  path = os.path.join(workdir, "spm.model")
  if not _path(path).is_file():
    if train_texts is None:
      raise ValueError("data.spm_model=None and no training text to train one on")
    train_sentencepiece(train_texts, os.path.join(workdir, "spm"), spm_vocab_size)
  return SentencePieceTokenizer(path)


def from_config(data, workdir: Optional[str] = None, train_texts: Optional[Iterable[str]] = None):
  """The tokenizer of a ``DataConfig`` (``config.data``) for a run in ``workdir``."""
  return build_tokenizer(data.tokenizer, data.spm_model, train_texts, data.spm_vocab_size,
                         workdir, data.tokenizer_file)
