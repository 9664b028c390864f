"""The Continuum Memory System fields of ``ModelConfig`` (``nlx.nn.cms``; the families ``hope``
and ``hope_attention``; docs/EQUATIONS.md §3 and §7).

No JAX here: ``nlx.nn.config`` composes these fields into ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

from nlx import validation

# Allowed values of the string fields (docs/EQUATIONS.md §7); the first is the default.
CMS_CHOICES = {
    "cms_variant": ("sequential", "nested", "independent"),
    "cms_objective": ("local", "next_token"),
}


@dataclasses.dataclass(frozen=True)
class CmsFields:
  """Fields of ``config.model`` read by the CMS (docs/EQUATIONS.md, choice 8).

  Attributes:
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
    cms_grad_clip: None (the paper's plain step, Eq. 71) or a float > 0: each level's summed
      gradient is clipped to this global norm before its step (``optax.clip_by_global_norm``),
      so that one in-context update moves the level by at most ``η^(ℓ) × cms_grad_clip``. A
      level's step is trained only as often as training windows read it; on longer inputs the
      plain step can diverge geometrically (docs/RESULTS.md, formal languages), while the
      clipped one drifts at most linearly in the number of updates.
  """

  cms: bool = True
  cms_periods: tuple = (32, 256, 2048)
  cms_variant: str = "sequential"
  cms_objective: str = "local"
  cms_lr: float | tuple = 1e-3
  cms_stop_gradient: bool = False
  cms_grad_clip: Optional[float] = None

  @property
  def cms_lrs(self) -> tuple:
    """η^(ℓ) of every CMS level: ``cms_lr`` itself if a tuple, else repeated per level."""
    if isinstance(self.cms_lr, tuple):
      return self.cms_lr
    return (float(self.cms_lr),) * len(self.cms_periods)


def periods_within(periods: tuple, length: int) -> tuple:
  """``periods`` halved (each, while the fastest is above 1) until the slowest is below ``length``:
  then every level updates inside a training window of ``length`` tokens, so its in-context step
  is trained (a level of period ≥ the window never updates where training reads it; ``nlx
  train`` refuses one)."""
  periods = tuple(periods)
  while periods[-1] >= length and periods[0] > 1:
    periods = tuple(p // 2 for p in periods)
  return periods


def validate_cms(cfg: Any) -> None:
  """Checks the CMS fields of a frozen config; reads a list ``cms_periods`` as a tuple and a list
  ``cms_lr`` as a tuple of floats (both set on ``cfg``)."""
  for name, allowed in CMS_CHOICES.items():
    validation.check_choice(f"model.{name}", getattr(cfg, name), allowed, style="one_of")
  periods = cfg.cms_periods
  if isinstance(periods, list):
    periods = tuple(periods)
    object.__setattr__(cfg, "cms_periods", periods)
  ok = (bool(periods) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                              for p in periods)
        and all(b > a and b % a == 0 for a, b in zip(periods, periods[1:])))
  if not ok:
    raise ValueError(f"model.cms_periods={periods!r} must be a non-empty tuple of ints >= 1, "
                     "strictly increasing, each dividing the next (e.g. (32, 256, 2048))")
  _check_cms_lr(cfg)
  clip = cfg.cms_grad_clip
  if clip is not None and not (isinstance(clip, numbers.Real) and not isinstance(clip, bool)
                               and math.isfinite(clip) and clip > 0):
    raise ValueError(f"model.cms_grad_clip={clip!r} must be None (no clip) or a finite float "
                     "> 0 (the global norm of a level's summed gradient)")


def _check_cms_lr(cfg: Any) -> None:
  """``cms_lr``: a float >= 0, or one per level (a list is read as a tuple of floats)."""
  value, n = cfg.cms_lr, len(cfg.cms_periods)
  rate = lambda x: (isinstance(x, numbers.Real) and not isinstance(x, bool)
                    and math.isfinite(x) and x >= 0)
  if isinstance(value, (tuple, list)):
    ok = len(value) == n and all(rate(x) for x in value)
    if ok:
      object.__setattr__(cfg, "cms_lr", tuple(float(x) for x in value))
  else:
    ok = rate(value)
  if not ok:
    raise ValueError(f"model.cms_lr must be >= 0 and finite: a float (every level) or a tuple "
                     f"of len(cms_periods)={n} such floats (one per level); got {value!r}")
