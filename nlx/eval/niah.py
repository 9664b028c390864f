"""RULER-style single needle-in-a-haystack tasks (S-NIAH-1/2/3), generators and scoring.

As in RULER (Hsieh et al., 2024):

* S-NIAH-1: a 7-digit number (the needle) in a haystack of a repeated noise passage ("The grass
  is green. The sky is blue. ...").
* S-NIAH-2: a 7-digit number in an essay haystack (here: the embedded corpus, or any text).
* S-NIAH-3: a UUID in an essay haystack.

The needle is "One of the special magic {kind} for {key} is: {value}." inserted at ``depth`` (a
fraction of the haystack); the prompt ends with "The special magic {kind} for {key} mentioned in
the provided text is". A prediction scores 1 when it contains the value (RULER's string match).
Each example is a pure function of ``(task, seed, index, length)``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Sequence

import numpy as np

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again. ")
TASKS = ("s_niah_1", "s_niah_2", "s_niah_3")
KEYS = ("apple", "river", "lantern", "copper", "violet", "harbor", "meadow", "falcon", "summit",
        "ember", "quartz", "willow", "glacier", "orchid", "canyon", "thistle")


@dataclasses.dataclass(frozen=True)
class NeedleExample:
  prompt: str
  answer: str
  depth: float


def make_example(task: str, haystack_text: str, length_chars: int, seed: int, index: int,
                 depth: float = None) -> NeedleExample:
  """One example of ``task`` whose haystack has about ``length_chars`` characters.

  Args:
    task: one of ``TASKS``.
    haystack_text: the essay haystack of S-NIAH-2/3 (ignored by S-NIAH-1).
    length_chars: haystack length in characters.
    seed, index: the example is a pure function of them.
    depth: where the needle goes (0 start .. 1 end); None draws it uniformly.
  """
  if task not in TASKS:
    raise ValueError(f"task {task!r} is not an S-NIAH task; allowed: {list(TASKS)}")
  rng = np.random.default_rng([seed, index, TASKS.index(task)])
  key = KEYS[rng.integers(len(KEYS))]
  if task == "s_niah_3":
    kind, value = "uuid", str(uuid.UUID(bytes=rng.bytes(16), version=4))
  else:
    kind, value = "number", str(rng.integers(1_000_000, 10_000_000))
  if task == "s_niah_1":
    haystack = (NOISE * (length_chars // len(NOISE) + 1))[:length_chars]
  else:
    if len(haystack_text) < 2:
      raise ValueError("S-NIAH-2/3 need a haystack text")
    start = int(rng.integers(max(len(haystack_text) - length_chars, 1)))
    haystack = (haystack_text * (length_chars // len(haystack_text) + 1))[start:start +
                                                                           length_chars]
  depth = float(rng.random()) if depth is None else depth
  cut = haystack.rfind(". ", 0, int(len(haystack) * depth))
  cut = 0 if cut < 0 else cut + 2
  needle = f"One of the special magic {kind}s for {key} is: {value}. "
  context = haystack[:cut] + needle + haystack[cut:]
  prompt = (f"{context}\nWhat is the special magic {kind} for {key} mentioned in the provided "
            f"text? The special magic {kind} for {key} mentioned in the provided text is")
  return NeedleExample(prompt, value, depth)


def score(predictions: Sequence[str], examples: Sequence[NeedleExample]) -> float:
  """Fraction of predictions that contain their example's answer."""
  if len(predictions) != len(examples):
    raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
  return float(np.mean([e.answer in p for p, e in zip(predictions, examples)]))
