"""Zero-shot multiple choice by log-likelihood, as lm-eval-harness scores it.

For each example, each choice's continuation is scored given the context: ``acc`` picks the
largest ``sum log p(continuation)``, ``acc_norm`` the largest ``sum log p / len(continuation in
characters)``. WinoGrande uses partial scoring (lm-eval's): the choices are contexts and the
shared continuation is scored after each. LAMBADA reports ``acc`` (the continuation is the greedy
decode) and the perplexity of the continuations.

Loaders read the files of a data directory (docs/TRAINING.md, "Evaluation data", names each
file and its public source) into ``Example``s with the prompts of lm-eval-harness:
``"Question: {q}\\nAnswer:"`` + ``" {choice}"`` (PIQA, ARC, SIQA),
``"{passage}\\nQuestion: {q}?\\nAnswer:"`` + ``" no"|" yes"`` (BoolQ), HellaSwag's
``"{activity}: {ctx}"`` + ``" {ending}"``.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import math
import os
import re
from typing import Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """``contexts`` (one, or one per choice) and ``continuations`` (one per choice, or one)."""

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  gold: int

  @property
  def n_choices(self) -> int:
    return max(len(self.contexts), len(self.continuations))

  def pair(self, i: int) -> tuple[str, str]:
    return (self.contexts[i if len(self.contexts) > 1 else 0],
            self.continuations[i if len(self.continuations) > 1 else 0])


def _jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _qa(question: str, choices: Sequence[str], gold: int) -> Example:
  return Example((f"Question: {question}\nAnswer:",), tuple(" " + c for c in choices), gold)


def load_piqa(data_dir: str) -> list[Example]:
  records = _jsonl(os.path.join(data_dir, "piqa", "valid.jsonl"))
  with open(os.path.join(data_dir, "piqa", "valid-labels.lst"), encoding="utf-8") as f:
    labels = [int(x) for x in f.read().split()]
  return [_qa(r["goal"], [r["sol1"], r["sol2"]], y) for r, y in zip(records, labels)]


def load_hellaswag(data_dir: str) -> list[Example]:
  with bz2.open(os.path.join(data_dir, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt",
                encoding="utf-8") as f:
    lines = f.read().split("\n")
  examples = []
  for i in range(0, len(lines) - 5, 6):
    examples.append(Example((lines[i],), tuple(" " + e for e in lines[i + 2:i + 6]),
                            int(lines[i + 1])))
  return examples


def load_winogrande(data_dir: str) -> list[Example]:
  records = _jsonl(os.path.join(data_dir, "winogrande", "winogrande_dev.llmfoundry.jsonl"))
  return [Example(tuple(r["context_options"]), (" " + r["continuation"],), int(r["gold"]))
          for r in records]


def _adapters(path: str) -> list[Example]:
  """LLM-Adapters' ARC/SIQA: the question and ``AnswerN: text`` choices in one instruction."""
  with open(path, encoding="utf-8") as f:
    records = json.load(f)
  examples = []
  for r in records:
    body = r["instruction"].split("question:", 1)[1].rsplit("Answer format:", 1)[0]
    question, _, answers = body.strip().partition("\n\n")
    choices = [c.strip() for c in re.split(r"Answer\d+:", answers) if c.strip()]
    gold = int(re.search(r"\d+", r["answer"]).group()) - 1
    examples.append(_qa(question.strip(), choices, gold))
  return examples


def load_boolq(data_dir: str) -> list[Example]:
  records = _jsonl(os.path.join(data_dir, "boolq", "boolq_dev.llmfoundry.jsonl"))
  return [Example((r["query"] + "\nAnswer:",), tuple(" " + c for c in r["choices"]),
                  int(r["gold"])) for r in records]


def load_lambada(data_dir: str) -> list[Example]:
  """The last word is the continuation, after a space (lm-eval's ``" " + word``: llm-foundry's
  file strips the space between context and word, which would score ``"...aboutsigns"``)."""
  records = _jsonl(os.path.join(data_dir, "lambada", "lambada_openai_test.llmfoundry.jsonl"))
  return [Example((r["context"],), (_spaced(r["context"], r["continuation"]),), 0)
          for r in records]


def _spaced(context: str, continuation: str) -> str:
  if not context or context[-1].isspace() or continuation[:1].isspace():
    return continuation
  return " " + continuation


TASKS: dict[str, Callable[[str], list[Example]]] = {
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "arc_easy": lambda d: _adapters(os.path.join(d, "arc", "arc_easy_test.llm_adapters.json")),
    "arc_challenge": lambda d: _adapters(os.path.join(d, "arc",
                                                      "arc_challenge_test.llm_adapters.json")),
    "boolq": load_boolq,
    "siqa": lambda d: _adapters(os.path.join(d, "siqa", "siqa_dev.llm_adapters.json")),
    "lambada": load_lambada,
}


def load_task(name: str, data_dir: str) -> list[Example]:
  if name not in TASKS:
    raise ValueError(f"task {name!r} is not known; allowed: {sorted(TASKS)}")
  if not os.path.isdir(data_dir):
    raise ValueError(f"--data_dir {data_dir!r} does not exist; it should hold the task files "
                     "(piqa/valid.jsonl, hellaswag/hellaswag_val_full.txt.bz2, ...: docs/"
                     "TRAINING.md, 'Evaluation data', lists each file and its source)")
  return TASKS[name](data_dir)


def evaluate(scorer, tokenizer, examples: Sequence[Example], limit: Optional[int] = None) -> dict:
  """``{"acc", "acc_norm", "n"}``. Single continuations (LAMBADA): ``acc``, ``ppl`` per token
  of the continuations and ``ppl_continuation``, lm-eval's ``exp(−mean log p(continuation))``
  (per word for LAMBADA, the paper's "LMB ppl")."""
  examples = list(examples)[:limit] if limit else list(examples)
  pairs, index = [], []
  for e_i, example in enumerate(examples):
    for c_i in range(example.n_choices):
      context, continuation = example.pair(c_i)
      pairs.append((tokenizer.encode(context), tokenizer.encode(continuation)))
      index.append((e_i, c_i, len(continuation)))
  scores = scorer.score(pairs)
  per_example = [[] for _ in examples]
  for (e_i, _, chars), (logp, greedy) in zip(index, scores):
    per_example[e_i].append((logp, chars, greedy))
  if all(e.n_choices == 1 for e in examples):
    n_tokens = sum(len(p[1]) for p in pairs)
    nll = -sum(s[0][0] for s in per_example)
    return {"acc": sum(s[0][2] for s in per_example) / len(examples),
            "ppl": math.exp(nll / n_tokens),
            "ppl_continuation": math.exp(nll / len(examples)), "n": len(examples)}
  acc = sum(_argmax([s[0] for s in ss]) == e.gold for ss, e in zip(per_example, examples))
  acc_norm = sum(_argmax([s[0] / s[1] for s in ss]) == e.gold
                 for ss, e in zip(per_example, examples))
  return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "n": len(examples)}


def _argmax(values: Sequence[float]) -> int:
  return max(range(len(values)), key=lambda i: values[i])
