"""The data of ``experiments.continual``: the three class-incremental datasets, their class
split into tasks, label bytes, encoded examples, training batches and in-context prefixes.

The datasets are read from the datasets directory (``--data DIR``, else ``$NLX_DATA``), each in
the layout of its public release (``DATASET_FILES``): CLINC150 ``clinc150/data_full.json``,
Banking77 ``banking77/{train,test}.csv``, DBpedia-14 ``dbpedia14/olora_test.json`` (a 7,600-example
test subset, split here in halves per class).
"""

from __future__ import annotations

import csv
import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from experiments import study
from nlx.data.tokenizers import ByteTokenizer

DATASETS = ("clinc150", "banking77", "dbpedia14")
PROMPT = "\nlabel: "
# Per dataset: its files under the datasets directory, and where they come from.
DATASET_FILES = {
    "clinc150": (("clinc150/data_full.json",),
                 "clinc150/data_full.json (CLINC150: clinc/oos-eval, data/data_full.json)"),
    "banking77": (("banking77/train.csv", "banking77/test.csv"),
                  "banking77/train.csv and banking77/test.csv (Banking77: "
                  "PolyAI-LDN/task-specific-datasets, banking_data/{train,test}.csv)"),
    "dbpedia14": (("dbpedia14/olora_test.json",),
                  "dbpedia14/olora_test.json (DBpedia-14: cmnfriend/O-LoRA, "
                  "CL_Benchmark/TC/dbpedia/test.json)"),
}


# ---------------------------------------------------------------------------------------------
# Data: examples, class split, label tokens
# ---------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: Optional[str], seed: int) -> dict:
  """``{"train": {class: [texts]}, "test": {class: [texts]}}`` of one dataset under the datasets
  directory ``data_dir`` (the ``--data`` value; None: ``$NLX_DATA``).

  DBpedia has only a test file here: each class's examples are shuffled with ``seed`` and split
  in halves (train, test).

  Raises:
    ValueError: an unknown dataset.
    study.DataNotFound: no datasets directory, or the dataset's files are not in it (one line).
  """
  if name not in DATASETS:
    raise ValueError(f"--datasets: unknown dataset {name!r}; allowed: {list(DATASETS)}")
  path = os.path.join(study.data_dir(data_dir, *DATASET_FILES[name]), name)
  return {"clinc150": _clinc, "banking77": _banking, "dbpedia14": _dbpedia}[name](path, seed)


def _group(pairs) -> dict:
  out: dict = {}
  for text, label in pairs:
    out.setdefault(label, []).append(text)
  return out


def _clinc(path: str, seed: int) -> dict:
  del seed
  with open(os.path.join(path, "data_full.json"), encoding="utf-8") as f:
    raw = json.load(f)
  return {split: _group(raw[split]) for split in ("train", "test")}


def _banking(path: str, seed: int) -> dict:
  del seed
  out = {}
  for split in ("train", "test"):
    with open(os.path.join(path, f"{split}.csv"), encoding="utf-8", newline="") as f:
      out[split] = _group((row["text"], row["category"]) for row in csv.DictReader(f))
  return out


def _dbpedia(path: str, seed: int) -> dict:
  with open(os.path.join(path, "olora_test.json"), encoding="utf-8") as f:
    by_class = _group((r["sentence"], r["label"]) for r in json.load(f))
  train, test = {}, {}
  for k, label in enumerate(sorted(by_class)):
    texts = by_class[label]
    order = np.random.default_rng([seed, k]).permutation(len(texts))
    half = len(texts) // 2
    train[label] = [texts[i] for i in order[:half]]
    test[label] = [texts[i] for i in order[half:]]
  return {"train": train, "test": test}


def class_split(classes: Sequence[str], n_tasks: int, per_task: int,
                seed: int) -> list[list[str]]:
  """``n_tasks`` disjoint groups of ``per_task`` classes, drawn and ordered by ``seed``."""
  classes = sorted(classes)
  if n_tasks * per_task > len(classes):
    raise ValueError(f"{n_tasks} tasks x {per_task} classes needs {n_tasks * per_task} classes; "
                     f"the dataset has {len(classes)}")
  order = np.random.default_rng(seed).permutation(len(classes))[:n_tasks * per_task]
  return [[classes[i] for i in order[t * per_task:(t + 1) * per_task]] for t in range(n_tasks)]


def label_token(k: int) -> int:
  """The byte of class number ``k`` (task order): ``A``-``Z``, ``a``-``z``, then 128 + k - 52."""
  if k < 26:
    return ord("A") + k
  if k < 52:
    return ord("a") + k - 26
  if k < 52 + 128:
    return 128 + k - 52
  raise ValueError(f"class number {k} has no label byte (at most 180 classes)")


def clean(text: str, max_bytes: int) -> list[int]:
  """Byte ids of ``text`` with whitespace runs as one space, cut to ``max_bytes``."""
  return ByteTokenizer().encode(" ".join(text.split()))[:max_bytes]


class Examples(NamedTuple):
  """Token rows: ``tokens [N, T]`` (0-padded), ``pos [N]`` (the index whose next token is the
  label), ``label [N]`` (the label byte)."""

  tokens: np.ndarray
  pos: np.ndarray
  label: np.ndarray


def encode_examples(items: Sequence[tuple[list[int], int]], seq_len: int,
                    prefix: Sequence[int] = ()) -> Examples:
  """``prefix + text + "\\nlabel: "`` per ``(text ids, label byte)``, right-padded to
  ``seq_len`` (the prefix is cut from the left if too long)."""
  prompt = ByteTokenizer().encode(PROMPT)
  tokens = np.zeros((len(items), seq_len), np.int32)
  pos, label = np.zeros(len(items), np.int32), np.zeros(len(items), np.int32)
  for row, (text, lab) in enumerate(items):
    seq = (list(prefix) + list(text) + prompt)[-seq_len:]
    tokens[row, :len(seq)] = seq
    pos[row], label[row] = len(seq) - 1, lab
  return Examples(tokens, pos, label)


def task_items(data: dict, split: str, classes: Sequence[str], tokens: dict, n: int,
               max_text: int, seed: int) -> list[tuple[list[int], int]]:
  """The first ``n`` examples (after a seeded shuffle) of each class: ``(text ids, byte)``."""
  items = []
  for name in classes:
    texts = data[split][name]
    order = np.random.default_rng([seed, tokens[name]]).permutation(len(texts))[:n]
    items += [(clean(texts[i], max_text), tokens[name]) for i in order]
  return items


def train_batch(ex: Examples, step: int, batch: int, seed: int) -> study.Batch:
  """Batch ``step`` of a task: rows drawn with (seed, step); loss on the label token only."""
  rows = np.random.default_rng([seed, step]).integers(0, len(ex.label), batch)
  tokens = ex.tokens[rows]
  targets = np.zeros_like(tokens)
  mask = np.zeros(tokens.shape, np.float32)
  targets[np.arange(batch), ex.pos[rows]] = ex.label[rows]
  mask[np.arange(batch), ex.pos[rows]] = 1.0
  return study.Batch(tokens, targets, mask)


class Task(NamedTuple):
  train: Examples
  test: Examples
  tokens: list  # label bytes of the task's classes
  classes: list  # their names


def make_tasks(data: dict, s: dict, seed: int) -> list[Task]:
  """The tasks of one dataset: class split, label bytes, encoded train and test examples
  (``classes_per_task``, or fewer when the dataset has too few classes)."""
  per_task = min(s["classes_per_task"], len(data["test"]) // s["n_tasks"])  # DBpedia: 14
  groups = class_split(sorted(data["test"]), s["n_tasks"], per_task, seed)
  byte_of = {name: label_token(k) for k, name in enumerate(c for g in groups for c in g)}
  tasks = []
  for group in groups:
    items = lambda split, n: task_items(data, split, group, byte_of, n, s["max_text"], seed)
    tasks.append(Task(encode_examples(items("train", s["n_train"]), s["seq_len"]),
                      encode_examples(items("test", s["n_test"]), s["seq_len"]),
                      [byte_of[c] for c in group], list(group)))
  return tasks


def icl_prefix(tasks: list[Task], upto: int, s: dict, seed: int) -> list[int]:
  """``icl_shots`` labelled training examples per seen class, seeded order, as byte ids."""
  shots = []
  for task in tasks[:upto + 1]:
    for b in task.tokens:
      rows = np.flatnonzero(task.train.label == b)[:s["icl_shots"]]
      shots += [(task.train.tokens[r, :task.train.pos[r] + 1], b) for r in rows]
  order = np.random.default_rng([seed, upto]).permutation(len(shots))
  prompt = ByteTokenizer().encode(PROMPT)
  out = []
  for k in order:
    row, b = shots[k]
    text = list(row[:len(row) - len(prompt)])[:s["icl_text"]]
    out += text + prompt + [b, ord("\n")]
  return out
