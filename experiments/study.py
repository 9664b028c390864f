"""What the studies of ``experiments/`` share: scales, the datasets directory, list flags, models
of matched size, a masked-loss recipe on nlx's one train step (``nlx.train.fit``), accuracy, and
the JSON / markdown / PNG outputs.

A study (``experiments/mqar.py`` ..., run as ``python -m experiments.mqar`` from the repository
root) imports this module::

  from experiments import study
  parser = study.arg_parser(__doc__, "mqar")
  args = parser.parse_args()
  cfg = study.matched("hope", target_params=120_000, vocab_size=64)
  result = study.train(cfg, lambda step: batch_of(step), steps=300, lr=3e-3)
  acc = study.accuracy(result.model, [batch_of(-1 - i) for i in range(4)])
  study.write_outputs(args.out, "mqar", {...}, table_md, figure)

Every batch is a ``Batch(inputs [B, T], targets [B, T], mask [B, T])``: the loss and the accuracy
count only positions where ``mask`` is 1 (language modelling: all of them).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import glob
import json
import os
import platform
import sys
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nlx
from nlx import configs as nlx_configs
from nlx.nn import ModelConfig, cms_config
from nlx.train.fitting import FitResult, fit
from nlx.train.fitting import param_count as count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ENV = "NLX_DATA"  # the datasets directory when --data is not given
SCALES = ("tiny", "small", "paper")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def arg_parser(doc: str, study: str, scales: Sequence[str] = SCALES,
               scale_help: Optional[str] = None) -> argparse.ArgumentParser:
  """The flags every study takes: ``--scale`` (one of ``scales``), ``--out``, ``--data`` (the
  datasets directory, default ``$NLX_DATA``; studies on generated data ignore it), ``--seed``."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scale", default="tiny", choices=tuple(scales),
                      help=scale_help or "tiny: <= 15 min on 2 CPU cores; small: a GPU/TPU hour; "
                                         "paper: the paper's sizes")
  parser.add_argument("--out", default=os.path.join("runs", study),
                      help="directory of the JSON, markdown and PNG outputs")
  parser.add_argument("--data", default=None, metavar="DIR",
                      help=f"the datasets directory (default: ${DATA_ENV}); studies on generated "
                           "data ignore it")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def scale_settings(presets: dict, scale: str, **overrides) -> dict:
  """``presets[scale]`` with the non-None overrides applied (e.g. ``steps=args.steps``)."""
  if scale not in presets:
    raise ValueError(f"--scale={scale!r} is not one of {sorted(presets)}")
  settings = dict(presets[scale])
  for key, value in overrides.items():
    if key not in settings:
      raise ValueError(f"override {key}={value!r}: no such setting; allowed: {sorted(settings)}")
    if value is not None:
      settings[key] = value
  return settings


class DataNotFound(SystemExit):
  """A study's dataset is missing. A ``SystemExit``: the command prints its message, one line, and
  exits with status 1 (no traceback)."""


def data_root(value: Optional[str], what: str, flag: str = "--data") -> tuple[str, str]:
  """``(directory, where it came from)``: ``value`` (the ``flag``), else ``$NLX_DATA``.

  Raises:
    DataNotFound: neither is given; the message names both and ``what`` the directory holds.
  """
  if value:
    return value, flag
  if os.environ.get(DATA_ENV):
    return os.environ[DATA_ENV], f"${DATA_ENV}"
  raise DataNotFound(f"no datasets directory: give {flag} DIR or set ${DATA_ENV}=DIR; DIR should "
                     f"hold {what}")


def missing_data(root: str, source: str, path: str, what: str, flag: str = "--data"
                 ) -> DataNotFound:
  """The ``DataNotFound`` of a ``path`` missing under ``root`` (given by ``source``)."""
  return DataNotFound(f"{path} does not exist (the datasets directory {root!r}, from {source}; "
                      f"{flag} DIR, else ${DATA_ENV}); put there {what}")


def data_dir(value: Optional[str], needs: Sequence[str], what: str, flag: str = "--data") -> str:
  """The datasets directory of a study: ``value`` (the ``flag``), else ``$NLX_DATA``.

  Args:
    value: the flag's value (None: not given).
    needs: paths (glob patterns) relative to the directory that must exist, e.g.
      ``["ptb/ptb.train.txt"]``.
    what: what to download and put there, for the error (files and their public source).
    flag: the flag named in the error.

  Raises:
    DataNotFound: no directory is given, or a path of ``needs`` is missing; one line naming the
      flag, ``$NLX_DATA``, the path looked at and ``what``.
  """
  root, source = data_root(value, what, flag)
  for pattern in needs:
    if not glob.glob(os.path.join(root, pattern)):
      raise missing_data(root, source, os.path.join(root, pattern), what, flag)
  return root


def parse_fields(flag: str, items) -> dict:
  """``["conv_size=0", "window=16"]`` -> ``{"conv_size": 0, "window": 16}`` (Python literals, else
  strings); ValueError names the flag."""
  fields = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"{flag}: expected FIELD=VALUE, got {item!r}")
    try:
      fields[key.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[key.strip()] = text
  return fields


def parse_list(flag: str, value: Optional[str], *, known: Optional[Sequence[str]] = None,
               convert: Callable = str, minimum: Optional[float] = None,
               default: Any = None, empty: bool = False, keywords: bool = False):
  """A comma-separated list flag: ``"32,64"`` -> ``[32, 64]`` (``convert=int``).

  Args:
    flag: the flag, named in every error (ValueError).
    value: its text; None (not given) returns ``default`` (``list(known)`` if ``default`` is None
      and ``known`` is given).
    known: the allowed values (names); an unknown one is refused by name.
    convert: ``str``, ``int`` or ``float``, applied to each item.
    minimum: the smallest allowed number.
    empty: whether an empty list is allowed (else it is refused).
    keywords: ``"all"`` means every one of ``known`` and ``"none"`` the empty list.
  """
  if value is None:
    return list(known) if default is None and known is not None else default
  if keywords and value in ("all", "none"):
    return list(known) if value == "all" else []
  items = [x.strip() for x in value.split(",") if x.strip()]
  try:
    values = [convert(x) for x in items]
  except ValueError:
    kind = {int: "integers", float: "numbers"}.get(convert, "values")
    raise ValueError(f"{flag}: expected comma-separated {kind}, got {value!r}") from None
  if not values and not empty:
    raise ValueError(f"{flag}: expected a comma-separated list, got {value!r}")
  for v in values:
    if known is not None and v not in known:
      extra = ", all, none" if keywords else ""
      raise ValueError(f"{flag}: unknown {v!r}; allowed: {', '.join(map(str, known))}{extra}")
    if minimum is not None and v < minimum:
      raise ValueError(f"{flag}: expected values >= {minimum}, got {value!r}")
  return values


def command_line(study: str, argv: Optional[Sequence[str]] = None) -> str:
  """``python -m experiments.<study> <flags>``: the command of a run (``argv``, or the process's
  own arguments when None), written beside its results."""
  args = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python -m experiments." + study] + args)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def model_config(family: str, size: str = "tiny", **fields) -> ModelConfig:
  """The ``ModelConfig`` of ``configs/<family>.py:<size>`` with ``fields`` replaced."""
  cfg = nlx_configs.load(os.path.join(REPO, "configs", f"{family}.py:{size}"))
  for key, value in fields.items():
    nlx_configs.apply_override(cfg, f"model.{key}={value!r}")
  return ModelConfig.from_config(cfg.model)


def cms_periods_within(length: int, periods: Sequence[int] = (16, 64)) -> tuple:
  """``periods`` (the tiny preset's CMS periods) halved until every level updates inside a
  training sequence of ``length`` tokens (``nlx.nn.cms_config.periods_within``; docs/RESULTS.md saw
  a level that training never read diverge on longer inputs)."""
  return cms_config.periods_within(periods, length)


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters of ``build_model(cfg)`` (traced, nothing allocated)."""
  model = nnx.eval_shape(lambda: nlx.build_model(cfg, rngs=nnx.Rngs(0)))
  return count_params(nnx.state(model, nnx.Param))


def matched(family: str, target_params: int, size: str = "tiny", knob: str = "mlp_dim",
            multiple: int = 8, **fields) -> ModelConfig:
  """``model_config(family, size, **fields)`` with ``knob`` (a width) set so that the parameter
  count is the nearest to ``target_params`` (equal-parameter comparisons)."""
  def count(width):
    return param_count(model_config(family, size, **{**fields, knob: width}))

  lo, hi = multiple, multiple
  while count(hi) < target_params and hi < 1 << 16:
    lo, hi = hi, hi * 2
  while hi - lo > multiple:  # count is increasing in the width
    mid = (lo + hi) // 2 // multiple * multiple
    lo, hi = (mid, hi) if count(mid) < target_params else (lo, mid)
  width = min((lo, hi), key=lambda w: abs(count(w) - target_params))
  return model_config(family, size, **{**fields, knob: width})


# ---------------------------------------------------------------------------------------------
# Training and accuracy
# ---------------------------------------------------------------------------------------------

class Batch(NamedTuple):
  """``inputs``, ``targets`` int32 ``[B, T]``; ``mask`` float32 ``[B, T]`` (1: counted)."""

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


def lm_batch(tokens: np.ndarray) -> Batch:
  """Next-token batch of ``tokens [B, T + 1]``: every position counts."""
  tokens = np.asarray(tokens, np.int32)
  return Batch(tokens[:, :-1], tokens[:, 1:], np.ones(tokens[:, 1:].shape, np.float32))


def masked_loss(model, batch: Batch) -> jax.Array:
  """Mean cross-entropy over the positions where ``mask`` is 1."""
  logits = model(batch.inputs).astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
  return jnp.sum(nll * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)


def optimizer(steps: int, lr: float, warmup: int, weight_decay: float,
              clip: float) -> optax.GradientTransformation:
  """AdamW (β2 0.95) with linear warmup and cosine decay to lr/10; decay on matrices only."""
  warmup = max(warmup, 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(clip) if clip else optax.identity(),
                     optax.adamw(schedule, b2=0.95, weight_decay=weight_decay, mask=decay_mask))


def train(cfg_or_model, batch_fn: Callable[[int], Batch], steps: int, *, lr: float = 3e-3,
          warmup: Optional[int] = None, weight_decay: float = 0.1, clip: float = 1.0,
          seed: int = 0, desc: str = "", progress: bool = True,
          tx: Optional[optax.GradientTransformation] = None,
          evaluate: Optional[Callable[[Any], dict]] = None, eval_every: int = 0,
          on_step: Optional[Callable] = None, max_seconds: Optional[float] = None) -> FitResult:
  """Trains a model on ``batch_fn(step)`` for ``steps`` steps with ``masked_loss``: the studies'
  recipe (AdamW, warmup and cosine decay, clipping) on ``nlx.train.fit``, nlx's one train step.

  Args:
    cfg_or_model: a ``ModelConfig`` (a model is built with ``seed``) or an ``nnx.Module`` (an
      ``nlx`` LM, ...) to continue training (fine-tuning).
    batch_fn: step -> ``Batch``; must be a pure function of step for reproducible runs.
    steps: optimizer steps.
    lr, warmup, weight_decay, clip: AdamW, warmup (default 10% of steps), global-norm clipping.
    seed: parameter initialization.
    desc: label of the progress bar.
    progress: show a tqdm progress bar.
    tx: the optimizer, instead of ``optimizer(steps, lr, warmup, weight_decay, clip)`` (which
      ``lr``, ``warmup``, ``weight_decay`` and ``clip`` then do not build).
    evaluate, eval_every: ``evaluate(model)`` (a dict) after every ``eval_every`` steps and after
      the last, into ``FitResult.evals``; its time is not in the throughput.
    on_step: ``(step, nlx.train.step.Update)`` after each step (``fit``'s).
    max_seconds: ``fit``'s wall-time cap (None: every step runs).

  Returns:
    ``nlx.train.FitResult``: the model, the loss of every step, the time and the throughput, the
    evaluations, and ``skipped``: steps whose loss, gradients or parameters were not finite (the
    shared step leaves the parameters as they were there).
  """
  model = (nlx.build_model(cfg_or_model, rngs=nnx.Rngs(seed))
           if isinstance(cfg_or_model, ModelConfig) else cfg_or_model)
  if tx is None:
    tx = optimizer(steps, lr, steps // 10 if warmup is None else warmup, weight_decay, clip)
  return fit(model, batch_fn, steps, tx=tx, loss=masked_loss, evaluate=evaluate,
             eval_every=eval_every, progress=progress, desc=desc, on_step=on_step,
             max_seconds=max_seconds)


_PREDICT_CACHE: dict = {}


def predict(model, inputs: np.ndarray) -> np.ndarray:
  """Greedy next-token predictions ``[B, T]`` of ``model`` on ``inputs [B, T]`` (one forward)."""
  graphdef, state = nnx.split(model)
  fn = _PREDICT_CACHE.get(graphdef)
  if fn is None:
    fn = _PREDICT_CACHE[graphdef] = jax.jit(
        lambda s, x: jnp.argmax(nnx.merge(graphdef, s)(x), -1))
  return np.asarray(fn(state, jnp.asarray(inputs, jnp.int32)))


def accuracy(model, batches: Iterable[Batch]) -> dict:
  """``{"token": fraction of masked positions predicted right, "sequence": fraction of rows with
  every masked position right}`` over ``batches`` (rows without masked positions are skipped)."""
  right = total = rows_right = rows = 0
  for batch in batches:
    hit = (predict(model, batch.inputs) == batch.targets) & (batch.mask > 0)
    counted = batch.mask > 0
    right += int(hit.sum())
    total += int(counted.sum())
    has = counted.any(-1)
    rows_right += int(((hit == counted).all(-1) & has).sum())
    rows += int(has.sum())
  return {"token": right / max(total, 1), "sequence": rows_right / max(rows, 1)}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                   digits: int = 3) -> str:
  """A GitHub markdown table; floats rounded to ``digits``."""
  def cell(x):
    if isinstance(x, float):
      return f"{x:.{digits}f}"
    return str(x)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def training_summary(models: dict, steps: int) -> str:
  """The training table of a study that trains each model once and then evaluates it (niah,
  babi_long): ``models[family]`` holds ``params``, ``tokens_per_second``, ``first_loss``,
  ``final_loss``, ``train_seconds`` and ``eval_seconds`` (and ``steps``, ``cut`` where a time cap
  cut the run short; ``steps``: the planned steps)."""
  return markdown_table(
      ["model", "params", "train steps", "train tokens/s", "loss first -> last", "train s",
       "eval s"],
      [[f, r["params"], (f"{r['steps']} (cut at the time cap)" if r.get("cut")
                         else r.get("steps", steps)), round(r["tokens_per_second"]),
        f"{r['first_loss']:.2f} -> {r['final_loss']:.2f}", round(r["train_seconds"]),
        round(r["eval_seconds"])] for f, r in models.items()])


def not_run_lines(results: dict) -> str:
  """One line per model a study did not run (``results["not_run"]``: family -> why)."""
  return "".join(f"\n{family}: not run ({why}).\n"
                 for family, why in results.get("not_run", {}).items())


def environment() -> dict:
  """Where a result was measured: date, host, CPU count, JAX version and devices."""
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "host": platform.node(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def write_outputs(out_dir: str, study: str, results: dict, table_md: str,
                  figure=None, command: Optional[str] = None) -> dict:
  """Writes ``<out>/<study>.json`` (results + environment + command), ``<study>.md`` (the table
  under the command) and ``<study>.png`` (the matplotlib ``figure``); returns their paths.
  ``command``: default ``command_line(study)``, the process's own arguments."""
  os.makedirs(out_dir, exist_ok=True)
  command = command or command_line(study)
  paths = {kind: os.path.join(out_dir, f"{study}.{kind}") for kind in ("json", "md", "png")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump({"study": study, "command": command, "environment": environment(), **results}, f,
              indent=1, default=_jsonable)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(f"`{command}`\n\n{table_md}")
  if figure is not None:
    figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
  else:
    del paths["png"]
  for kind, path in paths.items():
    print(f"wrote {path}")
  return paths


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def figure(n_panels: int = 1, width: float = 5.0, height: float = 3.8):
  """A matplotlib figure with ``n_panels`` side-by-side axes (Agg backend; no screen needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
  return fig, list(axes[0])


# ---------------------------------------------------------------------------------------------
# Trained models on disk (one study trains, another evaluates)
# ---------------------------------------------------------------------------------------------

def save_model(model, cfg: ModelConfig, directory: str) -> None:
  """Writes ``directory/config.json`` (the ``ModelConfig``) and ``params.msgpack``."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1)
  state = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tmp = os.path.join(directory, "params.msgpack.tmp")
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  os.replace(tmp, os.path.join(directory, "params.msgpack"))  # atomic


def load_model(directory: str):
  """``(model, cfg)`` saved by ``save_model``."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "params.msgpack")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} holds no saved model (params.msgpack); train it first")
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    cfg = ModelConfig.from_config(json.load(f))
  model = nlx.build_model(cfg, rngs=nnx.Rngs(0))
  with open(path, "rb") as f:
    state = serialization.msgpack_restore(f.read())
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, state)
  nnx.update(model, params)
  return model, cfg
