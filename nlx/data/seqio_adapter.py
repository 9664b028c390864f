"""seqio adapter (extra ``nlx[seqio]``): the text of a registered seqio task feeds nlx's pipeline.

``iter_documents(name, split)`` streams the ``text`` feature of the examples of a registered task
(``seqio.TaskRegistry``) as documents (``ds.as_numpy_iterator()``, one example at a time);
``TaskDocuments`` is the task as a source of the token cache (``nlx.data.streams``), and
``task_documents`` the list of the in-memory path. nlx then tokenizes and packs them like any
other source, so a T5-style task or mixture trains with the same trainer.

A task defined in a module of one's own is registered by importing that module:
``data.seqio_module=("my_tasks",)`` (``--config.data.seqio_module='("my_tasks",)'``) imports each
module before the task is looked up (``import_modules``). ``text_file_task(name, train, valid)``
registers a task over local text files (one example per line).
"""

from __future__ import annotations

import importlib
from typing import Iterator, Optional, Sequence

from nlx.data import streams
from nlx.errors import ConfigError


def _seqio():
  try:
    import seqio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("data.source='seqio' needs the seqio extra: pip install 'nlx[seqio]' "
                     f"({e})") from None
  return seqio


def import_modules(modules: Optional[Sequence[str]]) -> None:
  """Imports each of ``data.seqio_module`` (the modules that register the tasks).

  Raises:
    ConfigError: a module cannot be imported (naming it and why).
  """
  for name in modules or ():
    try:
      importlib.import_module(name)
    except Exception as e:  # pylint: disable=broad-except  (any error of the user's module)
      raise ConfigError(f"data.seqio_module: cannot import {name!r} ({type(e).__name__}: {e}); "
                        "allowed: modules importable from this Python (on sys.path / "
                        "PYTHONPATH) that register seqio tasks") from None


def text_file_task(name: str, train_path: str, validation_path: str):
  """Registers (once) a seqio task whose ``text`` feature is each line of the files."""
  seqio = _seqio()
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  source = seqio.TextLineDataSource({"train": train_path, "validation": validation_path})
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=[lambda ds: ds.map(lambda line: {"text": line})],
      output_features={"text": seqio.Feature(seqio.PassThroughVocabulary(1), dtype=_tf_string(),
                                              add_eos=False, rank=0)})


def _tf_string():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (seqio depends on it)
  return tf.string


def _task(name: str):
  seqio = _seqio()
  if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
    raise ValueError(f"data.seqio_task={name!r} is not a registered seqio task; registered: "
                     f"{sorted(seqio.TaskRegistry.names())[:20]} (a task defined in a module "
                     "of yours: data.seqio_module=('that_module',))")
  return seqio.get_mixture_or_task(name)


def iter_documents(name: str, split: str) -> Iterator[str]:
  """The ``text`` feature of the examples of task ``name``'s ``split``, one at a time."""
  ds = _task(name).get_dataset(split=split, shuffle=False)
  for example in ds.as_numpy_iterator():
    text = example["text"]
    yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def task_documents(name: str, split: str) -> list[str]:
  """The ``text`` feature of every example of task ``name``'s ``split``, as strings."""
  return list(iter_documents(name, split))


class TaskDocuments(streams.Documents):
  """A registered task's ``train`` then ``validation`` examples, one document each."""

  def __init__(self, name: str, modules: Optional[Sequence[str]] = None):
    self.name, self.modules = name, tuple(modules or ())

  def fingerprint(self) -> dict:
    return {"source": "seqio", "task": self.name, "modules": list(self.modules)}

  def pieces(self) -> Iterator[streams.Piece]:
    import_modules(self.modules)
    n = 0
    for text in iter_documents(self.name, "train"):
      yield text, True
      n += 1
    self.n_train = n
    for text in iter_documents(self.name, "validation"):
      yield text, True
