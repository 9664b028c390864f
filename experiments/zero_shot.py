"""Zero-shot commonsense reasoning of the language models trained by ``experiments.lm``.

The paper (docs/EQUATIONS.md §6, arXiv Table 2) reports, next to perplexity, LAMBADA (acc, ppl) and
the accuracy on PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, SIQA and BoolQ, scored zero-shot by
log-likelihood as lm-eval-harness does, and their average over the 8 tasks. This study scores every
model saved under ``--models`` (``<lm out>/models/<family>/``) the same way with
``nlx.eval.multiple_choice`` and ``nlx.eval.loglik.Scorer``: ``acc`` (largest summed
log-likelihood of a choice) and ``acc_norm`` (per character; HellaSwag, ARC, PIQA report it in
lm-eval), WinoGrande by partial scoring, LAMBADA acc (the last word is the greedy decode) and
perplexity. The average follows flash-linear-attention / Titans: acc_norm for HellaSwag and ARC-c,
acc elsewhere (LAMBADA acc included). The chance level of each task is measured on the examples
scored (mean of 1 / number of choices; BoolQ's majority class is given too).

Byte-level models see long contexts: each scored sequence keeps its last ``max_len`` bytes (at
``tiny`` and ``cpu``, the training length of lm.py, 128: the models are scored at the length they
learned).

``--scale cpu`` (about 15 minutes on 2 CPU cores) scores the models of ``python -m experiments.lm
--scale cpu`` (``--models`` defaults to ``runs/lm_cpu/models`` there: Transformer++, HOPE and
Transformer++ with embedding std 1.0, ~200k parameters, 3.07M bytes of PTB each) on the first 1,000
examples of every task (tiny: 200), at their training length of 128 bytes.

The tasks' files are read from the datasets directory (``--data DIR``, else ``$NLX_DATA``), in the
layout of docs/TRAINING.md's "Evaluation data" (``piqa/valid.jsonl``, ...), which names each file's
public source.

Commands (from the repository root)::

  python -m experiments.lm --scale tiny --data DATA          # trains and saves the models first
  python -m experiments.zero_shot --scale tiny --data DATA   # --limit 200 examples per task
  python -m experiments.lm --scale cpu --data DATA --out runs/lm_cpu   # 3.07M bytes per model
  python -m experiments.zero_shot --scale cpu --data DATA --out runs/zero_shot_cpu  # its models
  python -m experiments.zero_shot --scale cpu --data DATA --text ptb  # the tasks in PTB's alphabet
  python -m experiments.zero_shot --scale small --models runs/lm_small/models --out runs/zs_small
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np

from experiments import study
from nlx.data import tokenizers
from nlx.eval import loglik, multiple_choice

# Paper order (docs/EQUATIONS.md §6); the metric of each task in the paper's average.
TASKS = ("lambada", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "siqa",
         "boolq")
LABELS = {"lambada": "LMB acc", "piqa": "PIQA", "hellaswag": "Hella (norm)",
          "winogrande": "Wino", "arc_easy": "ARC-e", "arc_challenge": "ARC-c (norm)",
          "siqa": "SIQA", "boolq": "BoolQ"}
AVERAGE_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}  # others: acc
# The files nlx.eval.multiple_choice reads for each task, under the datasets directory.
FILES = {"lambada": ("lambada/lambada_openai_test.llmfoundry.jsonl",),
         "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
         "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
         "winogrande": ("winogrande/winogrande_dev.llmfoundry.jsonl",),
         "arc_easy": ("arc/arc_easy_test.llm_adapters.json",),
         "arc_challenge": ("arc/arc_challenge_test.llm_adapters.json",),
         "siqa": ("siqa/siqa_dev.llm_adapters.json",),
         "boolq": ("boolq/boolq_dev.llmfoundry.jsonl",)}
NORM_REPORTED = ("piqa", "hellaswag", "arc_easy", "arc_challenge")  # lm-eval reports acc_norm
NAMES = {"hope": "HOPE", "titans_lmm": "Titans (LMM)", "gated_deltanet": "Gated DeltaNet",
         "samba": "Samba", "transformer": "Transformer++",
         "transformer_std1": "Transformer++ (embedding std 1.0)"}
PRESETS = {
    "tiny": dict(limit=200, max_len=128, batch_size=32),  # lm.py's tiny seq_len
    # lm.py --scale cpu: the same 128-byte training windows, 3.07M tokens; 5x tiny's examples
    "cpu": dict(limit=1000, max_len=128, batch_size=32),
    "small": dict(limit=0, max_len=1024, batch_size=32),  # 0: every example
    "paper": dict(limit=0, max_len=2048, batch_size=32),
}


TEXTS = ("raw", "ptb")  # --text: the tasks as written, or in PTB's alphabet (ptb_text)


def ptb_text(text: str) -> str:
  """``text`` written as Mikolov's PTB is: lower case, numbers as ``N``, contractions split off
  (``it 's``, ``do n't``), every character PTB's training text lacks (capitals, digits, commas,
  periods, colons, question marks, quotes, brackets) a space, runs of spaces one. A byte model
  trained on PTB has never seen those bytes (docs/RESULTS.md, zero-shot at ``--scale cpu``); a
  leading space, which separates a continuation from its context, is kept."""
  lead = " " if text[:1].isspace() and text[:1] != "\n" else ""
  out = text.lower()
  out = re.sub(r"(\w)n't\b", r"\1 n't", out)
  out = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", out)
  out = re.sub(r"\d+(?:[.,]\d+)*", " N ", out)
  out = re.sub(r"[^a-zN'$&\n -]", " ", out)
  out = re.sub(r" *\n *", " \n ", out)
  out = re.sub(r" +", " ", out).strip(" ")
  return lead + out


def ptb_examples(examples: list) -> list:
  """``examples`` with every context and continuation through ``ptb_text``."""
  return [dataclasses.replace(e, contexts=tuple(ptb_text(c) for c in e.contexts),
                              continuations=tuple(ptb_text(c) for c in e.continuations))
          for e in examples]


def find_models(models_dir: str) -> list[str]:
  """The model directories (holding ``params.msgpack``) under ``models_dir``, in paper order."""
  hint = "run `python -m experiments.lm --scale tiny` (or --scale cpu --out runs/lm_cpu) first"
  if not os.path.isdir(models_dir):
    raise FileNotFoundError(f"--models={models_dir!r} does not exist; {hint}")
  names = [n for n in sorted(os.listdir(models_dir))
           if os.path.isfile(os.path.join(models_dir, n, "params.msgpack"))]
  if not names:
    raise FileNotFoundError(f"--models={models_dir!r} holds no saved model; {hint}")
  order = list(NAMES)
  return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def chance(examples) -> dict:
  """``{"chance": mean 1/choices, "majority": share of the most frequent gold index}``; 0 for
  single continuations (LAMBADA), whose accuracy is a greedy decode."""
  if all(e.n_choices == 1 for e in examples):
    return {"chance": 0.0, "majority": 0.0}
  golds = np.bincount([e.gold for e in examples])
  return {"chance": float(np.mean([1.0 / e.n_choices for e in examples])),
          "majority": float(golds.max() / len(examples))}


def average(row: dict) -> float:
  """The paper's 8-task average of a model's results ``{task: {"acc", "acc_norm"?}}``."""
  return float(np.mean([row[t][AVERAGE_METRIC.get(t, "acc")] for t in row]))


def score_models(model_dirs: dict, tasks: dict, s: dict) -> tuple[dict, dict]:
  """``({model: {task: metrics}}, {model: parameter count})`` for ``model_dirs {name: dir}`` and
  ``tasks {task: examples}``."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.ByteTokenizer()
  results, params = {}, {}
  bar = tqdm(total=len(model_dirs) * len(tasks), desc="zero-shot", unit="task",
             dynamic_ncols=True, leave=False)
  for name, directory in model_dirs.items():
    model, cfg = study.load_model(directory)
    if cfg.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"--models: {directory!r} has vocab_size {cfg.vocab_size}; byte-level "
                       "models (256) are expected")
    scorer = loglik.Scorer(model, max_len=s["max_len"], batch_size=s["batch_size"],
                           one_shape=True)
    params[name] = study.param_count(cfg)
    results[name] = {}
    for task, examples in tasks.items():
      start = time.time()
      r = multiple_choice.evaluate(scorer, tokenizer, examples)
      results[name][task] = dict(r, seconds=time.time() - start)
      bar.set_postfix(model=name, task=task)
      bar.update()
  bar.close()
  return results, params


def tables(results: dict, chances: dict, params: dict) -> str:
  tasks = list(chances)
  cols = (["model", "params"] + (["LMB ppl (word)", "LMB ppl (byte)"] if "lambada" in tasks
                                 else []) + [LABELS[t] for t in tasks] + ["Avg"])
  rows = []
  for name, row in results.items():
    ppl = ([f'{row["lambada"]["ppl_continuation"]:.4g}', f'{row["lambada"]["ppl"]:.4g}']
           if "lambada" in tasks else [])
    rows.append([NAMES.get(name, name), params[name]] + ppl +
                [100 * row[t][AVERAGE_METRIC.get(t, "acc")] for t in tasks] +
                [100 * average(row)])
  chance_row = {t: {"acc": chances[t]["chance"], "acc_norm": chances[t]["chance"]}
                for t in tasks}
  rows.append(["chance", "-"] + (["-", "-"] if "lambada" in tasks else []) +
              [100 * chances[t]["chance"] for t in tasks] + [100 * average(chance_row)])
  md = study.markdown_table(cols, rows, digits=1)
  detail_cols = ["task", "n", "chance", "majority"] + [NAMES.get(n, n) for n in results]
  detail = []
  for t in tasks:
    cells = []
    for name in results:
      r = results[name][t]
      cells.append(f"{100 * r['acc']:.1f} / {100 * r['acc_norm']:.1f}" if t in NORM_REPORTED
                   else f"{100 * r['acc']:.1f}")
    first = next(iter(results.values()))[t]
    detail.append([t, first["n"], 100 * chances[t]["chance"], 100 * chances[t]["majority"]]
                  + cells)
  md += "\nPer task (acc, or acc / acc_norm where lm-eval reports both; %):\n\n"
  md += study.markdown_table(detail_cols, detail, digits=1)
  return md


def plot(results: dict, chances: dict):
  fig, (ax,) = study.figure(1, width=10, height=4)
  tasks = list(chances)
  width = 0.8 / max(len(results), 1)
  x = np.arange(len(tasks) + 1)
  for i, (name, row) in enumerate(results.items()):
    values = [100 * row[t][AVERAGE_METRIC.get(t, "acc")] for t in tasks] + [100 * average(row)]
    ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=NAMES.get(name, name))
  chance_avg = np.mean([chances[t]["chance"] for t in tasks])
  for j, value in enumerate([chances[t]["chance"] for t in tasks] + [chance_avg]):
    ax.hlines(100 * value, j - 0.45, j + 0.45, colors="k", linestyles="--", lw=1,
              label="chance" if j == 0 else None)
  ax.set_xticks(x, [LABELS[t] for t in tasks] + ["Avg"], rotation=20, fontsize=8)
  ax.set(ylabel="accuracy (%)", title="Zero-shot commonsense reasoning (byte-level models)")
  ax.legend(fontsize=7, ncol=3)
  return fig


def main(argv=None) -> dict:
  parser = study.arg_parser(__doc__, "zero_shot", scales=tuple(PRESETS),
                            scale_help="tiny: ~2 min on 2 CPU cores (200 examples per task); cpu: "
                                       "lm.py's cpu models, 1,000 examples per task (~15 min); "
                                       "small, paper: every example")
  parser.add_argument("--models", default=None,
                      help="directory of the models saved by experiments.lm (default: "
                           "runs/lm/models; at --scale cpu runs/lm_cpu/models)")
  parser.add_argument("--tasks", default="all",
                      help=f"comma-separated subset of {', '.join(TASKS)} (or all)")
  parser.add_argument("--limit", type=int, default=None, help="first N examples per task "
                      "(0: all; default: the scale's)")
  parser.add_argument("--max_len", type=int, default=None, help="bytes kept per sequence")
  parser.add_argument("--text", default="raw", choices=TEXTS,
                      help="raw: the tasks as written; ptb: in PTB's alphabet (ptb_text: lower "
                           "case, numbers as N, no punctuation), for models trained on PTB only")
  args = parser.parse_args(argv)
  s = study.scale_settings(PRESETS, args.scale, limit=args.limit, max_len=args.max_len)
  names = study.parse_list("--tasks", None if args.tasks == "all" else args.tasks, known=TASKS)
  if args.models is None:
    args.models = os.path.join("runs", "lm_cpu" if args.scale == "cpu" else "lm", "models")
  model_dirs = {n: os.path.join(args.models, n) for n in find_models(args.models)}
  data = study.data_dir(args.data, [f for t in names for f in FILES[t]],
                        "the files of the tasks (" + ", ".join(f for t in names for f in FILES[t])
                        + "), as docs/TRAINING.md's 'Evaluation data' lists them with their "
                        "public sources")
  tasks = {t: multiple_choice.load_task(t, data)[:s["limit"] or None] for t in names}
  if args.text == "ptb":
    tasks = {t: ptb_examples(examples) for t, examples in tasks.items()}
  chances = {t: chance(examples) for t, examples in tasks.items()}
  start = time.time()
  results, params = score_models(model_dirs, tasks, s)
  md = tables(results, chances, params)
  out = dict(scale=args.scale, settings=s, text=args.text, models=args.models, params=params,
             chance=chances,
             results=results, average={n: average(r) for n, r in results.items()},
             seconds=time.time() - start)
  study.write_outputs(args.out, "zero_shot", out, md, plot(results, chances),
                      command=study.command_line("zero_shot", argv))
  print(md)
  return out


if __name__ == "__main__":
  main()
