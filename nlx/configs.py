"""Run configs: size presets shared by every ``configs/<family>.py``, the loader, gin, validation.

A config file defines ``get_config(arg)`` returning ``config(model_config(family, size, ...))``:
an ``ml_collections.ConfigDict`` with every section of a run (``nlx.train.config``):

* ``model``: every ``nlx.nn.ModelConfig`` field; ``arg`` is a size: ``tiny`` (trains on a laptop
  CPU), ``340m``, ``760m`` or ``1.3b`` (the paper's sizes, within ±10% of their names in
  parameters), or ``20m`` (the size of ``nlx bench models``; the paper sizes' family settings).
* ``optimizer``, ``data``, ``train``, ``mesh``: the run defaults of the size (``RUN_PRESETS``).
* ``axis_rules``: logical axis name -> mesh axis (``AXIS_RULES``).

``load("configs/transformer.py:tiny", ["train.steps=5"])`` imports a config file, calls
``get_config`` and applies ``key=value`` overrides; ``load_gin(files, bindings)`` builds the same
config from gin files that bind the section dataclasses; ``validate`` is the one validation step.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
from typing import Optional, Sequence

import ml_collections

from nlx.nn.config import ModelConfig

PAPER_SIZES = ("340m", "760m", "1.3b")
BENCH_SIZE = "20m"  # the size of ``nlx bench models``
SIZES = ("tiny",) + PAPER_SIZES + (BENCH_SIZE,)

# The shared presets. Paper sizes follow the Transformer++ baselines of flash-linear-attention and
# Titans (d_model 1024 / 1536 / 2048, 24 layers, head dim 64, 32K vocabulary). They are meant for
# a v5p:4x4x4 slice (64 chips, FSDP) and rematerialise every layer in the backward pass, which
# every family needs to fit there at 128 x 4096 tokens (docs/TRAINING.md, "TPU table").
_PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, mlp_dim=192, vocab_size=256,
                 max_seq_len=4096, state_dim=16, mamba_head_dim=32, memory_chunk_size=16,
                 chunk_size=64),
    "340m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64, remat="full"),
    "760m": dict(d_model=1536, n_layers=24, n_heads=24, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64, remat="full"),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=32, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64, remat="full"),
    "20m": dict(d_model=384, n_layers=10, n_heads=6, vocab_size=4096, max_seq_len=2048,
                state_dim=64, mamba_head_dim=64),
}
NOMINAL_PARAMS = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9, "20m": 20e6}
MLP_RATIO = 8 / 3  # SwiGLU hidden width / d_model of Transformer++


def _round_up(x: float, multiple: int) -> int:
  return int(-(-round(x) // multiple) * multiple)


def model_config(family: str, size: str, *, mlp_ratio: float = MLP_RATIO,
                 tiny: Optional[dict] = None, paper: Optional[dict] = None,
                 **overrides) -> ml_collections.ConfigDict:
  """``config.model`` of ``family`` at ``size``: every ModelConfig field, preset, then overrides.

  Args:
    family: a registered family name.
    size: one of ``SIZES``.
    mlp_ratio: SwiGLU width / d_model at the paper sizes (families whose mixer has more or fewer
      parameters than attention change it to keep the size).
    tiny, paper: overrides for the tiny size only, or for the paper sizes only.
    **overrides: overrides for every size.
  """
  if size not in SIZES:
    raise ValueError(f"config arg {size!r} is not a size; allowed: {', '.join(SIZES)}")
  fields = dataclasses.asdict(ModelConfig())
  fields.update(_PRESETS[size], family=family)
  if size != "tiny":
    fields["mlp_dim"] = _round_up(mlp_ratio * fields["d_model"], 128)
  fields.update(overrides)
  fields.update((tiny or {}) if size == "tiny" else (paper or {}))
  ModelConfig.from_config(fields)  # refuse a bad preset where it is written
  return ml_collections.ConfigDict(fields)


# Run defaults per size: tiny trains on a CPU in minutes (byte tokenizer, embedded corpus); the
# paper sizes follow the flash-linear-attention / Titans recipe (AdamW 4e-4 cosine, 0.5M-token
# batches of 4K sequences, 2K warmup steps; 15B / 30B / 100B tokens) sharded FSDP over every chip.
_TINY_RUN = dict(
    optimizer=dict(),
    data=dict(),
    train=dict(),
    mesh=dict(data=-1, fsdp=1, tensor=1))
_PAPER_RUN = dict(
    optimizer=dict(learning_rate=4e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
    data=dict(source="text", path="data/corpus", tokenizer="sentencepiece", spm_vocab_size=32000),
    train=dict(batch_size=128, seq_len=4096, log_every=100, eval_every=1000, eval_batches=32,
               checkpoint_every=1000, keep_checkpoints=3, compute_dtype="bfloat16"),
    mesh=dict(data=1, fsdp=-1, tensor=1))
RUN_PRESETS = {
    "tiny": _TINY_RUN,
    "20m": dict(_PAPER_RUN, data=dict(_PAPER_RUN["data"], spm_vocab_size=4096),
                train=dict(_PAPER_RUN["train"], batch_size=8, seq_len=2048, steps=10_000)),
    "340m": dict(_PAPER_RUN, train=dict(_PAPER_RUN["train"], steps=15e9 // (128 * 4096))),
    "760m": dict(_PAPER_RUN, train=dict(_PAPER_RUN["train"], steps=30e9 // (128 * 4096))),
    "1.3b": dict(_PAPER_RUN, train=dict(_PAPER_RUN["train"], steps=100e9 // (128 * 4096))),
}
# Logical axis -> mesh axis (MaxText's layout): the batch over data and fsdp, weights' model
# dimension over fsdp, their vocabulary / MLP / head dimension over tensor; axes that are small or
# scanned stay whole. An axis whose size a mesh axis does not divide is replicated.
AXIS_RULES = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"),
              ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
              ("head_dim_v", None), ("qkv", None), ("gates", None), ("conv", None),
              ("layers", None), ("memory_mlp", None), ("memory_rows", "fsdp"),
              ("persistent", None), ("cms_target", None))


def _size_of(model: ml_collections.ConfigDict) -> str:
  """The preset whose width the model has (configs call ``config(model_config(f, size))``)."""
  for size, preset in _PRESETS.items():
    if preset["d_model"] == model.d_model and preset["vocab_size"] == model.vocab_size:
      return size
  return "tiny"


def config(model: ml_collections.ConfigDict, **sections: dict) -> ml_collections.ConfigDict:
  """The run config of a config file: ``model`` plus every other section at its size's defaults.

  Args:
    model: ``model_config(family, size, ...)``.
    **sections: overrides per section, e.g. ``train=dict(seq_len=512)``.

  Returns:
    The ConfigDict (fields locked: an override of an unknown field is an error).
  """
  from nlx.train import config as run_config  # pylint: disable=g-import-not-at-top
  preset = RUN_PRESETS[_size_of(model)]
  fields = {"model": model, "axis_rules": AXIS_RULES}
  for name, cls in run_config.SECTION_CLASSES.items():
    values = dataclasses.asdict(cls())
    values.update({k: int(v) if isinstance(v, float) and k == "steps" else v
                   for k, v in preset[name].items()})
    values.update(sections.pop(name, {}))
    fields[name] = values
  if sections:
    raise ValueError(f"config(): unknown section(s) {sorted(sections)}; allowed: "
                     f"{sorted(run_config.SECTION_CLASSES)}")
  cfg = ml_collections.ConfigDict(fields)
  cfg.lock()
  return cfg


def validate(cfg: ml_collections.ConfigDict, **kwargs):
  """``nlx.train.config.validate``: the one validation step (see there)."""
  from nlx.train import config as run_config  # pylint: disable=g-import-not-at-top
  return run_config.validate(cfg, **kwargs)


def shipped() -> list[str]:
  """The names of the shipped configs (``configs/`` of the checkout, ``nlx.presets`` installed):
  ``["deltanet", ..., "adapters/hope_attention"]``."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  root = importlib.resources.files("nlx.presets")
  names = [f.name[:-3] for f in root.iterdir() if f.name.endswith(".py") and f.name[0] != "_"]
  names += [f"adapters/{f.name[:-3]}" for f in root.joinpath("adapters").iterdir()
            if f.name.endswith(".py") and f.name[0] != "_"]
  return sorted(names)


def resolve_spec(spec: str) -> tuple[str, Optional[str]]:
  """``(file, arg)`` of ``path/to/config.py[:arg]`` or of a shipped config ``NAME[:arg]``
  (``hope:tiny``, ``adapters/hope_attention:DIR``); ``arg`` is None when absent.

  Raises:
    ValueError: no such file or shipped config, naming the allowed names.
  """
  match = re.match(r"^(.*?\.py)(?::(.*))?$", spec, re.DOTALL)  # the arg may be a path itself
  if match:
    path, arg = match.group(1), match.group(2)
    if not os.path.isfile(path):
      raise ValueError(f"config file {path!r} does not exist (spec {spec!r}; expected "
                       "'path/to/config.py[:arg]' or a shipped config NAME[:arg])")
    return path, arg
  name, _, arg = spec.partition(":")
  if name not in shipped():
    raise ValueError(f"--config {spec!r}: {name!r} is neither a .py file nor a shipped config; "
                     f"shipped: {', '.join(shipped())}")
  import importlib.resources  # pylint: disable=g-import-not-at-top
  return str(importlib.resources.files("nlx.presets").joinpath(name + ".py")), (
      arg if ":" in spec else None)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config: imports the file, calls ``get_config(arg)``, applies overrides.

  Args:
    spec: a file, ``"configs/transformer.py:tiny"`` (``get_config("tiny")``) or
      ``"configs/x.py"`` (``get_config()``), or a shipped config by name: ``"transformer:tiny"``
      (``shipped()`` lists them; they install with nlx).
    overrides: ``"model.d_model=128"`` strings; values are Python literals (or bare strings).

  Returns:
    The ConfigDict.
  """
  path, arg = resolve_spec(spec)
  module_spec = importlib.util.spec_from_file_location(
      f"nlx_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Sets ``a.b.c=value`` in ``cfg`` (the field must exist); value parsed as a Python literal."""
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise ValueError(f"override {item!r} must look like 'model.d_model=128'")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  _set_field(cfg, key, value, item)


# ModelConfig fields whose value may change type (validated by ModelConfig itself).
_UNION_FIELDS = ("cms_lr",)


def _set_field(cfg: ml_collections.ConfigDict, key: str, value, item: Optional[str] = None):
  """Sets the existing field ``a.b.c`` of ``cfg``; type mismatches name the field."""
  item = item or f"{key}={value!r}"
  *parents, leaf = key.split(".")
  node = cfg
  for name in parents:
    if not hasattr(node, "keys") or name not in node:
      raise ValueError(f"override {item!r}: no field {name!r}; allowed: {sorted(node.keys())}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"override {item!r}: no field {leaf!r}; allowed: {sorted(node.keys())}")
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    if parents == ["model"] and leaf in _UNION_FIELDS:  # e.g. cms_lr: a float or a tuple
      with node.ignore_type():
        node[leaf] = value
    else:
      node[leaf] = value
  except TypeError:
    raise ValueError(f"override {item!r}: {key} must be a {type(old).__name__} like its default "
                     f"{old!r}; got {value!r}") from None


def _run_section_classes() -> dict:
  from nlx.train import config as run_config  # pylint: disable=g-import-not-at-top
  return {"model": ModelConfig, **run_config.SECTION_CLASSES}


def preset(family: str, size: str = "tiny") -> ml_collections.ConfigDict:
  """The run config of ``family`` at ``size`` with no family-specific settings (gin's base)."""
  return config(model_config(family, size))


_GIN_REGISTERED = []


def _register_gin():
  """Registers ``nlx.preset`` and the section dataclasses (``nlx.TrainConfig``, ...) with gin."""
  import gin  # pylint: disable=g-import-not-at-top
  if not _GIN_REGISTERED:
    gin.external_configurable(preset, "preset", module="nlx")
    for cls in _run_section_classes().values():
      gin.external_configurable(cls, module="nlx")
    _GIN_REGISTERED.append(True)
  return gin


def load_gin(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The run config of gin ``files`` and ``bindings`` (T5X style, one level deep).

  The gin binds ``preset.family`` and ``preset.size`` (the base: ``preset(family, size)``) and
  fields of the section dataclasses: ``ModelConfig.window = 64``, ``TrainConfig.steps = 500``,
  ``DataConfig.path = 'corpus.txt'``, ``MeshConfig.fsdp = 4``, ``OptimizerConfig.name = 'muon'``.
  The result is the same ConfigDict a Python config builds, validated the same way.
  """
  gin = _register_gin()
  for path in files:
    if not os.path.isfile(path):
      raise ValueError(f"gin file {path!r} does not exist")
  gin.clear_config()
  gin.parse_config_files_and_bindings(list(files), list(bindings))
  try:
    base = {k: gin.query_parameter(f"nlx.preset.{k}") for k in ("family", "size")}
  except ValueError as e:
    raise ValueError(f"gin config must bind preset.family and preset.size ({e})") from None
  cfg = preset(**base)
  for name, cls in _run_section_classes().items():
    for field, value in gin.get_bindings(f"nlx.{cls.__name__}").items():
      _set_field(cfg, f"{name}.{field}", value)
  return cfg


def load_run(spec: Optional[str] = None, overrides: Sequence[str] = (),
             gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()):
  """The ConfigDict of ``--config SPEC`` or ``--gin_file``s, with ``--config.a.b=v`` overrides."""
  if bool(spec) == bool(gin_files):
    raise ValueError("give exactly one of --config path.py[:arg] and --gin_file FILE.gin "
                     f"(got config={spec!r}, gin_file={list(gin_files)})")
  if gin_bindings and not gin_files:
    raise ValueError("--gin_bindings needs --gin_file")
  cfg = load(spec) if spec else load_gin(gin_files, gin_bindings)
  for item in overrides:
    apply_override(cfg, item)
  return cfg
