"""The ``nlx`` command line.

Commands:

* ``nlx train --config configs/transformer.py:tiny --workdir DIR [--config.train.steps=5]``
  (or ``--gin_file configs/transformer.gin [--gin_bindings 'TrainConfig.steps = 5']``): trains
  with a progress bar (``--no_progress``: one ``step=... loss=...`` line per ``train.log_every``
  steps instead); writes ``DIR/metrics.jsonl``, TensorBoard events (and a wandb run, with
  ``train.trackers``), ``DIR/config.json``, checkpoints and plots; resumes from the latest
  checkpoint of ``DIR``. ``DIR`` and ``--checkpoint_dir`` may be ``gs://BUCKET/PATH``.
* ``nlx eval --workdir DIR --task ppl|mc|niah ...``: perplexity of a text file, zero-shot multiple
  choice (``--data_dir``: the files of docs/TRAINING.md, "Evaluation data"), S-NIAH-1/2/3
  (``nlx.eval``).
* ``nlx generate --workdir DIR --prompt TEXT [--state FILE]``: samples a continuation from the
  trained model; with ``--state`` its memory persists across invocations (``nlx.eval.session``).
* ``nlx convert llama HF_DIR OUT_WORKDIR``: a Hugging Face Llama-architecture model as an nlx
  Transformer++ workdir (``nlx.convert.llama``).
* ``nlx export WORKDIR OUT``: the newest checkpoint as a pretrained directory (``nlx.pretrained``).
* ``nlx aot --config configs/transformer.py:1.3b --topology v5p:4x4x4 [--num_slices 2]``: compiles
  the train step for a TPU topology (of several slices: multislice) on any machine; prints memory
  per device, FLOPs, step time and MFU (JSON).

A workdir or checkpoint directory (``--workdir``, ``--checkpoint_dir``) is a local path or a
``gs://`` URL (``nlx.train.paths``); another scheme, or a ``gs://`` URL without its packages, is
refused with one error line before anything runs.

``main(argv)`` returns the exit status; the console script calls ``sys.exit(main())``. The
benchmarks and the demo are not commands of the library: they live beside it in the repository
(``python -m benchmarks.ops``, ``python -m benchmarks.models``, ``python -m examples.demo``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nlx import errors


def build_parser() -> argparse.ArgumentParser:
  """The parser of every command; builds without importing JAX (``nlx --help`` stays fast)."""
  parser = argparse.ArgumentParser(
      prog="nlx", description="nlx: Nested Learning in JAX.",
      epilog="Run 'nlx COMMAND --help' for the flags of a command.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  train = commands.add_parser("train", help="train a run config",
                              description="Trains a run config; extra --config.a.b=v flags "
                              "override its fields.")
  _add_config_flags(train)
  train.add_argument("--workdir", required=True, help="run directory, local or gs://BUCKET/PATH "
                     "(resumes when it holds checkpoints; without --config, its config.json is "
                     "the config)")
  train.add_argument("--checkpoint_dir", default=None,
                     help="checkpoints (default WORKDIR/checkpoints; may be gs://...)")
  train.add_argument("--no_progress", action="store_true",
                     help="no progress bar: print one 'step=N loss=... tokens_per_s=...' line per "
                     "train.log_every steps instead (pod logs)")
  train.add_argument("--stop_at_step", type=_positive_int, default=None,
                     help="stop after this step with a checkpoint (running again resumes)")
  train.add_argument("--on_nonfinite", choices=("stop", "skip"), default="stop",
                     help="a step with a NaN/Inf loss, gradient or parameter stops the run "
                     "without saving (stop) or is skipped, parameters unchanged (skip)")
  train.add_argument("--fallback_to_good_checkpoint", action="store_true",
                     help="when the newest checkpoint is corrupt or of another config, move it "
                     "aside (DIR/bad-STEP) and resume from the newest good one")
  train.add_argument("--seqio_module", action="append", default=[], metavar="MODULE",
                     help="a module to import before the seqio task is looked up (it registers "
                     "data.seqio_task; repeatable): sets data.seqio_module")

  gen = commands.add_parser(
      "generate", help="sample from a trained workdir",
      description="Samples a continuation of --prompt from the newest checkpoint of --workdir. "
      "With --state FILE the model's memory persists across invocations: FILE (when it exists) "
      "is restored before the prompt and saved, atomically, after the generated text.")
  gen.add_argument("--workdir", required=True,
                   help="the workdir of 'nlx train' (local or gs://BUCKET/PATH)")
  gen.add_argument("--checkpoint_dir", default=None,
                   help="its checkpoints, if not WORKDIR/checkpoints (local or gs://)")
  gen.add_argument("--prompt", required=True, help="the text to continue")
  gen.add_argument("--max_new_tokens", type=_positive_int, default=200,
                   help="tokens to generate (default 200)")
  gen.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 is greedy decoding (default 0.8)")
  gen.add_argument("--top_k", type=int, default=0,
                   help="sample among the k most likely tokens; 0: all (default)")
  gen.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
  gen.add_argument("--state", default=None, metavar="FILE",
                   help="a session file: the model's memory state, restored before the prompt "
                   "when FILE exists and saved after the generated text (nlx.eval.session)")

  evaluate = commands.add_parser("eval", help="evaluate a trained workdir",
                                 description="Perplexity, zero-shot multiple choice, S-NIAH.")
  from nlx.eval import run as eval_run  # pylint: disable=g-import-not-at-top  (no JAX at import)
  eval_run.configure_parser(evaluate)

  convert = commands.add_parser(
      "convert", help="import a Hugging Face model ('nlx convert llama HF_DIR OUT_WORKDIR')",
      description="Converts a Hugging Face Llama-architecture model directory (config.json, "
      "*.safetensors, tokenizer.json) into an nlx Transformer++ workdir that 'nlx generate', "
      "'nlx eval' and 'nlx train' use (nlx.convert.llama).")
  convert.add_argument("architecture", choices=("llama",), help="the source architecture")
  convert.add_argument("hf_dir", help="the Hugging Face model directory")
  convert.add_argument("out_workdir", help="the nlx workdir to write")
  convert.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                       help="stored dtype of the weights (default float32)")

  export = commands.add_parser(
      "export", help="write a workdir's newest checkpoint as a pretrained directory",
      description="Writes the parameters of the newest checkpoint of WORKDIR, its model config "
      "and tokenizer as an nlx pretrained directory (nlx.pretrained: config.json, "
      "model.safetensors), which nlx.from_pretrained and --config.train.init_from read.")
  export.add_argument("workdir", help="the workdir of 'nlx train' (local or gs://BUCKET/PATH)")
  export.add_argument("out", help="the directory to write (local)")
  export.add_argument("--checkpoint_dir", default=None,
                      help="its checkpoints, if not WORKDIR/checkpoints (local or gs://)")
  export.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="stored dtype of the weights (default float32)")

  aot = commands.add_parser("aot", help="compile the train step for a TPU topology (JSON)")
  _add_config_flags(aot)
  aot.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x4")
  aot.add_argument("--num_slices", type=_positive_int, default=1,
                   help="slices of a multislice topology (DCN); mesh.dcn_* split the axes "
                   "across them")
  return parser


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
  return value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, metavar="PATH.py[:ARG]",
                      help="a config file and its argument, e.g. configs/transformer.py:tiny")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file binding nlx.preset and the section classes (repeatable)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin binding, e.g. 'TrainConfig.steps = 5' (repeatable)")


# Config fields that name files: a relative path given on the command line is made absolute (the
# resolved config is saved in the workdir and may be resumed from another directory).
PATH_FIELDS = ("data.path", "data.spm_model", "data.tokenizer_file", "train.init_from")


def config_overrides(extra: Sequence[str]) -> tuple[list, list]:
  """Splits ``--config.a.b=v`` / ``--config.a.b v`` flags from the rest: ``(overrides, rest)``;
  the values of ``PATH_FIELDS`` are resolved against the current directory."""
  from nlx.train import paths  # pylint: disable=g-import-not-at-top  (no JAX)
  overrides, rest, i = [], [], 0
  while i < len(extra):
    arg = extra[i]
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        if i + 1 >= len(extra):
          raise ValueError(f"{arg} needs a value ('{arg}=VALUE')")
        value, i = extra[i + 1], i + 1
      if key in PATH_FIELDS and value.strip("'\"") not in ("", "None"):
        value = paths.resolve(value.strip("'\""))
      overrides.append(f"{key}={value}")
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def _load_config(args, overrides):
  """The run config of --config / --gin_file; for 'train' without either, WORKDIR's own."""
  from nlx import configs  # pylint: disable=g-import-not-at-top
  if args.command == "train" and not args.config and not args.gin_file:
    from nlx.train import loop  # pylint: disable=g-import-not-at-top
    try:
      cfg = loop.load_workdir_config(args.workdir)
    except ValueError:
      raise ValueError(f"give --config path.py[:arg] (or --gin_file): --workdir "
                       f"{args.workdir} has no config.json to resume with") from None
    for item in overrides:
      configs.apply_override(cfg, item)
    return cfg
  return configs.load_run(args.config, overrides, args.gin_file, args.gin_bindings)


def _run_train(args, overrides) -> int:
  from nlx.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  from nlx.train import loop  # pylint: disable=g-import-not-at-top
  if args.seqio_module:
    overrides = list(overrides) + [f"data.seqio_module={tuple(args.seqio_module)!r}"]
  record = loop.train(_load_config(args, overrides), args.workdir,
                      checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress,
                      stop_at=args.stop_at_step, on_nonfinite=args.on_nonfinite,
                      fallback_to_good_checkpoint=args.fallback_to_good_checkpoint)
  summary = {k: record[k] for k in ("step", "loss", "eval_loss", "eval_ppl") if k in record}
  print(f"done: {summary}; workdir {args.workdir}")
  return 0


def _run_generate(args) -> int:
  from nlx.eval import sampling, session  # pylint: disable=g-import-not-at-top
  from nlx.train import trained  # pylint: disable=g-import-not-at-top
  t = trained.load(args.workdir, args.checkpoint_dir)
  kwargs = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
  if args.state:
    held = session.info(args.state)["tokens"] if os.path.exists(args.state) else None
    text, _ = session.continue_text(t.model, t.tokenizer, args.prompt, args.max_new_tokens,
                                    args.state, step=t.step, **kwargs)
    # On stderr, so that stdout stays the text: what the memory held, and holds now.
    print(f"session {args.state}: " + ("new" if held is None else f"restored {held} tokens") +
          f"; saved {session.info(args.state)['tokens']} tokens", file=sys.stderr)
  else:
    check_prompt_length(len(t.tokenizer.encode(args.prompt)), args.max_new_tokens,
                        t.run.model.max_seq_len)
    text = sampling.generate_text(t.model, t.tokenizer, args.prompt, args.max_new_tokens,
                                  **kwargs)
  print(args.prompt + text)
  return 0


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
  """Refuses a prompt plus continuation longer than ``model.max_seq_len`` (a ValueError)."""
  if prompt_tokens + max_new_tokens > max_seq_len:
    raise ValueError(f"the prompt is {prompt_tokens} tokens; with --max_new_tokens "
                     f"{max_new_tokens} that exceeds model.max_seq_len={max_seq_len}; allowed: "
                     "prompt tokens + --max_new_tokens <= model.max_seq_len")


def _run_convert(args) -> int:
  import json  # pylint: disable=g-import-not-at-top
  from nlx.convert import llama  # pylint: disable=g-import-not-at-top
  print(json.dumps(llama.convert_llama(args.hf_dir, args.out_workdir, dtype=args.dtype)))
  return 0


def _run_export(args) -> int:
  from nlx import pretrained  # pylint: disable=g-import-not-at-top
  from nlx.train import trained  # pylint: disable=g-import-not-at-top
  t = trained.load(args.workdir, args.checkpoint_dir)
  pretrained.save_pretrained(t.model, args.out, dtype=args.dtype, tokenizer=t.tokenizer)
  print(f"wrote step {t.step} of {args.workdir} to {args.out}")
  return 0


def _run_aot(args, overrides) -> int:
  import json  # pylint: disable=g-import-not-at-top
  from nlx.train import aot  # pylint: disable=g-import-not-at-top
  print(json.dumps(aot.compile_for_topology(_load_config(args, overrides), args.topology,
                                            num_slices=args.num_slices)))
  return 0


# Path flags of the commands: (attribute, how the user names it, whether gs:// is allowed).
PATH_FLAGS = (("workdir", "--workdir", True), ("checkpoint_dir", "--checkpoint_dir", True),
              ("state", "--state", False), ("hf_dir", "HF_DIR", False),
              ("out_workdir", "OUT_WORKDIR", False), ("out", "OUT", False))


def resolve_path_flags(args) -> None:
  """Resolves the path flags of ``args`` once, here (the run never sees a relative path), and
  refuses a URL no backend handles (``nlx.train.paths.check``) before anything runs."""
  from nlx.train import paths  # pylint: disable=g-import-not-at-top  (no JAX)
  for name, flag, remote in PATH_FLAGS:
    if getattr(args, name, None):
      if args.command == "export" and name == "workdir":
        flag = "WORKDIR"
      setattr(args, name, paths.check(getattr(args, name), flag, remote=remote))


def normalize_flags(argv: Sequence[str]) -> list[str]:
  """``--seq-len`` -> ``--seq_len``: nlx's flags are spelled with underscores (as absl's and
  ml_collections' ``--config.a_b`` are); dashes are accepted too. Values are left alone."""
  out = []
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config.") and len(arg) > 2:
      name, sep, value = arg.partition("=")
      arg = name.replace("-", "_").replace("__", "--", 1) + sep + value
    out.append(arg)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = normalize_flags(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    resolve_path_flags(args)
    overrides, extra = config_overrides(extra)
    if extra:
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides and args.command not in ("train", "aot"):
      parser.error(f"--config.* overrides are flags of 'train' and 'aot', not {args.command!r}")
    if args.command == "train":
      return _run_train(args, overrides)
    if args.command == "generate":
      return _run_generate(args)
    if args.command == "aot":
      return _run_aot(args, overrides)
    if args.command == "convert":
      return _run_convert(args)
    if args.command == "export":
      return _run_export(args)
    if args.command == "eval":
      from nlx.eval import run as eval_run  # pylint: disable=g-import-not-at-top
      return eval_run.run_parsed(args)
  except (errors.NlxError, ValueError, OSError) as e:
    # A user's mistake or a damaged run: one line naming it, no traceback. Config and data
    # mistakes exit 2 (like a bad flag), runtime faults (checkpoint, NaN, I/O) exit 1.
    print(f"nlx {args.command}: error: {e}", file=sys.stderr)
    return 1 if isinstance(e, (errors.CheckpointError, errors.NonFiniteError, OSError)) else 2
  parser.error(f"unknown command {args.command!r}")
  return 2


if __name__ == "__main__":
  sys.exit(main())
