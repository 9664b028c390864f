"""Gated DeltaNet: delta rule with a Mamba2-style decay and an output gate.

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("gated_deltanet", size, mlp_ratio=2.375)
