"""Prompt + answer batches of bytes and teacher-forced answer scoring (``experiments.niah``,
``experiments.babi_long``).

A question-answering example is a ``prompt`` string and its ``answer`` string. Its byte tokens
``prompt + answer`` become one row of a ``study.Batch``: the loss mask is 1 on the positions that
predict the answer's bytes and ``context_weight`` on the others (some language-model loss on the
haystack), and rows are right-padded with zeros (causal models: padding after the answer changes
nothing before it).

Scoring is teacher-forced: one forward pass over ``prompt + answer``, and the prediction is the
argmax at every answer position. The predicted string equals the answer exactly when greedy
decoding (temperature 0) would start with the answer, so exact match here is greedy decoding's
exact match, at the cost of one forward pass instead of a prefill and a decoding loop.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from experiments import study

PAD = 0  # the ByteTokenizer's end-of-document id, never inside a text


def encode(text: str) -> list[int]:
  """UTF-8 bytes of ``text`` (byte ids 1..255; NUL dropped, as in ``ByteTokenizer``)."""
  return [b for b in text.encode("utf-8") if b != PAD]


def decode(ids: Sequence[int]) -> str:
  """The text of byte ids (padding dropped)."""
  return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


def answer_row(prompt: str, answer: str, length: int,
               context_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One row ``(inputs [length], targets [length], mask [length])`` of ``prompt + answer``.

  Args:
    prompt, answer: the answer follows the prompt directly (put any separator in the prompt).
    length: the row length; ``len(bytes(prompt + answer)) - 1`` must not exceed it.
    context_weight: the mask on the positions that predict prompt bytes (0: answer-only loss).

  Raises:
    ValueError: when the example does not fit in ``length``.
  """
  p, a = encode(prompt), encode(answer)
  ids = p + a
  if len(ids) - 1 > length or not a or not p:
    raise ValueError(f"prompt ({len(p)} bytes) + answer ({len(a)} bytes) do not fit in a row of "
                     f"{length} tokens (or one of them is empty)")
  inputs = np.full(length, PAD, np.int32)
  targets = np.full(length, PAD, np.int32)
  mask = np.zeros(length, np.float32)
  inputs[:len(ids) - 1] = ids[:-1]
  targets[:len(ids) - 1] = ids[1:]
  mask[:len(p) - 1] = context_weight
  mask[len(p) - 1:len(ids) - 1] = 1.0
  return inputs, targets, mask


def answer_batch(pairs: Sequence[tuple[str, str]], length: int,
                 context_weight: float = 0.0) -> study.Batch:
  """A ``study.Batch`` ``[B, length]`` of ``(prompt, answer)`` pairs (see ``answer_row``)."""
  rows = [answer_row(p, a, length, context_weight) for p, a in pairs]
  return study.Batch(*(np.stack(column) for column in zip(*rows)))


def predicted_answers(model, pairs: Sequence[tuple[str, str]], length: int,
                      batch_size: int = 4) -> list[str]:
  """The teacher-forced greedy prediction of each pair's answer (as many bytes as the answer)."""
  out = []
  for start in range(0, len(pairs), batch_size):
    chunk = list(pairs[start:start + batch_size])
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape per length
    batch = answer_batch(chunk, length)
    predictions = study.predict(model, batch.inputs)
    for row in range(len(pairs[start:start + batch_size])):
      hit = batch.mask[row] > 0
      out.append(decode(predictions[row][hit]))
  return out


def char_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of answer characters predicted right (position by position)."""
  right = total = 0
  for p, a in zip(predictions, answers):
    right += sum(x == y for x, y in zip(p, a))
    total += len(a)
  return right / max(total, 1)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their answer."""
  return float(np.mean([p == a for p, a in zip(predictions, answers)])) if answers else 0.0


def train_and_score(cfg, batch_fn: Callable, settings: dict, seed: int, family: str,
                    score_fn: Callable, curve_fn: Optional[Callable] = None,
                    curve_every: int = 0) -> dict:
  """Trains ``cfg`` on ``batch_fn`` (``settings["steps"]`` steps at ``settings["lr"]``) and scores
  the model with ``score_fn(model)``: the results row of one family.

  ``curve_fn(model)`` (a dict of numbers), when given with ``curve_every > 0``, runs every
  ``curve_every`` steps and after the last: the row's ``curve`` (the training curve of a sanity
  metric); the row's ``loss_curve`` is the mean training loss of every ``curve_every`` steps (every
  10 steps without a curve). ``settings["run_seconds"]`` (if set) caps the training's wall time:
  a run cut by it records the steps it ran (``steps``) and ``"cut": True``."""
  trained = study.train(cfg, batch_fn, settings["steps"], lr=settings["lr"], seed=seed,
                        desc=family, evaluate=curve_fn if curve_every else None,
                        eval_every=curve_every if curve_fn else 0,
                        max_seconds=settings.get("run_seconds") or None)
  start = time.time()
  scores = score_fn(trained.model)
  window = curve_every or 10
  losses = np.asarray(trained.losses, np.float64)
  loss_curve = [{"step": min(i + window, len(losses)), "loss": float(np.mean(losses[i:i + window]))}
                for i in range(0, len(losses), window)]
  return {"params": trained.params, "train_seconds": trained.seconds,
          "tokens_per_second": trained.tokens_per_second, "eval_seconds": time.time() - start,
          "first_loss": trained.losses[0], "final_loss": float(np.mean(trained.losses[-10:])),
          "skipped_steps": trained.skipped, "loss_curve": loss_curve, "steps": len(losses),
          "cut": len(losses) < settings["steps"],
          "curve": list(trained.evals), "scores": scores}
