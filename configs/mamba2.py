"""Mamba2 (SSD) with its short convolution, and a SwiGLU MLP in every block.

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("mamba2", size, mlp_ratio=2.0)
