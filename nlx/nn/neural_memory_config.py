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
TITANS_RATES = ("plain", "normalized", "gram")  # nlx.ops.titans.RATES (no JAX here)


def chunk_step_units(chunk: int, rate: str = "plain") -> float:
  """How far, in units of lr_max, a chunk of ``chunk`` equal keys steps at once: ``chunk`` with
  the plain (or normalised) rate, ``H_chunk = 1 + 1/2 + … + 1/chunk`` with the gram rate
  (``nlx/memory/rates.py``: each token's rate over the chunk's key similarities so far)."""
  if rate == "gram":
    return sum(1.0 / i for i in range(1, chunk + 1))
  return float(chunk)


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
      memory_chunk_size`` (``0.5 / H_C`` with ``titans_rate="gram"``). A chunk of C tokens takes
      its C gradients at one state, so on C repeated keys the memory steps C·lr at once:
      C·lr_max ≥ 1 diverged on an untrained tiny model fed a repeated token
      (docs/RELIABILITY.md); values with C·lr_max > 0.5 (H_C·lr_max with "gram") are refused.
      With momentum η the step is lr·(1 − η), so the bound holds whatever η is learned.
    titans_rate: "plain" (the paper's step) or "normalized": each layer of the Titans memory
      steps at ``lr / max(1, ‖h‖²)`` for its input h (``nlx.ops.titans_memory``'s ``rate``), so
      that the bound above also holds for an MLP memory's hidden layer, whose input is not
      unit-norm: with "plain" that layer diverged in the S-NIAH study (docs/RELIABILITY.md).
      "gram": each token's rate is divided by ``Σ_j |k_t·k_j|`` over the keys so far in its
      chunk (then as "normalized"), so a chunk of C equal keys steps ``H_C·lr`` (H_16 = 3.38)
      instead of ``C·lr``: ``titans_lr_max`` defaults to ``0.5 / H_C`` (0.148 at C = 16, where a
      key seen once was written with at most 0.031 of its error and Titans found no recall on
      MQAR; docs/EQUATIONS.md).
  """

  memory_expand: int = 2
  n_persistent: int = 4
  ttt_base_lr: float = 1.0
  titans_lr_max: Optional[float] = None
  titans_rate: str = "plain"

  @property
  def titans_lr(self) -> float:
    """The resolved ``titans_lr_max`` (None -> MAX_CHUNK_STEP / chunk_step_units)."""
    if self.titans_lr_max is not None:
      return self.titans_lr_max
    # memory_chunk_size: a core field of ModelConfig
    return MAX_CHUNK_STEP / chunk_step_units(self.memory_chunk_size, self.titans_rate)


def check_chunk_step(cfg: Any, name: str, chunk_name: str, rate: str = "plain") -> None:
  """Refuses ``cfg.<name>`` (an lr_max, None: the bound) unless 0 < lr_max · units <= 0.5, with
  ``units = chunk_step_units(chunk, rate)``."""
  value, chunk = getattr(cfg, name), getattr(cfg, chunk_name)
  units = chunk_step_units(chunk, rate)
  if value is not None and not 0 < value * units <= MAX_CHUNK_STEP:
    units_name = chunk_name if rate != "gram" else f"H_{chunk}"  # H_C = 1 + 1/2 + … + 1/C
    raise ValueError(
        f"model.{name}={value!r} is not allowed with model.{chunk_name}={chunk}: must be > 0 "
        f"and at most {MAX_CHUNK_STEP}/{units_name} = {MAX_CHUNK_STEP / units:.4g} (a chunk "
        f"steps {units_name}·lr at once on repeated keys and diverges beyond that); None "
        "picks that bound")


def validate_neural_memory(cfg: Any) -> None:
  """Checks the fields of ``NeuralMemoryFields`` on a ``ModelConfig`` (whose core fields are
  checked first: ``titans_lr_max`` is bounded by ``memory_chunk_size``)."""
  validation.check_at_least("model.memory_expand", cfg.memory_expand, 1, got=True)
  validation.check_at_least("model.n_persistent", cfg.n_persistent, 0, got=True)
  validation.check_choice("model.titans_rate", cfg.titans_rate, TITANS_RATES)
  check_chunk_step(cfg, "titans_lr_max", "memory_chunk_size", cfg.titans_rate)
