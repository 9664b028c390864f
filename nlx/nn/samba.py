"""Samba: Mamba2 blocks and sliding-window attention blocks, interleaved (a two-block group)."""

from __future__ import annotations

from nlx.nn.attention import sliding_window
from nlx.nn.config import ModelConfig
from nlx.nn.mamba2 import Mamba2, check_mamba2
from nlx.nn.registry import register


def _check_samba(cfg: ModelConfig) -> None:
  check_mamba2(cfg)
  cfg.require("samba", window=(cfg.window is not None, "Samba's attention needs a window >= 1"))


register("samba", Mamba2, sliding_window, validate=_check_samba,
         description="Samba: Mamba2 and sliding-window attention, interleaved")
