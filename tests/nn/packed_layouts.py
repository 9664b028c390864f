"""Packed-document layouts for the tests of packed paths (tests/nn/test_*packed*.py)."""

import numpy as np


def layout(lengths, t):
  """``(segment_ids [B, t], documents as (row, lo, hi))`` for the document ``lengths`` of each row
  (each row's lengths sum to t); ids repeat across documents (0, 1, 0, ...): a new document
  starts where the id changes."""
  ids, docs = np.zeros((len(lengths), t), np.int32), []
  for row, sizes in enumerate(lengths):
    lo = 0
    for k, n in enumerate(sizes):
      ids[row, lo:lo + n] = k % 2
      docs.append((row, lo, lo + n))
      lo += n
    assert lo == t
  return ids, docs
