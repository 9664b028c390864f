"""What every shipped config shares (big_vision's ``configs/common.py``): the sizes, their run
defaults, the axis rules and the skeleton of a family config.

A family file ``configs/<family>.py`` holds only what is its own, e.g. RetNet's::

  from nlx.presets import _common as common

  def get_config(size: str = "tiny"):
    return common.family_config("retnet", size, expand_v=2, mlp_ratio=1.5)

``family_config(family, size, *, train=None, **model)`` is ``config(model_config(family, size,
**model), train=train)``: an ``ml_collections.ConfigDict`` with every section of a run
(``nlx.train.config``):

* ``model``: every ``nlx.nn.ModelConfig`` field: its default, then the size's preset
  (``MODEL_PRESETS``), then the family's settings. Sizes: ``tiny`` (trains on a laptop CPU),
  ``340m``, ``760m`` or ``1.3b`` (the paper's sizes, within ±10% of their names in parameters),
  or ``20m`` (the size of ``python -m benchmarks.models``; the paper sizes' family settings).
* ``optimizer``, ``data``, ``train``, ``mesh``: the run defaults of the size (``RUN_PRESETS``).
* ``axis_rules``: logical axis name -> mesh axis (``AXIS_RULES``).

Paper sizes are meant for a TPU v5p:4x4x4 slice (64 chips, FSDP over the slice) and compile there
with no overrides, e.g. ``nlx aot --config configs/hope.py:1.3b --topology v5p:4x4x4``
(docs/TRAINING.md, "TPU table"). Build a model::

  cfg = nlx.configs.load("configs/hope.py:tiny")  # or the shipped name "hope:tiny"
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))

The configs of the checkout install with nlx as the package ``nlx.presets`` (this module is
``nlx.presets._common``; its leading underscore keeps it out of the shipped configs). Its names
are also ``nlx.configs.model_config``, ``nlx.configs.config``, ``nlx.configs.SIZES``, ...
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from nlx.nn.config import ModelConfig

PAPER_SIZES = ("340m", "760m", "1.3b")
BENCH_SIZE = "20m"  # the size of ``python -m benchmarks.models``
SIZES = ("tiny",) + PAPER_SIZES + (BENCH_SIZE,)

# The model of each size. Paper sizes follow the Transformer++ baselines of flash-linear-attention
# and Titans (d_model 1024 / 1536 / 2048, 24 layers, head dim 64, 32K vocabulary). They are meant
# for a v5p:4x4x4 slice (64 chips, FSDP) and rematerialise every layer in the backward pass, which
# every family needs to fit there at 128 x 4096 tokens (docs/TRAINING.md, "TPU table").
_PAPER_MODEL = dict(n_layers=24, vocab_size=32000, max_seq_len=4096, state_dim=128,
                    mamba_head_dim=64, remat="full")
# tiny unrolls its two layer groups (``scan_layers=False``): on a CPU the rolled scan's stacking
# and slicing of every group's residuals made the train step 1.02-1.38x slower for every family
# (docs/RESULTS.md, "Unrolled layers"); the parameters, and so the checkpoints, are the same.
MODEL_PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, mlp_dim=192, vocab_size=256,
                 max_seq_len=4096, state_dim=16, mamba_head_dim=32, memory_chunk_size=16,
                 chunk_size=64, scan_layers=False),
    "340m": dict(_PAPER_MODEL, d_model=1024, n_heads=16),
    "760m": dict(_PAPER_MODEL, d_model=1536, n_heads=24),
    "1.3b": dict(_PAPER_MODEL, d_model=2048, n_heads=32),
    "20m": dict(d_model=384, n_layers=10, n_heads=6, vocab_size=4096, max_seq_len=2048,
                state_dim=64, mamba_head_dim=64),
}
NOMINAL_PARAMS = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9, "20m": 20e6}
MLP_RATIO = 8 / 3  # SwiGLU hidden width / d_model of Transformer++

# Run defaults per size: tiny trains on a CPU in minutes (byte tokenizer, embedded corpus: one
# document, so train.pack_documents stays None, True only for jsonl/seqio data); the paper sizes
# follow the flash-linear-attention / Titans recipe (AdamW 4e-4 cosine, 0.5M-token batches of 4K
# sequences, 2K warmup steps; 15B / 30B / 100B tokens) sharded FSDP over every chip, and read each
# document of their corpus apart (train.pack_documents=True: segment ids, no loss across a
# document boundary; docs/TRAINING.md, "Packed documents"); so does the 20m size.
_TINY_RUN = dict(
    optimizer=dict(),
    data=dict(),
    train=dict(),
    mesh=dict(data=-1, fsdp=1, tensor=1))
_PAPER_RUN = dict(
    optimizer=dict(learning_rate=4e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
    data=dict(source="text", path="data/corpus", tokenizer="sentencepiece", spm_vocab_size=32000),
    train=dict(batch_size=128, seq_len=4096, log_every=100, eval_every=1000, eval_batches=32,
               checkpoint_every=1000, keep_checkpoints=3, compute_dtype="bfloat16",
               pack_documents=True),
    mesh=dict(data=1, fsdp=-1, tensor=1))


def _paper_run(tokens: float) -> dict:
  """The paper run of ``tokens`` training tokens (steps of 128 x 4096 tokens)."""
  return dict(_PAPER_RUN, train=dict(_PAPER_RUN["train"], steps=tokens // (128 * 4096)))


RUN_PRESETS = {
    "tiny": _TINY_RUN,
    "20m": dict(_PAPER_RUN, data=dict(_PAPER_RUN["data"], spm_vocab_size=4096),
                train=dict(_PAPER_RUN["train"], batch_size=8, seq_len=2048, steps=10_000)),
    "340m": _paper_run(15e9),
    "760m": _paper_run(30e9),
    "1.3b": _paper_run(100e9),
}
# Logical axis -> mesh axis (MaxText's layout): the batch over data and fsdp, weights' model
# dimension over fsdp, their vocabulary / MLP / head dimension over tensor; axes that are small or
# scanned stay whole. An axis whose size a mesh axis does not divide is replicated.
AXIS_RULES = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"),
              ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
              ("head_dim_v", None), ("qkv", None), ("gates", None), ("conv", None),
              ("layers", None), ("memory_mlp", None), ("memory_rows", "fsdp"),
              ("persistent", None), ("cms_target", None))


# The CMS periods of HOPE and Hope-attention at the paper sizes (the paper's 32 / 256 / 2048 at
# T = 4096); the 20m benchmark trains at T = 2048, so its periods are halved: every level then
# updates where a training window reads it (nlx.train.config refuses a period >= train.seq_len).
PAPER_CMS_PERIODS = (32, 256, 2048)
BENCH_CMS_PERIODS = (16, 128, 1024)


def paper_cms_periods(size: str) -> tuple:
  """The CMS periods of a paper size (``BENCH_SIZE``: ``BENCH_CMS_PERIODS``)."""
  return BENCH_CMS_PERIODS if size == BENCH_SIZE else PAPER_CMS_PERIODS


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
  fields.update(MODEL_PRESETS[size], family=family)
  if size != "tiny":
    fields["mlp_dim"] = _round_up(mlp_ratio * fields["d_model"], 128)
  fields.update(overrides)
  fields.update((tiny or {}) if size == "tiny" else (paper or {}))
  ModelConfig.from_config(fields)  # refuse a bad preset where it is written
  return ml_collections.ConfigDict(fields)


def _size_of(model: ml_collections.ConfigDict) -> str:
  """The preset whose width the model has (configs call ``config(model_config(f, size))``)."""
  for size, preset in MODEL_PRESETS.items():
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


def family_config(family: str, size: str, *, train: Optional[dict] = None,
                  **model) -> ml_collections.ConfigDict:
  """The run config of ``family`` at ``size``: ``config(model_config(family, size, **model))``.

  Args:
    family: a registered family name.
    size: one of ``SIZES``.
    train: overrides of the ``train`` section.
    **model: ``model_config``'s keywords: ``mlp_ratio``, ``tiny``, ``paper`` and fields.
  """
  return config(model_config(family, size, **model), train=train or {})
