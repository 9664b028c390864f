"""Remembering across calls: HOPE reads facts in one call, its memory state is saved with orbax, and
a new process restores it and answers questions about the facts.

Issue 5 item 5. The facts are MQAR key-value pairs (``nlx.data.synthetic``): ``k_1 v_1 … k_P v_P``,
padded with token 0 to a multiple of HOPE's memory chunk (a split of a sequence across calls is
exact only on chunk multiples, ``nlx.nn.hope``); the questions are ``P`` distinct keys of the facts,
each followed by its value, and a question is answered right when the model's next-token argmax
at the key is the paired value. Both models (HOPE, ``configs/hope.py``, and Transformer++,
``configs/transformer.py``, the same size preset and vocabulary) are trained the same way on whole
``facts + questions`` sequences in one call, with the loss at the answers only. Then, on held-out
examples, the study measures the answer accuracy of

* HOPE, facts remembered: ``model.prefill(facts, model.init_state(...))``; the whole returned
  state (every layer's self-modifying Titans memories, momentum and conv state, the CMS levels,
  the position) is saved with ``orbax.checkpoint``; a subprocess (``--phase answer``) loads the
  model, restores the state and prefills the questions. It asserts that these logits equal the
  one-call logits of ``facts + questions`` (rtol 1e-5): that is what makes the restored memory
  the model's memory of the facts;
* HOPE with a fresh state (no facts) and Transformer++ with only the questions in its context
  (the facts are out of its context): what a model gets without remembering (chance: one over
  the number of values);
* each model with facts and questions in one call (the upper bounds);
* Transformer++ with its KV cache of the facts saved and restored the same way (its memory of the
  facts grows with their length; the table gives each state's size per sequence).

Sanity rows: every restored state reproduces one call (asserted), and Transformer++ with the
facts in its context recalls (answer accuracy >= 0.9: attention solves MQAR). ``--scale cpu``
gives it the best chance: embeddings drawn with std 1.0 for both models (the MQAR fix,
docs/RESULTS.md), 3,000 steps x 32 for both models (HOPE is about 6x slower per token: ~40 min
of the budget beside other jobs), 512 held-out examples.

The paper (docs/EQUATIONS.md §6) has no such experiment; it is the stateful use that its claim of
continual, in-context memory implies. Commands, from the repository root (``runs/remember`` by
default; ``--data`` is accepted for uniformity with the other studies and unused)::

  python -m experiments.remember --scale tiny     # ~5 CPU-min (16 min wall on a shared 2-core box)
  python -m experiments.remember --scale cpu --out runs/remember_cpu   # <= 90 min on 2 CPU cores
  python -m experiments.remember --scale small    # a GPU: wider models, 16 facts, longer training
  python -m experiments.remember --scale paper    # 340M-size models, 64 facts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import study
from nlx.data import synthetic

STUDY = "remember"
FAMILIES = ("hope", "transformer")
NAMES = {"hope": "HOPE", "transformer": "Transformer++"}
EVAL_START = 1 << 30  # held-out examples: indices from here (training uses 0 .. steps * batch)

PRESETS = {
    # size: the configs/<family>.py preset; model: fields replaced in both models' configs.
    "tiny": dict(size="tiny", model={}, vocab=64, pairs=8, batch=16, lr=3e-3,
                 steps={"hope": 500, "transformer": 2000}, eval_examples=128),
    # <= 90 min on 2 CPU cores (HOPE's 3,000 steps took 37 min beside other jobs): embeddings at
    # std 1.0 for both models (the MQAR fix: Transformer++ learned 8 pairs at vocabulary 256 to
    # 1.000 in 1,500 steps x 64 with it, 0.336 without), 3,000 steps x 32 for both (96k
    # sequences), 512 held-out examples
    "cpu": dict(size="tiny", model={"init_std": 1.0}, vocab=64, pairs=8, batch=32, lr=3e-3,
                steps={"hope": 3000, "transformer": 3000}, eval_examples=512),
    "small": dict(size="tiny", model={"d_model": 128, "n_layers": 4, "n_heads": 4}, vocab=128,
                  pairs=16, batch=64, lr=2e-3, steps={"hope": 5000, "transformer": 5000},
                  eval_examples=1024),
    "paper": dict(size="340m", model={}, vocab=1024, pairs=64, batch=64, lr=1e-3,
                  steps={"hope": 20000, "transformer": 20000}, eval_examples=1024),
}


# ---------------------------------------------------------------------------------------------
# Data: facts (padded to the memory chunk) and questions
# ---------------------------------------------------------------------------------------------

def facts_length(pairs: int, chunk: int) -> int:
  """Tokens of the facts segment: ``2 * pairs`` rounded up to a multiple of ``chunk``."""
  return math.ceil(2 * pairs / chunk) * chunk


def memory_chunk(cfg) -> int:
  """HOPE's chunk (a multiple of ``memory_chunk_size``): the facts are padded to a multiple of it,
  so the questions start a chunk of their own (a split anywhere would continue exactly too:
  ``nlx.nn.hope``)."""
  return cfg.hope_chunk


def examples(seed: int, start: int, n: int, *, pairs: int, vocab: int, chunk: int) -> dict:
  """Examples ``start .. start + n - 1`` (a pure function of ``(seed, index)``).

  Returns:
    ``{"facts": int32 [n, F], "questions": int32 [n, 2P], "targets": int32 [n, 2P],
    "mask": float32 [n, 2P]}`` with ``F = facts_length(pairs, chunk)``: ``facts`` holds
    ``k_1 v_1 … k_P v_P`` then pad (0); ``questions`` holds ``q_1 a_1 … q_P a_P``, and
    ``targets`` the answer ``a_i`` at the position of ``q_i``, where ``mask`` is 1.
  """
  d = synthetic.mqar_batch(seed, start, n, num_pairs=pairs, seq_len=4 * pairs,
                           vocab_size=vocab, num_queries=pairs)
  facts = np.full((n, facts_length(pairs, chunk)), synthetic.PAD, np.int32)
  facts[:, :2 * pairs] = d["tokens"][:, :2 * pairs]
  return {"facts": facts, "questions": d["tokens"][:, 2 * pairs:],
          "targets": d["targets"][:, 2 * pairs:], "mask": d["mask"][:, 2 * pairs:].astype(
              np.float32)}


def one_call_batch(ex: dict) -> study.Batch:
  """``facts + questions`` as one sequence ``[n, F + 2P]``, counted at the answers only."""
  zeros = np.zeros_like(ex["facts"])
  return study.Batch(np.concatenate([ex["facts"], ex["questions"]], 1),
                     np.concatenate([zeros, ex["targets"]], 1),
                     np.concatenate([zeros.astype(np.float32), ex["mask"]], 1))


def answer_accuracy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
  """``{"token": answers right / answers, "sequence": rows with every answer right / rows}``.

  Args:
    logits: ``[n, T, V]`` (or predictions ``[n, T]``); targets ``[n, T]``; mask ``[n, T]``.
  """
  pred = np.asarray(logits)
  pred = pred.argmax(-1) if pred.ndim == 3 else pred
  counted = np.asarray(mask) > 0
  hit = (pred == np.asarray(targets)) & counted
  rows = counted.any(-1)
  return {"token": float(hit.sum() / max(counted.sum(), 1)),
          "sequence": float(((hit == counted).all(-1) & rows).sum() / max(rows.sum(), 1))}


# ---------------------------------------------------------------------------------------------
# Stateful calls and the state on disk (orbax)
# ---------------------------------------------------------------------------------------------

_JIT_CACHE: dict = {}


def _jitted(model, name: str):
  """``(jit of model.<name> over the model's state, that state)``; one per graph and method."""
  graphdef, params = nnx.split(model)
  fn = _JIT_CACHE.get((graphdef, name))
  if fn is None:
    fn = _JIT_CACHE[graphdef, name] = jax.jit(
        lambda p, *args: getattr(nnx.merge(graphdef, p), name)(*args))
  return fn, params


def one_call(model, tokens) -> np.ndarray:
  """``model(tokens)``: logits ``[n, T, V]`` from the initial state, one call."""
  fn, params = _jitted(model, "__call__")
  return np.asarray(fn(params, jnp.asarray(tokens)))


def prefill(model, tokens, state: dict) -> tuple[np.ndarray, dict]:
  """``model.prefill(tokens [n, T], state)``: ``(logits [n, T, V], state)``."""
  fn, params = _jitted(model, "prefill")
  logits, state = fn(params, jnp.asarray(tokens), state)
  return np.asarray(logits), state


def fresh_state(model, batch: int, max_len: int) -> dict:
  """``model.init_state(batch, max_len)`` placed on the device (committed, like a restored state,
  so that both share one compiled ``prefill``)."""
  return jax.device_put(model.init_state(batch, max_len), jax.devices()[0])


def state_size(state: dict) -> int:
  """Numbers held by ``state`` per sequence (every leaf; the batch is the leading axis of the
  per-layer leaves, after the stacked-layers axis)."""
  batch = jax.tree.leaves(state["layers"])[0].shape[1]
  return int(sum(np.size(x) for x in jax.tree.leaves(state)) // batch)


def save_state(state: dict, directory: str) -> None:
  """Writes ``state`` (any pytree of arrays) to ``directory`` with orbax (replacing it)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), state, force=True)
  checkpointer.wait_until_finished()


def restore_state(model, batch: int, max_len: int, directory: str) -> dict:
  """The state saved by ``save_state`` in ``directory``, read into the structure of
  ``model.init_state(batch, max_len)``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no saved state in {directory!r}; run the default --phase all first")
  abstract = jax.eval_shape(lambda: model.init_state(batch, max_len))
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)


def check_split_equals_one_call(split: np.ndarray, full: np.ndarray, rtol: float = 1e-5,
                                atol: float = 1e-5) -> float:
  """Asserts ``split ≈ full`` (the questions' logits); returns the largest absolute difference."""
  np.testing.assert_allclose(split, full, rtol=rtol, atol=atol,
                             err_msg="prefill(facts) + prefill(questions) on the restored state "
                                     "differs from one call on facts + questions")
  return float(np.abs(split - full).max())


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------

def model_cfg(family: str, s: dict):
  """The ``ModelConfig`` of ``family`` at the settings ``s``."""
  if family not in FAMILIES:
    raise ValueError(f"--families: {family!r} is not one of {list(FAMILIES)}")
  return study.model_config(family, s["size"], vocab_size=s["vocab"], **s["model"])


def train_all(s: dict, out: str, seed: int) -> dict:
  """Trains every family on one-call sequences; saves each under ``out/models/<family>``."""
  chunk = memory_chunk(model_cfg("hope", s))
  batch_fn = lambda step: one_call_batch(examples(seed, step * s["batch"], s["batch"],
                                                  pairs=s["pairs"], vocab=s["vocab"],
                                                  chunk=chunk))
  trained = {}
  for family in s["families"]:
    cfg = model_cfg(family, s)
    result = study.train(cfg, batch_fn, s["steps"][family], lr=s["lr"], seed=seed,
                         desc=f"train {family}")
    study.save_model(result.model, cfg, os.path.join(out, "models", family))
    trained[family] = dict(model=result.model, params=result.params, seconds=result.seconds,
                           steps=s["steps"][family], final_loss=float(np.mean(
                               result.losses[-10:])), losses=result.losses)
  return trained


def eval_set(s: dict, seed: int) -> dict:
  """The held-out examples (indices from ``EVAL_START``) of the settings ``s``."""
  return examples(seed, EVAL_START, s["eval_examples"], pairs=s["pairs"], vocab=s["vocab"],
                  chunk=memory_chunk(model_cfg("hope", s)))


def read_facts(trained: dict, s: dict, out: str, seed: int) -> dict:
  """Per family: the accuracies without facts and in one call; the facts' state saved."""
  ex = eval_set(s, seed)
  n, f = ex["facts"].shape
  max_len = f + ex["questions"].shape[1]
  rows = {}
  for family, t in trained.items():
    model = t["model"]
    full = one_call(model, one_call_batch(ex).inputs)[:, f:]
    fresh, _ = prefill(model, ex["questions"], fresh_state(model, n, max_len))
    _, state = prefill(model, ex["facts"], fresh_state(model, n, max_len))
    save_state(state, os.path.join(out, "states", family))
    np.save(os.path.join(out, "states", f"{family}_one_call_logits.npy"), full)
    rows[family] = {"one_call": answer_accuracy(full, ex["targets"], ex["mask"]),
                    "no_facts": answer_accuracy(fresh, ex["targets"], ex["mask"]),
                    "state_numbers_per_sequence": state_size(state)}
  return rows


def answer_phase(out: str) -> dict:
  """In a new process: load each model, restore its state after the facts, answer the questions
  and assert that the logits equal those of one call on facts + questions (computed by the
  parent process, ``states/<family>_one_call_logits.npy``).

  Reads ``out/settings.json``; writes and returns ``out/answer.json``.
  """
  path = os.path.join(out, "settings.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--out={out!r} holds no settings.json; run the default --phase all "
                            "first")
  with open(path, encoding="utf-8") as f:
    s = json.load(f)
  ex = eval_set(s, s["seed"])
  n, f = ex["facts"].shape
  result = {"pid": os.getpid()}
  for family in s["families"]:
    model, _ = study.load_model(os.path.join(out, "models", family))
    state = restore_state(model, n, f + ex["questions"].shape[1],
                          os.path.join(out, "states", family))
    split, _ = prefill(model, ex["questions"], state)
    full = np.load(os.path.join(out, "states", f"{family}_one_call_logits.npy"))
    result[family] = {"restored": answer_accuracy(split, ex["targets"], ex["mask"]),
                      "max_abs_diff_vs_one_call": check_split_equals_one_call(split, full)}
  with open(os.path.join(out, "answer.json"), "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  return result


def run_answer_subprocess(out: str) -> dict:
  """Runs ``python -m experiments.remember --phase answer`` in a new Python process (from the
  repository root, where ``experiments`` is importable); returns its ``answer.json``."""
  command = [sys.executable, "-m", "experiments.remember", "--phase", "answer", "--out",
             os.path.abspath(out)]
  done = subprocess.run(command, check=False, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, cwd=study.REPO)
  if done.returncode:
    raise RuntimeError(f"--phase answer failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
  with open(os.path.join(out, "answer.json"), encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def table_rows(trained: dict, read: dict, answered: dict) -> list:
  """``(model, facts, calls, answer acc, all-answers acc, state numbers / seq)`` per row."""
  how = {"restored": ("in the restored state", "facts; save; new process: restore, questions"),
         "no_facts": ("none", "questions only (fresh state)"),
         "one_call": ("in context", "facts + questions, one call (upper bound)")}
  rows = []
  for family in trained:
    accs = {"restored": answered[family]["restored"], **read[family]}
    for key in ("restored", "no_facts", "one_call"):
      size = read[family]["state_numbers_per_sequence"] if key == "restored" else ""
      rows.append((NAMES[family], *how[key], accs[key]["token"], accs[key]["sequence"], size))
  return rows


def make_figure(rows: list, chance: float):
  """Bar chart of the answer accuracy of every row (restored rows opaque), chance dashed."""
  fig, (ax,) = study.figure(width=7.5)
  colors = {"HOPE": "tab:red", "Transformer++": "tab:blue"}
  short = {"in the restored state": "restored state\n(new process)", "none": "no facts",
           "in context": "one call\n(upper bound)"}
  labels = [f"{r[0]}\n{short[r[1]]}" for r in rows]
  bars = ax.bar(range(len(rows)), [r[3] for r in rows], color=[colors[r[0]] for r in rows])
  for bar, row in zip(bars, rows):
    bar.set_alpha(1.0 if "restored" in row[1] else 0.55)
    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"{row[3]:.2f}",
            ha="center", fontsize=7)
  ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance (1/{round(1 / chance)})")
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel("answer accuracy")
  ax.set_title("Facts read in one call, answered in another process")
  ax.legend(fontsize=8)
  return fig


SANITY_RECALL = 0.9  # attention with the facts in its context solves MQAR (Zoology: >= 0.99)


def sanity(read: dict, answered: dict, chance: float) -> dict:
  """The sanity rows: every restored state reproduces one call (``answer_phase`` asserts it), and
  Transformer++ with the facts in its context recalls (``SANITY_RECALL``; attention's known
  result on MQAR)."""
  value = read["transformer"]["one_call"]["token"]
  return {"metric": "Transformer++ answer accuracy, facts + questions in one call", "value": value,
          "threshold": SANITY_RECALL, "chance": chance, "holds": bool(value >= SANITY_RECALL),
          "max_abs_diff": max(answered[f]["max_abs_diff_vs_one_call"] for f in read)}


def report(s: dict, trained: dict, read: dict, answered: dict, out: str, seconds: float,
           command: Optional[str] = None) -> dict:
  """Writes the tables, the JSON and the bar chart (``study.write_outputs``); returns the paths."""
  rows = table_rows(trained, read, answered)
  vocab = synthetic.mqar_vocab(s["vocab"])
  chance = 1 / vocab.num_values
  table = study.markdown_table(
      ["model", "facts", "calls", "answer acc", f"all {s['pairs']} right", "state numbers / seq"],
      rows)
  table += "\n" + study.markdown_table(
      ["model", "params", "train steps", "train s", "final loss",
       "max abs diff, split vs one call"],
      [(NAMES[f], t["params"], t["steps"], t["seconds"], t["final_loss"],
        f"{answered[f]['max_abs_diff_vs_one_call']:.1e}") for f, t in trained.items()])
  if "transformer" in read:
    san = sanity(read, answered, chance)
    table += (f"\nSanity rows: restored = one call (largest |difference| "
              f"{san['max_abs_diff']:.1e}, asserted within rtol = atol = 1e-5): **holds**; "
              f"Transformer++ with the facts in context recalls {san['value']:.3f} (needs >= "
              f"{SANITY_RECALL}; chance {chance:.3f}): **{'holds' if san['holds'] else 'fails'}**.\n")
  results = {"settings": s, "chance": chance, "seconds": seconds, "rows": [
      dict(zip(("model", "facts", "calls", "token_acc", "sequence_acc", "state_numbers"), r))
      for r in rows], "models": {f: {k: v for k, v in t.items() if k != "model"}
                                 for f, t in trained.items()},
      "answer_process": answered,
      "sanity": sanity(read, answered, chance) if "transformer" in read else None}
  print(table)
  return study.write_outputs(out, STUDY, results, table, make_figure(rows, chance),
                             command=command)


def main(argv=None) -> dict:
  """Runs the study (``--phase all``, returns the output paths) or the answer phase."""
  parser = study.arg_parser(__doc__, STUDY, scales=tuple(PRESETS),
                            scale_help="tiny: ~5 CPU-min; cpu: <= 90 min on 2 CPU cores (embedding "
                                       "std 1.0, 3,000 steps x 32); small: a GPU; paper: "
                                       "340M-size models")
  parser.add_argument("--phase", default="all", choices=("all", "answer"),
                      help="all: train, read the facts, save the states, answer in a subprocess; "
                           "answer: the subprocess")
  hidden = argparse.SUPPRESS  # for tests and probes: --steps (every family), --lr, ...
  parser.add_argument("--steps", type=int, default=None, help=hidden)
  parser.add_argument("--eval_examples", type=int, default=None, help=hidden)
  parser.add_argument("--lr", type=float, default=None, help=hidden)
  parser.add_argument("--families", default=",".join(FAMILIES), help=hidden)
  parser.add_argument("--keep_states", action="store_true", help=hidden)
  args = parser.parse_args(argv)
  if args.phase == "answer":
    return answer_phase(args.out)
  start = time.time()
  s = study.scale_settings(PRESETS, args.scale, eval_examples=args.eval_examples, lr=args.lr)
  if args.steps is not None:
    s["steps"] = {f: args.steps for f in FAMILIES}
  s["families"] = [f.strip() for f in args.families.split(",") if f.strip()]
  for family in s["families"]:
    model_cfg(family, s)  # unknown families refused by name before any training
  s["seed"] = args.seed
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "settings.json"), "w", encoding="utf-8") as f:
    json.dump(s, f, indent=1)
  trained = train_all(s, args.out, args.seed)
  read = read_facts(trained, s, args.out, args.seed)
  answered = run_answer_subprocess(args.out)
  if not args.keep_states:
    shutil.rmtree(os.path.join(args.out, "states"))
  return report(s, trained, read, answered, args.out, time.time() - start,
                study.command_line(STUDY, argv))


if __name__ == "__main__":
  main()
