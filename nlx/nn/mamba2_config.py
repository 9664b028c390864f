"""The Mamba2 fields of ``ModelConfig`` (``nlx.nn.mamba2``; Samba's Mamba2 layers too).

No JAX here: ``nlx.nn.config`` composes these fields into ``ModelConfig``. The checks that need
the core fields as well (``mamba_head_dim`` divides ``mamba_expand · d_model``, a short conv) are
the family's, in ``nlx.nn.mamba2.check_mamba2``.
"""

from __future__ import annotations

import dataclasses

from nlx import validation


@dataclasses.dataclass(frozen=True)
class Mamba2Fields:
  """Fields of ``config.model`` read by Mamba2 (and Samba).

  Attributes:
    state_dim: Mamba2's N (state size per head).
    mamba_expand: Mamba2's inner width = mamba_expand · d_model.
    mamba_head_dim: Mamba2's head dimension P.
  """

  state_dim: int = 64
  mamba_expand: int = 2
  mamba_head_dim: int = 64


def validate_mamba2(cfg: Mamba2Fields) -> None:
  """Each field >= 1 (types are checked by ``ModelConfig`` for every field first)."""
  for name in ("state_dim", "mamba_expand", "mamba_head_dim"):
    validation.check_at_least(f"model.{name}", getattr(cfg, name), 1, got=True)
