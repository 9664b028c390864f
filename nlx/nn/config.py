"""The model config: the core fields, composed with the fields of each family into ``ModelConfig``.

``config.model`` (an ``ml_collections.ConfigDict`` or a plain dict) is read into a frozen
``ModelConfig``; unknown fields, wrong types and inconsistent values are ValueErrors that name the
field, the value and what is allowed (``nlx.validation``). Families check the fields they use
through ``ModelConfig.require``.

Where the fields are defined: each family's fields are a frozen dataclass beside its module, with
their defaults, their docs and their check, and this module holds the core ones:

* ``CoreFields``, ``NormInitFields`` (here): family, widths, heads, vocabulary, attention,
  chunking, implementation; RMSNorm's epsilon and the embedding's init.
* ``Mamba2Fields`` (``nlx.nn.mamba2_config``): ``state_dim``, ``mamba_*``.
* ``NeuralMemoryFields`` (``nlx.nn.neural_memory_config``): ``memory_expand``, ``n_persistent``,
  ``ttt_*``, ``titans_*`` (Titans and TTT share ``nlx.nn.neural_memory``).
* ``CmsFields`` (``nlx.nn.cms_config``): ``cms``, ``cms_*``.
* ``HopeFields`` (``nlx.nn.hope_config``): ``hope_*``.

Composition: ``ModelConfig`` inherits every field class (dataclass inheritance). The names stay
flat (``--config.model.hope_chunk_size``, the .gin bindings, every saved ``config.json``) and
``ModelConfig`` is still one frozen dataclass: the same ``__init__``, equality and hash (configs
are jit cache keys and dict keys), ``dataclasses.replace`` and ``asdict``. A dataclass collects
inherited fields from its last base to its first, so the bases are listed in reverse ``GROUPS``
order: the fields keep the order they had when ModelConfig declared all of them, hence the same
``repr``, ``asdict`` and ConfigDicts of ``configs/`` as before. That order is also why the core
fields are two classes (``NormInitFields`` came last of them) and why Titans and TTT share one
class (their fields interleave). A family module imports this module (for ``ModelConfig``), so its
field class lives in a small ``<family>_config.py`` beside it, which imports no JAX.

``ModelConfig.__post_init__`` checks the type of every field first, then each group in order
(``GROUPS``: the core, Mamba2, the neural memories, CMS, HOPE).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from nlx import validation
from nlx.nn.cms_config import CMS_CHOICES, CmsFields, validate_cms
from nlx.nn.hope_config import HOPE_CHOICES, HopeFields, validate_hope
from nlx.nn.mamba2_config import Mamba2Fields, validate_mamba2
from nlx.nn.neural_memory_config import (MAX_CHUNK_STEP, NeuralMemoryFields,
                                         validate_neural_memory)

IMPLS = ("auto", "chunked", "recurrent")
# Rematerialisation of the scanned layer group (nlx.nn.model.LM._run_layers).
REMATS = ("none", "full", "dots")
# Allowed values of the string fields of HOPE and CMS (docs/EQUATIONS.md §7); the first is the
# default. Defined beside the families.
CHOICES = {**CMS_CHOICES, **HOPE_CHOICES}

__all__ = ["ModelConfig", "CoreFields", "NormInitFields", "Mamba2Fields", "NeuralMemoryFields",
           "CmsFields", "HopeFields", "GROUPS", "IMPLS", "REMATS", "CHOICES", "MAX_CHUNK_STEP"]


@dataclasses.dataclass(frozen=True)
class CoreFields:
  """The core fields of ``config.model``, read by every family.

  Attributes:
    family: the mixer family (a name registered in ``nlx.nn.registry``).
    vocab_size: V, the vocabulary.
    d_model: the residual width d.
    n_layers: number of blocks (a multiple of the family's pattern length: Samba and Titans MAL
      interleave two block types).
    n_heads: H, heads of the mixer.
    n_kv_heads: key/value heads of softmax attention (grouped-query); None = n_heads.
    head_dim: key dimension per head; None = d_model // n_heads.
    expand_v: value dimension per head = expand_v · head_dim (RetNet, Gated DeltaNet use 2).
    mlp_dim: hidden width of the SwiGLU MLP of every block.
    tie_embeddings: the output head reuses the embedding table.
    max_seq_len: length of the KV cache of full (unwindowed) attention in ``init_state``.
    rope_theta: RoPE base.
    window: sliding window of softmax attention (None: full causal attention). Samba, Titans
      MAG/MAL use it for their attention; Titans MAC uses it as the segment length.
    conv_size: width of the short causal convolutions (0: none).
    chunk_size: chunk of the exact chunked forms of linear_attention / delta_rule.
    memory_chunk_size: chunk of the chunk-start gradients of titans_memory (TTT, Titans): a
      modelling choice; 1 is online gradient descent, for which step-by-step decoding is exact.
    impl: implementation of the nlx.ops calls: "auto" | "chunked" | "recurrent".
    remat: rematerialisation of each scanned layer group in the backward pass: "none" (keep
      every activation), "full" (keep only the group's input; recompute the rest) or "dots"
      (keep the results of matmuls without batch dimensions, i.e. the projections; recompute
      the rest). Same values, less memory, more FLOPs.
    scan_layers: run the layer groups as one rolled ``lax.scan`` (True: one group compiled,
      whatever the depth) or unrolled (False: a straight-line program, faster on a CPU at a few
      layers, where the rolled loop stacks and slices every group's residuals; compile time
      grows with the depth). The parameters are stacked on the "layers" axis either way, so
      checkpoints do not change.
  """

  family: str = "transformer"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 2
  n_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  expand_v: int = 1
  mlp_dim: int = 172
  tie_embeddings: bool = True
  max_seq_len: int = 4096
  rope_theta: float = 10000.0
  window: Optional[int] = None
  conv_size: int = 4
  chunk_size: int = 64
  memory_chunk_size: int = 16
  impl: str = "auto"
  remat: str = "none"
  scan_layers: bool = True

  @property
  def dk(self) -> int:
    """Key (and query) dimension per head."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def dv(self) -> int:
    """Value dimension per head."""
    return self.expand_v * self.dk

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class NormInitFields:
  """The core fields of ``config.model`` that come after the families' in its field order.

  Attributes:
    norm_eps: epsilon of RMSNorm.
    init_std: std of the embedding.
  """

  norm_eps: float = 1e-6
  init_std: float = 0.02


def validate_core(cfg: CoreFields) -> None:
  """Checks the core fields (their types are checked first, with every field's)."""
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "expand_v", "mlp_dim",
               "max_seq_len", "chunk_size", "memory_chunk_size"):
    validation.check_at_least(f"model.{name}", getattr(cfg, name), 1, got=True)
  validation.check_at_least("model.conv_size", cfg.conv_size, 0, got=True)
  for name in ("n_kv_heads", "head_dim", "window"):
    validation.check_at_least(f"model.{name}", getattr(cfg, name), 1, got=True, none_ok=True)
  validation.check_choice("model.impl", cfg.impl, IMPLS, style="one_of")
  validation.check_choice("model.remat", cfg.remat, REMATS, style="one_of")
  if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
    raise ValueError(f"model.n_heads={cfg.n_heads} must divide model.d_model={cfg.d_model} "
                     "(or set model.head_dim)")
  if cfg.n_heads % cfg.kv_heads:
    raise ValueError(f"model.n_kv_heads={cfg.n_kv_heads} must divide "
                     f"model.n_heads={cfg.n_heads}")


# Every field class with its check, in the order of ModelConfig's fields.
GROUPS = ((CoreFields, validate_core), (Mamba2Fields, validate_mamba2),
          (NeuralMemoryFields, validate_neural_memory), (NormInitFields, None),
          (CmsFields, validate_cms), (HopeFields, validate_hope))


@dataclasses.dataclass(frozen=True)
class ModelConfig(HopeFields, CmsFields, NormInitFields, NeuralMemoryFields, Mamba2Fields,
                  CoreFields):
  """Fields of ``config.model``: every field of the classes in ``GROUPS``, flat.

  The bases are ``GROUPS`` in reverse, so that the fields come in ``GROUPS`` order (module
  docstring). Each field is documented in its class: ``CoreFields``, ``Mamba2Fields``,
  ``NeuralMemoryFields``, ``NormInitFields``, ``CmsFields``, ``HopeFields``.
  """

  def __post_init__(self):
    validation.check_fields(self, "model", got=True)
    for _, check in GROUPS:
      if check is not None:
        check(self)

  def require(self, family: str, **conditions: tuple[bool, str]) -> None:
    """Raises a ValueError for the first ``field=(ok, allowed)`` with ``ok`` false."""
    for name, (ok, allowed) in conditions.items():
      if not ok:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not allowed for family "
                         f"{family!r}: {allowed}")

  @classmethod
  def from_config(cls, config: Any) -> "ModelConfig":
    """Reads a ConfigDict / mapping / ModelConfig; unknown fields are refused by name."""
    if isinstance(config, cls):
      return config
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise ValueError(f"model config must be a ConfigDict or a mapping; got "
                       f"{type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**dict(config))
