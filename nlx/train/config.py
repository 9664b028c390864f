"""The sections of a run config besides ``model``, and the one validation step of a whole config.

A run config (``configs/<family>.py:<size>``, built by ``nlx.configs.config``) is an
``ml_collections.ConfigDict`` with the sections ``model``, ``optimizer``, ``data``, ``train``,
``mesh`` and ``axis_rules``. ``validate(config)`` reads every section into its frozen dataclass
(``ModelConfig``, ``OptimizerConfig``, ``DataConfig``, ``TrainConfig``, ``MeshConfig``) and checks
the values against each other; an unknown field, a wrong type or an impossible value is a
``ValueError`` naming the field, the value and what is allowed (``nlx.validation``). The
dataclasses are also the gin configurables (``nlx.configs.load_gin``).

This module imports no JAX: it runs before ``jax.distributed.initialize``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from nlx import validation

SECTIONS = ("model", "optimizer", "data", "train", "mesh", "axis_rules")
MESH_AXES = ("data", "fsdp", "tensor")
OPTIMIZERS = ("adamw", "adam_memory", "muon", "m3", "momentum_memory")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZERS = ("byte", "sentencepiece", "hf")
SOURCES = ("embedded", "text", "jsonl", "seqio", "hf")
# Sources whose documents are records: train.pack_documents=None packs them.
PACKED_SOURCES = ("jsonl", "seqio", "hf")
TRACKERS = ("jsonl", "tensorboard", "wandb")
FINITE_CHECKS = ("log_steps", "every_step")
DTYPES = ("float32", "bfloat16")
# Every logical axis name of an nlx.nn parameter (tests build each family and check), plus the
# activation axis "batch". Rules map each to a mesh axis, a tuple of mesh axes, or None.
LOGICAL_AXES = ("batch", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "head_dim_v",
                "qkv", "gates", "conv", "layers", "memory_mlp", "memory_rows", "persistent",
                "cms_target")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """``config.optimizer``.

  Attributes:
    name: ``adamw`` (optax), ``adam_memory`` (Adam as a memory), ``muon`` (``nonlinear_output``),
      ``m3`` (multi-scale momentum Muon) or ``momentum_memory`` (SGD with a momentum memory).
    learning_rate: the peak learning rate.
    schedule: ``cosine`` or ``linear`` decay to ``min_lr_ratio`` after warmup, or ``constant``.
    warmup_steps: linear warmup from 0 (steps).
    min_lr_ratio: final learning rate / peak.
    weight_decay: decoupled weight decay (all parameters of rank >= 2).
    b1, b2, eps: Adam's moment rates and epsilon (Muon's momentum is ``b1`` too).
    clip_norm: global-norm gradient clipping (0: none).
    slow_period: M3's slow-level period (steps).
  """

  name: str = "adamw"
  learning_rate: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  slow_period: int = 100

  def __post_init__(self):
    validation.check_fields(self, "optimizer")
    validation.check_choice("optimizer.name", self.name, OPTIMIZERS)
    validation.check_choice("optimizer.schedule", self.schedule, SCHEDULES)
    validation.check_minimums("optimizer", self, learning_rate=0.0, warmup_steps=0,
                              min_lr_ratio=0.0, weight_decay=0.0, eps=0.0, clip_norm=0.0,
                              slow_period=1)
    for name in ("b1", "b2", "min_lr_ratio"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"optimizer.{name}={getattr(self, name)!r} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``config.data``.

  Attributes:
    source: ``embedded`` (the corpus shipped in the package; no files), ``text`` (a UTF-8 file, or
      a directory with ``*train*``/``*valid*`` files or one text file), ``jsonl`` (one JSON
      object per line, text in ``text_field``), ``seqio`` (the task ``seqio_task``; extra
      ``nlx[seqio]``) or ``hf`` (a Hugging Face ``datasets`` dataset ``hf_dataset``; extra
      ``nlx[hf]``).
    path: the file or directory of ``text``/``jsonl``; also accepted with ``source='embedded'``,
      which then switches to ``text`` (``--config.data.path=DATA/ptb``).
    text_field: the field of a jsonl record that holds the text.
    tokenizer: ``byte`` (UTF-8 bytes, id 0 ends a document), ``sentencepiece`` or ``hf`` (a
      Hugging Face ``tokenizer.json``).
    spm_model: a SentencePiece ``.model`` file; None trains one on the training text (saved in
      the workdir) with ``spm_vocab_size`` pieces.
    spm_vocab_size: the vocabulary of a trained SentencePiece model.
    tokenizer_file: the ``tokenizer.json`` of ``tokenizer='hf'`` (None: ``WORKDIR/tokenizer.json``).
    val_fraction: the tail of a single training file held out for validation.
    shuffle: shuffle the packed windows (the order is a pure function of seed and index).
    seqio_task: the registered seqio task name of ``source='seqio'``.
    seqio_module: modules imported before the task is looked up (they register it), e.g.
      ``("t5.data.tasks",)`` or ``("my_tasks",)``.
    hf_dataset: ``source='hf'``: a dataset name of the Hub, or a builder for local files
      (``json``, ``parquet``, ``csv``, ``text``) whose ``data_files`` are ``path``.
    hf_config: the dataset's config name (None: its default).
    hf_train_split, hf_validation_split: the splits read (None, or a split the dataset does
      not have, which is said on stderr: the last ``val_fraction`` of the training documents).
    hf_streaming: read the dataset as a stream (``datasets``' ``streaming=True``) instead of
      materialising it.
    cache_dir: the token cache: each (source, tokenizer) pair is tokenized once into a
      memory-mapped token store under this directory (local or ``gs://``), which restarts and the
      other hosts reuse (None: ``$NLX_CACHE``, else ``~/.cache/nlx``).
    token_cache: use the token cache (False: tokenize into memory at every start).
    prefetch_threads: grain read threads on each host.
  """

  source: str = "embedded"
  path: Optional[str] = None
  text_field: str = "text"
  tokenizer: str = "byte"
  spm_model: Optional[str] = None
  spm_vocab_size: int = 1024
  tokenizer_file: Optional[str] = None
  val_fraction: float = 0.1
  shuffle: bool = True
  seqio_task: Optional[str] = None
  seqio_module: Optional[tuple] = None
  hf_dataset: Optional[str] = None
  hf_config: Optional[str] = None
  hf_train_split: str = "train"
  hf_validation_split: Optional[str] = "validation"
  hf_streaming: bool = False
  cache_dir: Optional[str] = None
  token_cache: bool = True
  prefetch_threads: int = 2

  def __post_init__(self):
    validation.check_fields(self, "data")
    validation.check_choice("data.source", self.source, SOURCES)
    validation.check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
    validation.check_minimums("data", self, spm_vocab_size=8, prefetch_threads=0)
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in (0, 1)")
    if self.source in ("text", "jsonl") and not self.path:
      raise ValueError(f"data.path={self.path!r}: source {self.source!r} needs a file or "
                       "directory (or data.source='embedded')")
    if self.source == "seqio" and not self.seqio_task:
      raise ValueError("data.seqio_task=None: source 'seqio' needs a registered task name")
    if self.seqio_module is not None and not (
        self.seqio_module and all(isinstance(m, str) and m for m in self.seqio_module)):
      raise ValueError(f"data.seqio_module={self.seqio_module!r} must be None or a non-empty "
                       "tuple of module names (strings)")
    if self.source == "hf" and not self.hf_dataset:
      raise ValueError("data.hf_dataset=None: source 'hf' needs a dataset name of the Hub or a "
                       "builder for local files (json, parquet, csv, text) with data.path")

  @property
  def resolved_source(self) -> str:
    """The source actually read: ``embedded`` with a ``path`` reads that text."""
    return "text" if self.source == "embedded" and self.path else self.source


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """``config.train``.

  Attributes:
    steps: optimizer steps of the run.
    batch_size: global batch (sequences per step, over all hosts and devices).
    seq_len: tokens per sequence (the model sees ``seq_len`` and predicts the next of each).
    log_every: steps between logged metrics (progress bar, metrics.jsonl, TensorBoard).
    eval_every: steps between validation losses (a multiple of ``log_every``; 0: only at the end).
    eval_batches: batches of the validation split per evaluation.
    checkpoint_every: steps between checkpoints (0: only at the end and on SIGTERM).
    keep_checkpoints: the newest checkpoints kept.
    seed: seed of the parameters, the data order and the train RNG.
    compute_dtype: ``float32`` or ``bfloat16`` (parameters stay float32).
    plots: write PNG curves at the end.
    init_from: an ``nlx.pretrained`` directory (``nlx export``, ``nlx convert``) whose parameters
      start the run when the workdir has no checkpoint (None: random initialisation).
    trainable: regexes over parameter paths (``nlx.train.step.param_paths``, e.g.
      ``layers/blocks/0/mlp/blocks/0/.*``); only parameters whose path one of them matches in
      full are trained and get optimizer state, the rest stay as they are. None: all of them.
    pack_documents: each document is read on its own inside the packed rows. True: the batches
      carry ``segment_ids`` (``nlx.data.pipeline.pack_segments``; a document is its tokens and
      the end-of-document id that ends it), the model gets them (``model(tokens,
      segment_ids=ids)``: states restart, attention stays inside the document) and the loss
      leaves out every target that crosses a document boundary: the first token of a document
      is not predicted from the one before (the mean is over the targets kept). False: one
      stream, as without packing (a document conditions on the ones before it in its row).
      None (the default): True for ``jsonl`` and ``seqio`` data (one document per record or
      example), False for text files and the embedded corpus; the paper sizes set True
      (``configs/_common.py``). ``RunConfig.pack_documents`` is the value in force.
    trackers: where logged metrics go, on process 0: ``jsonl`` (``metrics.jsonl``),
      ``tensorboard``, ``wandb`` (Weights & Biases; extra ``nlx[wandb]``; the run id is kept in
      the workdir so that a resumed run continues the same wandb run).
    wandb_project, wandb_entity: the wandb project and entity (None entity: wandb's default).
    check_finite: when the step's finite checks (loss, gradients, parameters) are fetched to the
      host: ``log_steps`` (at every log step, before every checkpoint and at the end; the device
      keeps the count and the first non-finite step of the interval, so the report still names
      it and its first bad tensor; a non-finite step keeps the old parameters, so the steps
      after it train on until the check) or ``every_step`` (a stop the moment it happens, at the
      cost of a device-to-host sync per step).
  """

  steps: int = 600
  batch_size: int = 16
  seq_len: int = 256
  log_every: int = 20
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  seed: int = 0
  compute_dtype: str = "float32"
  plots: bool = True
  init_from: Optional[str] = None
  trainable: Optional[tuple] = None
  pack_documents: Optional[bool] = None
  trackers: tuple = ("jsonl", "tensorboard")
  wandb_project: str = "nlx"
  wandb_entity: Optional[str] = None
  check_finite: str = "log_steps"

  def __post_init__(self):
    if self.pack_documents is not None and not isinstance(self.pack_documents, bool):
      raise ValueError(f"train.pack_documents={self.pack_documents!r} must be True (documents "
                       "read apart: segment ids, no loss across a boundary), False (one stream) "
                       "or None (True for jsonl and seqio data)")
    validation.check_fields(self, "train")
    if self.trainable is not None:
      import re  # pylint: disable=g-import-not-at-top
      if not self.trainable or not all(isinstance(r, str) for r in self.trainable):
        raise ValueError(f"train.trainable={self.trainable!r} must be None or a non-empty tuple "
                         "of regexes (strings)")
      for regex in self.trainable:
        try:
          re.compile(regex)
        except re.error as e:
          raise ValueError(f"train.trainable: {regex!r} is not a regex: {e}") from None
    validation.check_minimums("train", self, steps=1, batch_size=1, seq_len=2, log_every=1,
                              eval_every=0, eval_batches=1, checkpoint_every=0,
                              keep_checkpoints=1)
    validation.check_choice("train.compute_dtype", self.compute_dtype, DTYPES)
    validation.check_choice("train.check_finite", self.check_finite, FINITE_CHECKS)
    for tracker in self.trackers:
      validation.check_choice("train.trackers", tracker, TRACKERS)
    if len(set(self.trackers)) != len(self.trackers):
      raise ValueError(f"train.trackers={tuple(self.trackers)!r} names a tracker twice; allowed: "
                       f"each of {list(TRACKERS)} at most once")
    if self.eval_every % self.log_every:
      raise ValueError(f"train.eval_every={self.eval_every} must be a multiple of "
                       f"train.log_every={self.log_every} (evaluations are logged)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """``config.mesh``: sizes of the mesh axes ``data``, ``fsdp``, ``tensor``.

  ``data``, ``fsdp``, ``tensor`` are the axes within a slice (ICI): at most one is -1, which takes
  the devices the others leave. ``dcn_data``, ``dcn_fsdp``, ``dcn_tensor`` split the same axes
  across the slices of a multislice run (DCN, MaxText's ``dcn_*_parallelism``): each mesh axis
  is ``ici × dcn`` long, and the product of the dcn sizes must equal the number of slices (at
  most one is -1: the slices the others leave). One slice: all dcn sizes 1.

  ``resolve(n_devices, n_slices)`` gives the total length of each axis (what the batch and the
  parameters are split over), ``resolve_ici_dcn`` the two parts (``nlx.train.sharding.make_mesh``
  lays the devices out with them); both refuse sizes that do not fit, naming the fields.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1

  def __post_init__(self):
    validation.check_fields(self, "mesh")
    sizes = self.sizes()
    if any(s == 0 or s < -1 for s in sizes.values()):
      raise ValueError(f"mesh {sizes}: every axis must be >= 1 or -1 (fill)")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    dcn = self.dcn_sizes()
    if any(s == 0 or s < -1 for s in dcn.values()):
      raise ValueError(f"mesh {dcn}: every dcn axis must be >= 1 or -1 (fill with the slices)")
    if list(dcn.values()).count(-1) > 1:
      raise ValueError(f"mesh {dcn}: at most one dcn axis may be -1")

  def sizes(self) -> dict:
    return {name: getattr(self, name) for name in MESH_AXES}

  def dcn_sizes(self) -> dict:
    return {f"dcn_{name}": getattr(self, f"dcn_{name}") for name in MESH_AXES}

  def resolve(self, n_devices: int, n_slices: Optional[int] = None) -> dict:
    """``{axis: size}``: the total length of each mesh axis, ``ici × dcn``.

    Args:
      n_devices: the devices of the run (all slices together).
      n_slices: the slices of the run; None: the product of the dcn sizes (a -1 among them
        counts as 1), which is right whenever the dcn sizes are fixed.

    Raises:
      ValueError: the sizes do not fit the devices or the slices (see ``resolve_ici_dcn``).
    """
    ici, dcn = self.resolve_ici_dcn(n_devices, n_slices)
    return {name: ici[name] * dcn[name] for name in MESH_AXES}

  def resolve_ici_dcn(self, n_devices: int, n_slices: Optional[int] = None
                      ) -> tuple[dict, dict]:
    """``(ici, dcn)``: ``{axis: size}`` within a slice and across the slices, -1s filled.

    The dcn -1 takes the slices the other dcn sizes leave; the ici -1 the devices of one slice
    (``n_devices / n_slices``) the other ici sizes leave.

    Args:
      n_devices: the devices of the run (all slices together).
      n_slices: the slices of the run; None: the product of the dcn sizes (-1 counts as 1).

    Raises:
      ValueError: naming the fields, their values and the devices or slices they must fit.
    """
    dcn = {name: getattr(self, f"dcn_{name}") for name in MESH_AXES}
    if n_slices is None:
      n_slices = math.prod(s for s in dcn.values() if s != -1)
    if n_slices < 1 or n_devices < 1 or n_devices % n_slices:
      raise ValueError(f"the run's {n_devices} devices do not split evenly over its {n_slices} "
                       "slices; allowed: the same number of devices in every slice")
    dcn = self._fill(dcn, n_slices, "dcn_", "slice", f"{n_slices} slice{'s' * (n_slices > 1)}")
    per_slice = n_devices // n_slices
    where = (f"{n_devices} devices" if n_slices == 1 else
             f"{per_slice} devices per slice ({n_devices} devices / {n_slices} slices)")
    ici = self._fill(self.sizes(), per_slice, "", "device", where)
    return ici, dcn

  @staticmethod
  def _fill(sizes: dict, total: int, prefix: str, unit: str, where: str) -> dict:
    """``sizes`` with its -1 filled so that their product is ``total`` (devices of a slice, or
    slices: ``unit``); else a ValueError naming the fields (``prefix``: ``dcn_`` or none)."""
    known = math.prod(s for s in sizes.values() if s != -1)
    shown = {f"{prefix}{k}": v for k, v in sizes.items()}
    if -1 in sizes.values():
      if total % known:
        raise ValueError(f"mesh {shown}: the fixed axes ({known} {unit}s) do not divide the "
                         f"{where}; allowed: sizes whose product divides the {unit} count")
      sizes = {k: (total // known if v == -1 else v) for k, v in sizes.items()}
    product = math.prod(sizes.values())
    if product == total:
      return sizes
    if prefix:  # the dcn fields by name: "mesh.dcn_data=2 but the run has 1 slice"
      named = ", ".join(f"mesh.{k}={v}" for k, v in shown.items() if v != 1) or (
          "=".join(f"mesh.{k}" for k in shown) + "=1")
      raise ValueError(f"{named} but the run has {where}; allowed: dcn sizes whose product is "
                       f"the slice count ({total}), or one of them -1 (takes the slices)")
    raise ValueError(f"mesh {sizes}: product {product} != {where}; allowed: sizes whose product "
                     "is the device count (or one -1)")


SECTION_CLASSES = {"optimizer": OptimizerConfig, "data": DataConfig, "train": TrainConfig,
                   "mesh": MeshConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A validated run config: every section as its dataclass, ``axis_rules`` as a dict."""

  model: Any  # nlx.nn.ModelConfig
  optimizer: OptimizerConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  axis_rules: dict

  @property
  def pack_documents(self) -> bool:
    """``train.pack_documents`` in force: its value, or for None whether the data are jsonl or
    seqio (their documents are records)."""
    if self.train.pack_documents is not None:
      return self.train.pack_documents
    return self.data.resolved_source in PACKED_SOURCES


def read_section(cls, name: str, values: Any):
  """Reads ``values`` (a ConfigDict or mapping) into ``cls``; unknown fields refused by name."""
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ValueError(f"config.{name} must be a mapping; got {type(values).__name__}")
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"unknown field(s) {[f'{name}.{u}' for u in unknown]}; allowed: {names}")
  return cls(**dict(values))


def read_axis_rules(rules: Any) -> dict:
  """``{logical axis: mesh axis | tuple of mesh axes | None}`` from a mapping or pairs."""
  if hasattr(rules, "to_dict"):
    rules = rules.to_dict()
  try:
    rules = dict(rules.items() if isinstance(rules, Mapping) else rules)
  except (TypeError, ValueError):
    raise ValueError(f"axis_rules={rules!r} must be a mapping or (logical axis, mesh axis) "
                     "pairs") from None
  unknown = sorted(set(rules) - set(LOGICAL_AXES))
  if unknown:
    raise ValueError(f"axis_rules: unknown logical axis {unknown}; allowed: {list(LOGICAL_AXES)}")
  for logical, target in rules.items():
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"axis_rules.{logical}={target!r}: {t!r} is not a mesh axis; allowed: "
                         f"{list(MESH_AXES)}, a tuple of them, or None")
    rules[logical] = tuple(targets) if isinstance(target, (tuple, list)) else target
  missing = [a for a in LOGICAL_AXES if a not in rules]
  if missing:
    raise ValueError(f"axis_rules: no rule for logical axis {missing}; every one of "
                     f"{list(LOGICAL_AXES)} needs a mesh axis, a tuple of them, or None")
  return rules


def validate(config: Any, n_devices: Optional[int] = None, n_processes: int = 1,
             tokenizer_vocab: Optional[int] = None, n_slices: Optional[int] = None) -> RunConfig:
  """The one validation step of a run config.

  Args:
    config: the ConfigDict (or mapping) of a run.
    n_devices: when given, the mesh must cover exactly this many devices and the batch must
      split over its ``data`` x ``fsdp`` axes.
    n_processes: hosts of the run; the batch must split over them.
    tokenizer_vocab: when given, ``model.vocab_size`` must hold every token id.
    n_slices: the slices of the run (``nlx.train.sharding.slice_count``); None: as many as the
      fixed dcn sizes of ``config.mesh`` (``MeshConfig.resolve``).

  Returns:
    The ``RunConfig``.

  Raises:
    ValueError: naming the field, the value and what is allowed.
  """
  from nlx.nn.config import ModelConfig  # pylint: disable=g-import-not-at-top  (no JAX there)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  unknown = sorted(set(config) - set(SECTIONS))
  missing = [s for s in SECTIONS if s not in config]
  if unknown or missing:
    raise ValueError(f"config sections: unknown {unknown}, missing {missing}; allowed and "
                     f"required: {list(SECTIONS)}")
  run = RunConfig(model=ModelConfig.from_config(config["model"]),
                  axis_rules=read_axis_rules(config["axis_rules"]),
                  **{name: read_section(cls, name, config[name])
                     for name, cls in SECTION_CLASSES.items()})
  _check_model_for_training(run)
  if n_devices is not None:
    sizes = run.mesh.resolve(n_devices, n_slices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    if run.train.batch_size % batch_shards:
      raise ValueError(f"train.batch_size={run.train.batch_size} must be a multiple of mesh "
                       f"data x fsdp = {batch_shards} (the batch is split over them)")
  if run.train.batch_size % n_processes:
    raise ValueError(f"train.batch_size={run.train.batch_size} must be a multiple of the "
                     f"{n_processes} processes (each host loads its share)")
  if tokenizer_vocab is not None and tokenizer_vocab > run.model.vocab_size:
    raise ValueError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer_vocab} ids (data.tokenizer={run.data.tokenizer!r}); allowed: "
                     f">= {tokenizer_vocab}")
  return run


def _check_model_for_training(run: RunConfig) -> None:
  """Model checks of the family, and the ones that depend on the training fields."""
  from nlx.nn import model as nn_model  # pylint: disable=g-import-not-at-top
  import nlx.nn.families  # pylint: disable=g-import-not-at-top,unused-import  (registers them)
  family = nn_model.validate(run.model)
  m, seq_len = run.model, run.train.seq_len
  if family.mlp is not None and m.cms:
    idle = [p for p, lr in zip(m.cms_periods, m.cms_lrs) if lr and p >= seq_len]
    if idle:  # a level's first update comes after token P - 1: no token of a window reads it
      raise ValueError(
          f"model.cms_periods={tuple(m.cms_periods)}: the level of period {idle[0]} never updates "
          f"where training reads it (train.seq_len={seq_len}; its first update comes after "
          f"token {idle[0]}), so its in-context step is never trained and can diverge on longer "
          f"inputs; allowed: every period < train.seq_len, or that level's model.cms_lr 0")
  if run.optimizer.name == "m3" and run.train.steps < run.optimizer.slow_period:
    raise ValueError(f"optimizer.slow_period={run.optimizer.slow_period} exceeds train.steps="
                     f"{run.train.steps}: the slow level would never update; allowed: <= steps")
  if run.data.tokenizer == "byte" and run.model.vocab_size < 256:
    raise ValueError(f"model.vocab_size={run.model.vocab_size} is too small for the byte "
                     "tokenizer; allowed: >= 256")

