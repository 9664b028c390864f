"""The neural-memory fields of ``ModelConfig``: Titans and TTT (``nlx.nn.neural_memory``, the
mixer they share; ``nlx.nn.titans``, ``nlx.nn.ttt``).

No JAX here: ``nlx.nn.config`` composes these fields into ``ModelConfig``. ``MAX_CHUNK_STEP`` and
``check_chunk_step`` bound the inner learning rate of every chunk-wise memory (HOPE's too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from nlx import validation

# The largest step (lr_max × chunk) a chunk of chunk-start gradients may take on repeated keys.
MAX_CHUNK_STEP = 0.5
TITANS_RATES = ("plain", "normalized")  # nlx.ops.titans.RATES (no JAX here)


@dataclasses.dataclass(frozen=True)
class NeuralMemoryFields:
  """Fields of ``config.model`` read by the neural memories (Titans, TTT; ``memory_expand`` also by
  HOPE). One class for both families: they share ``nlx.nn.neural_memory.NeuralMemory``, and
  their fields come in this order in every saved config.

  Attributes:
    memory_expand: hidden width of MLP memories = memory_expand · head_dim.
    n_persistent: learned persistent-memory tokens of Titans MAC/MAG/MAL attention.
    ttt_base_lr: TTT's η_base: the inner learning rate is ``ttt_base_lr · sigmoid(·) / head_dim``
      (the TTT paper's scaling).
    titans_lr_max: the largest inner learning rate of the Titans memory; None: ``0.5 /
      memory_chunk_size``. A chunk of C tokens takes its C gradients at one state, so on C
      repeated keys the memory steps C·lr at once: C·lr_max ≥ 1 diverged on an untrained tiny
      model fed a repeated token (docs/RELIABILITY.md); values with C·lr_max > 0.5 are refused.
      With momentum η the step is lr·(1 − η), so the bound holds whatever η is learned.
    titans_rate: "plain" (the paper's step) or "normalized": each layer of the Titans memory
      steps at ``lr / max(1, ‖h‖²)`` for its input h (``nlx.ops.titans_memory``'s ``rate``), so
      that the bound above also holds for an MLP memory's hidden layer, whose input is not
      unit-norm: with "plain" that layer diverged in the S-NIAH study (docs/RELIABILITY.md).
  """

  memory_expand: int = 2
  n_persistent: int = 4
  ttt_base_lr: float = 1.0
  titans_lr_max: Optional[float] = None
  titans_rate: str = "plain"

  @property
  def titans_lr(self) -> float:
    """The resolved ``titans_lr_max`` (None -> MAX_CHUNK_STEP / memory_chunk_size)."""
    if self.titans_lr_max is not None:
      return self.titans_lr_max
    return MAX_CHUNK_STEP / self.memory_chunk_size  # a core field of ModelConfig


def check_chunk_step(cfg: Any, name: str, chunk_name: str) -> None:
  """Refuses ``cfg.<name>`` (an lr_max, None: the bound) unless 0 < lr_max · chunk <= 0.5."""
  value, chunk = getattr(cfg, name), getattr(cfg, chunk_name)
  if value is not None and not 0 < value * chunk <= MAX_CHUNK_STEP:
    raise ValueError(
        f"model.{name}={value!r} is not allowed with model.{chunk_name}={chunk}: must be > 0 "
        f"and at most {MAX_CHUNK_STEP}/{chunk_name} = {MAX_CHUNK_STEP / chunk:.4g} (a chunk "
        f"steps {chunk_name}·lr at once on repeated keys and diverges beyond that); None "
        "picks that bound")


def validate_neural_memory(cfg: Any) -> None:
  """Checks the fields of ``NeuralMemoryFields`` on a ``ModelConfig`` (whose core fields are
  checked first: ``titans_lr_max`` is bounded by ``memory_chunk_size``)."""
  validation.check_at_least("model.memory_expand", cfg.memory_expand, 1, got=True)
  validation.check_at_least("model.n_persistent", cfg.n_persistent, 0, got=True)
  check_chunk_step(cfg, "titans_lr_max", "memory_chunk_size")
  validation.check_choice("model.titans_rate", cfg.titans_rate, TITANS_RATES)
