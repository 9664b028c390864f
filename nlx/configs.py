"""Run configs: the loader of config files and shipped names, overrides, gin, validation.

A config file defines ``get_config(arg)`` returning an ``ml_collections.ConfigDict`` with every
section of a run (``nlx.train.config``). The shipped ones (``configs/<family>.py``, installed as
``nlx.presets``) take a size as ``arg`` and share their sizes, run defaults and skeleton in
``configs/_common.py`` (``nlx.presets._common``: ``SIZES``, ``MODEL_PRESETS``, ``RUN_PRESETS``,
``AXIS_RULES``, ``model_config``, ``config``, ``family_config``), whose names are also this
module's.

``load("configs/transformer.py:tiny", ["train.steps=5"])`` imports a config file, calls
``get_config`` and applies ``key=value`` overrides (``load("transformer:tiny")``: a shipped config
by name); ``load_gin(files, bindings)`` builds the same config from gin files that bind the section
dataclasses; ``validate`` is the one validation step.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Optional, Sequence

import ml_collections

from nlx.nn.config import ModelConfig
# The presets' names are also nlx.configs.X (nlx.convert, tests and user configs use them).
# pylint: disable=unused-import
from nlx.presets._common import (AXIS_RULES, BENCH_SIZE, MLP_RATIO, MODEL_PRESETS,
                                 NOMINAL_PARAMS, PAPER_SIZES, RUN_PRESETS, SIZES, config,
                                 family_config, model_config)
# pylint: enable=unused-import


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
  return family_config(family, size)


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
