"""The model config: every field, its default and its validation, in one place.

``config.model`` (an ``ml_collections.ConfigDict`` or a plain dict) is read into a frozen
``ModelConfig``; unknown fields, wrong types and inconsistent values are ValueErrors that name the
field, the value and what is allowed. Families check the fields they use through
``ModelConfig.require``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional

IMPLS = ("auto", "chunked", "recurrent")
# Rematerialisation of the scanned layer group (nlx.nn.model.LM._run_layers).
REMATS = ("none", "full", "dots")
# The largest step (lr_max × chunk) a chunk of chunk-start gradients may take on repeated keys.
MAX_CHUNK_STEP = 0.5
# Allowed values of the string fields of HOPE and CMS (docs/EQUATIONS.md §7); the first is the
# default.
CHOICES = {
    "cms_variant": ("sequential", "nested", "independent"),
    "cms_objective": ("local", "next_token"),
    "hope_memory": ("mlp", "linear"),
    "hope_objective": ("l2", "dot"),
    "hope_dgd": ("arxiv", "neurips", "off"),
    "hope_dgd_keys": ("per_layer",),
    "hope_chunk_boundary": ("previous_end",),
    "hope_gate_reduce": ("mean",),
    "hope_read": ("after_write", "before_write"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Fields of ``config.model``.

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
    state_dim: Mamba2's N (state size per head).
    mamba_expand: Mamba2's inner width = mamba_expand · d_model.
    mamba_head_dim: Mamba2's head dimension P.
    memory_expand: hidden width of MLP memories = memory_expand · head_dim.
    n_persistent: learned persistent-memory tokens of Titans MAC/MAG/MAL attention.
    ttt_base_lr: TTT's η_base: the inner learning rate is ``ttt_base_lr · sigmoid(·) / head_dim``
      (the TTT paper's scaling).
    titans_lr_max: the largest inner learning rate of the Titans memory; None: ``0.5 /
      memory_chunk_size``. A chunk of C tokens takes its C gradients at one state, so on C
      repeated keys the memory steps C·lr at once: C·lr_max ≥ 1 diverged on an untrained tiny
      model fed a repeated token (docs/RELIABILITY.md); values with C·lr_max > 0.5 are refused.
      With momentum η the step is lr·(1 − η), so the bound holds whatever η is learned.
    norm_eps: epsilon of RMSNorm.
    init_std: std of the embedding.

  CMS (``nlx.nn.cms``; families ``hope`` and ``hope_attention``; docs/EQUATIONS.md §3 and
  docs/EQUATIONS.md, choice 8):
    cms: the block's MLP is a Continuum Memory System (False: the plain SwiGLU of Transformer++,
      the "w/o CMS" ablation of Table 6).
    cms_periods: the update period (tokens) of each CMS level, strictly increasing, each dividing
      the next; one SwiGLU block (hidden width ``mlp_dim``) per level.
    cms_variant: "sequential" (chained residual blocks), "nested" (a faster level restarts from
      an initial state that the next slower level meta-learns) or "independent" (parallel blocks,
      learned weighted sum).
    cms_objective: the inner objective of the levels: "local" (½·mean-square error of each block
      to a learned linear target of its input, block-local) or "next_token" (the LM loss of the
      finished chunk; the LM then runs chunk by chunk).
    cms_lr: η^(ℓ) of the levels (Eq. 71): level ℓ subtracts η^(ℓ) × the sum of its gradients
      over its period. A float is the rate of every level; a tuple gives one rate per level (the
      length of ``cms_periods``). 0 freezes a level in context (every rate 0: the pretrained
      model, level stacking; e.g. ``(1e-3, 1e-3, 0.0)`` keeps a stacked slowest level fixed while
      the faster ones learn). ``cms_lrs`` is the per-level tuple either way.
    cms_stop_gradient: stop the outer gradient at the inner writes (default: gradients flow
      through every write, docs/EQUATIONS.md, choice 9).

  HOPE (``nlx.nn.hope``: self-modifying Titans; docs/EQUATIONS.md §4; "choice N" below is
  docs/EQUATIONS.md, choice N):
    hope_memory: "mlp" (residual ``x + W1 σ(W2 x)`` per head, Eq. 89) or "linear".
    hope_objective: inner objective of every memory: "l2" (``½‖M(k) − v̂‖²``, Eq. 88) or "dot"
      (``−⟨M(k), v̂⟩``; Eq. 92 on a linear memory).
    hope_dgd: delta gradient descent (choice 1): "arxiv" (rate ``η' = η/(1+η)`` on the gradient and
      on the ``k kᵀ`` decay term), "neurips" (rate η on both) or "off" (plain gradient descent:
      the "w/o DGD" ablation).
    hope_dgd_keys: the keys of the DGD decay term of an MLP memory (choice 2): "per_layer" (each
      layer's own input, at the chunk-start state; the decay touches only that layer). The only
      reading implemented (``nlx.ops.dgd_memory``'s contract).
    hope_chunk_size: chunk of the k, v, η, α memories (all reads and targets of a chunk come
      from its start state); None: ``memory_chunk_size`` (choice 4). ``memory_chunk_size`` is the
      chunk of the output memory and must divide it.
    hope_chunk_boundary: the chunk-start state is the state at the end of the previous chunk
      (choice 3; the only reading implemented).
    hope_lr_max: η_max of ``η = η_max·sigmoid(mean(M_η(x)) + b_η)`` (choice 5); None: ``0.5 / C``
      with C = ``hope_chunk_size`` (or ``memory_chunk_size``), the bound of ``titans_lr_max``
      (an untrained tiny HOPE fed a repeated token diverged at C·η_max = 1.92).
    hope_gate_reduce: how M_η, M_α reduce a head to a scalar (choice 5; "mean").
    hope_momentum: Titans-style momentum on the DGD write (choice 6; False: "w/o momentum").
    hope_weight_decay: the retention ``α = sigmoid(mean(M_α(x)) + b_α)`` (False: α = 1,
      "w/o weight decay").
    hope_adaptive_k, hope_adaptive_v, hope_adaptive_q: k, v, q generated by their own memories
      (False: the projection alone; Table 6 "w/o adaptive k/v/q"; q is non-adaptive by
      default, choice 7).
    hope_stop_gradient: stop the outer gradient at the targets v̂ (choice 9; default off).
    hope_normalize_v: L2-normalise v_t (after M_v), like q and k. Not in the paper: without it
      the self-generated targets v̂ = M(v) compound a memory's gain chunk after chunk (the tiny
      model's activations overflowed within 300 tokens).
    hope_read: "after_write": token t reads the memory after its own write (the DeltaNet /
      parallel-Titans convention), or "before_write": ``M_{t−1}(q_t)``, the paper's read
      (choice 13).
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
  state_dim: int = 64
  mamba_expand: int = 2
  mamba_head_dim: int = 64
  memory_expand: int = 2
  n_persistent: int = 4
  ttt_base_lr: float = 1.0
  titans_lr_max: Optional[float] = None
  norm_eps: float = 1e-6
  init_std: float = 0.02
  cms: bool = True
  cms_periods: tuple = (32, 256, 2048)
  cms_variant: str = "sequential"
  cms_objective: str = "local"
  cms_lr: float | tuple = 1e-3
  cms_stop_gradient: bool = False
  hope_memory: str = "mlp"
  hope_objective: str = "l2"
  hope_dgd: str = "arxiv"
  hope_dgd_keys: str = "per_layer"
  hope_chunk_size: Optional[int] = None
  hope_chunk_boundary: str = "previous_end"
  hope_lr_max: Optional[float] = None
  hope_gate_reduce: str = "mean"
  hope_momentum: bool = True
  hope_weight_decay: bool = True
  hope_adaptive_k: bool = True
  hope_adaptive_v: bool = True
  hope_adaptive_q: bool = False
  hope_stop_gradient: bool = False
  hope_normalize_v: bool = True
  hope_read: str = "after_write"

  def __post_init__(self):
    for f in dataclasses.fields(self):
      _check_type(f.name, getattr(self, f.name), f.type)
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "expand_v", "mlp_dim",
                "max_seq_len", "chunk_size", "memory_chunk_size", "state_dim", "mamba_expand",
                "mamba_head_dim", "memory_expand")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1; got {getattr(self, name)!r}")
    for name in ("conv_size", "n_persistent"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name} must be >= 0; got {getattr(self, name)!r}")
    for name in ("n_kv_heads", "head_dim", "window"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"model.{name} must be None or >= 1; got {value!r}")
    if self.impl not in IMPLS:
      raise ValueError(f"model.impl={self.impl!r} is not one of {IMPLS}")
    if self.remat not in REMATS:
      raise ValueError(f"model.remat={self.remat!r} is not one of {REMATS}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
                       "(or set model.head_dim)")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide "
                       f"model.n_heads={self.n_heads}")
    self._check_hope_fields()

  def _check_hope_fields(self):
    """Validates the CMS and HOPE fields (docs/EQUATIONS.md §7)."""
    for name, allowed in CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    periods = self.cms_periods
    if isinstance(periods, list):
      periods = tuple(periods)
      object.__setattr__(self, "cms_periods", periods)
    ok = (bool(periods) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                                for p in periods)
          and all(b > a and b % a == 0 for a, b in zip(periods, periods[1:])))
    if not ok:
      raise ValueError(f"model.cms_periods={periods!r} must be a non-empty tuple of ints >= 1, "
                       "strictly increasing, each dividing the next (e.g. (32, 256, 2048))")
    self._check_cms_lr()
    if self.hope_chunk_size is not None and self.hope_chunk_size < 1:
      raise ValueError(f"model.hope_chunk_size must be None or >= 1; got "
                       f"{self.hope_chunk_size!r}")
    for name, chunk_name in (("titans_lr_max", "memory_chunk_size"),
                             ("hope_lr_max", "hope_chunk_size" if self.hope_chunk_size
                              else "memory_chunk_size")):
      value, chunk = getattr(self, name), getattr(self, chunk_name)
      if value is not None and not 0 < value * chunk <= MAX_CHUNK_STEP:
        raise ValueError(
            f"model.{name}={value!r} is not allowed with model.{chunk_name}={chunk}: must be > 0 "
            f"and at most {MAX_CHUNK_STEP}/{chunk_name} = {MAX_CHUNK_STEP / chunk:.4g} (a chunk "
            f"steps {chunk_name}·lr at once on repeated keys and diverges beyond that); None "
            "picks that bound")

  def _check_cms_lr(self):
    """``cms_lr``: a float >= 0, or one per level (a list is read as a tuple of floats)."""
    value, n = self.cms_lr, len(self.cms_periods)
    rate = lambda x: (isinstance(x, numbers.Real) and not isinstance(x, bool)
                      and math.isfinite(x) and x >= 0)
    if isinstance(value, (tuple, list)):
      ok = len(value) == n and all(rate(x) for x in value)
      if ok:
        object.__setattr__(self, "cms_lr", tuple(float(x) for x in value))
    else:
      ok = rate(value)
    if not ok:
      raise ValueError(f"model.cms_lr must be >= 0 and finite: a float (every level) or a tuple "
                       f"of len(cms_periods)={n} such floats (one per level); got {value!r}")

  @property
  def cms_lrs(self) -> tuple:
    """η^(ℓ) of every CMS level: ``cms_lr`` itself if a tuple, else repeated per level."""
    if isinstance(self.cms_lr, tuple):
      return self.cms_lr
    return (float(self.cms_lr),) * len(self.cms_periods)

  @property
  def dk(self) -> int:
    """Key (and query) dimension per head."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def dv(self) -> int:
    """Value dimension per head."""
    return self.expand_v * self.dk

  @property
  def titans_lr(self) -> float:
    """The resolved ``titans_lr_max`` (None -> MAX_CHUNK_STEP / memory_chunk_size)."""
    if self.titans_lr_max is not None:
      return self.titans_lr_max
    return MAX_CHUNK_STEP / self.memory_chunk_size

  @property
  def hope_chunk(self) -> int:
    """The resolved ``hope_chunk_size`` (None -> ``memory_chunk_size``)."""
    return self.hope_chunk_size or self.memory_chunk_size

  @property
  def hope_lr(self) -> float:
    """The resolved ``hope_lr_max`` (None -> MAX_CHUNK_STEP / HOPE's chunk)."""
    if self.hope_lr_max is not None:
      return self.hope_lr_max
    return MAX_CHUNK_STEP / self.hope_chunk

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

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


def _check_type(name: str, value: Any, annotation: str) -> None:
  optional = annotation.startswith("Optional[")
  base = annotation[len("Optional["):-1] if optional else annotation
  if value is None:
    if optional:
      return
    raise ValueError(f"model.{name} must be a {base}; got None")
  ok = {"int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
        "float": isinstance(value, numbers.Real) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "tuple": isinstance(value, (tuple, list))}
  kinds = base.split(" | ")  # a union such as cms_lr's "float | tuple"
  if not any(ok[kind] for kind in kinds):
    raise ValueError(f"model.{name} must be a{'n' if base == 'int' else ''} "
                     f"{' or '.join(kinds)}{' or None' if optional else ''}; got {value!r}")
