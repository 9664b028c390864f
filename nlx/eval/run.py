"""``nlx eval``: perplexity, zero-shot multiple choice and S-NIAH on a trained workdir.

* ``nlx eval --workdir DIR --task ppl --path FILE.txt``: token-level perplexity (and bits per
  byte) of a text file, over windows of ``train.seq_len``; with ``--state FILE``, of the whole
  text read as the continuation of a session (``nlx.eval.session``), which is then saved.
* ``nlx eval --workdir DIR --task ppl --path FILE.jsonl``: perplexity over documents (one per
  record, the text in the run's ``data.text_field``), each scored alone: packed rows with
  segment ids, so no document conditions on another (``perplexity_of_documents``).
* ``nlx eval --workdir DIR --task piqa --data_dir DATA [--limit N]``: acc and acc_norm
  (any of ``multiple_choice.TASKS``, or ``--task all``).
* ``nlx eval --workdir DIR --task s_niah_1 --length 2000 --n 20``: RULER-style needle accuracy.

``--workdir`` and ``--checkpoint_dir`` may be ``gs://`` URLs (``nlx.train.trained.load``).
Prints one JSON line per task.
"""

from __future__ import annotations

import argparse
import json
import math
import os

# Task names only: this module is imported to build the CLI, without JAX.
MC_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "siqa",
            "lambada")
NIAH_TASKS = ("s_niah_1", "s_niah_2", "s_niah_3")
ALL_TASKS = ("ppl",) + MC_TASKS + NIAH_TASKS + ("all",)


def configure_parser(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True,
                      help="the workdir of 'nlx train' (local or gs://BUCKET/PATH)")
  parser.add_argument("--task", required=True, choices=ALL_TASKS, metavar="TASK",
                      help=f"one of {', '.join(ALL_TASKS)} ('all': every multiple-choice task)")
  parser.add_argument("--checkpoint_dir", default=None,
                      help="its checkpoints, if not WORKDIR/checkpoints (local or gs://)")
  parser.add_argument("--path", help="--task ppl: a text file (one document) or a .jsonl file "
                      "(a document per record, each scored alone)")
  parser.add_argument("--state", default=None, metavar="FILE",
                      help="--task ppl only: score the text as the continuation of this session "
                      "file (restored when it exists, then saved; nlx.eval.session)")
  parser.add_argument("--data_dir", default=None,
                      help="the directory of the multiple-choice datasets (default: $NLX_DATA)")
  parser.add_argument("--limit", type=int, default=None, help="first N examples per task")
  parser.add_argument("--length", type=int, default=2000, help="S-NIAH haystack characters")
  parser.add_argument("--n", type=int, default=20, help="S-NIAH examples")
  parser.add_argument("--seed", type=int, default=0, help="the seed of S-NIAH's needles")


def perplexity(model, tokenizer, text: str, seq_len: int, batch_size: int = 8) -> dict:
  """Perplexity of ``text`` over non-overlapping windows of ``seq_len`` tokens."""
  from nlx.data import pipeline  # pylint: disable=g-import-not-at-top
  from nlx.eval import loglik  # pylint: disable=g-import-not-at-top
  windows = pipeline.pack([text], tokenizer, seq_len)
  scorer = loglik.Scorer(model, max_len=seq_len, batch_size=batch_size)
  scores = scorer.score([([int(w[0])], [int(t) for t in w[1:]]) for w in windows])
  nll = -sum(s[0] for s in scores)
  n_tokens = windows.shape[0] * seq_len
  n_bytes = len(text.encode("utf-8")) * n_tokens / max(len(tokenizer.encode(text)), 1)
  return {"task": "ppl", "ppl": math.exp(nll / n_tokens), "bits_per_byte":
          nll / n_bytes / math.log(2), "tokens": n_tokens}


def perplexity_of_documents(model, tokenizer, documents, seq_len: int, batch_size: int = 8,
                            packed: bool = True) -> dict:
  """Perplexity over ``documents``, each scored alone (``loglik.DocumentScorer``).

  A document is its tokens and the end-of-document id; every token but its first is a target,
  predicted from the tokens before it in its document (within windows of ``seq_len + 1`` tokens:
  a longer document is cut as the unpacked windows are). Rows pack several documents with
  segment ids (``packed``; False: a row per piece, the same numbers). The aggregate is
  token-weighted: ``ppl = exp(sum of the documents' nll / sum of their targets)``, every target
  counting once (a long document weighs more than a short one).

  Returns:
    ``{"task": "ppl", "ppl", "bits_per_byte", "tokens": targets scored, "documents"}``;
    ``bits_per_byte`` is the nll over the documents' UTF-8 bytes.
  """
  from nlx.eval import loglik  # pylint: disable=g-import-not-at-top
  documents = list(documents)
  ids = [list(tokenizer.encode(d)) + [tokenizer.eos_id] for d in documents]
  if not any(len(i) > 1 for i in ids):
    raise ValueError(f"documents: none of the {len(documents)} documents has a token to score "
                     "(each needs at least one token before its end-of-document id)")
  scores = loglik.DocumentScorer(model, seq_len, batch_size, packed).score(ids)
  nll, n_tokens = -sum(s for s, _ in scores), sum(n for _, n in scores)
  n_bytes = sum(len(d.encode("utf-8")) for d in documents)
  return {"task": "ppl", "ppl": math.exp(min(nll / n_tokens, 50.0)),
          "bits_per_byte": nll / max(n_bytes, 1) / math.log(2), "tokens": n_tokens,
          "documents": len(documents)}


def run_parsed(args) -> int:
  from nlx.data import sources  # pylint: disable=g-import-not-at-top
  from nlx.eval import loglik, multiple_choice, niah, sampling  # pylint: disable=g-import-not-at-top
  from nlx.train import trained  # pylint: disable=g-import-not-at-top
  if args.state and args.task != "ppl":
    raise ValueError(f"--state is a flag of --task ppl, not --task {args.task}")
  t = trained.load(args.workdir, args.checkpoint_dir)
  if args.task == "ppl":
    if not args.path:
      raise ValueError("--task ppl needs --path FILE.txt")
    if args.path.endswith(".jsonl"):
      if args.state:
        raise ValueError(f"--state reads one text as a session; --path {args.path!r} holds "
                         "documents (a .jsonl file): score them without --state")
      documents = sources.file_documents(args.path, t.run.data.text_field)
      print(json.dumps(perplexity_of_documents(t.model, t.tokenizer, documents,
                                               t.run.train.seq_len)))
      return 0
    with open(args.path, encoding="utf-8") as f:
      text = f.read()
    if args.state:
      from nlx.eval import session  # pylint: disable=g-import-not-at-top
      result = session.score_text(t.model, t.tokenizer, text, args.state,
                                  piece=t.run.train.seq_len, step=t.step)
      print(json.dumps({"task": "ppl", "state": args.state, **result}))
    else:
      print(json.dumps(perplexity(t.model, t.tokenizer, text, t.run.train.seq_len)))
    return 0
  if args.task in NIAH_TASKS:
    haystack = sources.load_documents(t.run.data)[1][0]
    examples = [niah.make_example(args.task, haystack, args.length, args.seed, i)
                for i in range(args.n)]
    predictions = [sampling.generate_text(t.model, t.tokenizer, e.prompt, 12, temperature=0.0)
                   for e in examples]
    print(json.dumps({"task": args.task, "acc": niah.score(predictions, examples),
                      "n": args.n, "length_chars": args.length}))
    return 0
  data_dir = args.data_dir or os.environ.get("NLX_DATA")
  if not data_dir:
    raise ValueError(f"--task {args.task} reads its dataset from --data_dir (or $NLX_DATA): a "
                     "directory with the multiple-choice files (docs/TRAINING.md, 'Evaluation "
                     "data', lists each file and its source)")
  scorer = loglik.Scorer(t.model, max_len=t.run.train.seq_len)
  for task in (MC_TASKS if args.task == "all" else (args.task,)):
    examples = multiple_choice.load_task(task, data_dir)
    print(json.dumps({"task": task, **multiple_choice.evaluate(scorer, t.tokenizer, examples,
                                                               args.limit)}), flush=True)
  return 0
