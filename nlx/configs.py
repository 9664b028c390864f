"""Model size presets shared by every ``configs/<family>.py``, and the config-file loader.

A config file defines ``get_config(arg)`` returning an ``ml_collections.ConfigDict`` whose
``model`` field holds every ``nlx.nn.ModelConfig`` field; ``arg`` is a size: ``tiny`` (trains on
a laptop CPU), ``340m``, ``760m`` or ``1.3b`` (the paper's sizes, within ±10% of their names in
parameters), or ``20m`` (the size of ``nlx bench models``; the paper sizes' family settings). ``load("configs/transformer.py:tiny", ["model.d_model=128"])`` imports a config file,
calls ``get_config`` and applies ``key=value`` overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Optional, Sequence

import ml_collections

from nlx.nn.config import ModelConfig

PAPER_SIZES = ("340m", "760m", "1.3b")
BENCH_SIZE = "20m"  # the size of ``nlx bench models``
SIZES = ("tiny",) + PAPER_SIZES + (BENCH_SIZE,)

# The shared presets. Paper sizes follow the Transformer++ baselines of flash-linear-attention and
# Titans (d_model 1024 / 1536 / 2048, 24 layers, head dim 64, 32K vocabulary).
_PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, mlp_dim=192, vocab_size=256,
                 max_seq_len=4096, state_dim=16, mamba_head_dim=32, memory_chunk_size=16,
                 chunk_size=64),
    "340m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64),
    "760m": dict(d_model=1536, n_layers=24, n_heads=24, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=32, vocab_size=32000, max_seq_len=4096,
                 state_dim=128, mamba_head_dim=64),
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


def config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The top-level config of a config file: for now only ``model`` (training adds the rest)."""
  return ml_collections.ConfigDict({"model": model})


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``path.py[:arg]``: imports the file, calls ``get_config(arg)``, applies overrides.

  Args:
    spec: ``"configs/transformer.py:tiny"`` (``get_config("tiny")``) or ``"configs/x.py"``
      (``get_config()``).
    overrides: ``"model.d_model=128"`` strings; values are Python literals (or bare strings).

  Returns:
    The ConfigDict.
  """
  path, sep, arg = spec.rpartition(":") if ":" in os.path.basename(spec) else (spec, "", "")
  if not sep:
    path = spec
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist (spec {spec!r}; expected "
                     "'path/to/config.py[:arg]')")
  module_spec = importlib.util.spec_from_file_location(
      f"nlx_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  cfg = module.get_config(arg) if sep else module.get_config()
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
  *parents, leaf = key.split(".")
  node = cfg
  for name in parents:
    if name not in node:
      raise ValueError(f"override {item!r}: no field {name!r}; allowed: {sorted(node.keys())}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"override {item!r}: no field {leaf!r}; allowed: {sorted(node.keys())}")
  node[leaf] = value
