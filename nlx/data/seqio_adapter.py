"""seqio adapter (extra ``nlx[seqio]``): the text of a registered seqio task feeds nlx's pipeline.

``task_documents(name, split)`` reads the ``text`` feature of every example of a registered task
(``seqio.TaskRegistry``) as a document; nlx then tokenizes and packs it like any other source, so
a T5-style task or mixture trains with the same trainer. ``text_file_task(name, train, valid)``
registers a task over local text files (one example per line).
"""

from __future__ import annotations


def _seqio():
  try:
    import seqio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("data.source='seqio' needs the seqio extra: pip install 'nlx[seqio]' "
                     f"({e})") from None
  return seqio


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


def task_documents(name: str, split: str) -> list[str]:
  """The ``text`` feature of every example of task ``name``'s ``split``, as strings."""
  seqio = _seqio()
  if name not in seqio.TaskRegistry.names():
    raise ValueError(f"data.seqio_task={name!r} is not a registered seqio task; registered: "
                     f"{sorted(seqio.TaskRegistry.names())[:20]}")
  ds = seqio.get_mixture_or_task(name).get_dataset(split=split, shuffle=False)
  return [ex["text"].decode("utf-8") for ex in ds.as_numpy_iterator()]
