"""Samba: Mamba2 and sliding-window attention, interleaved (windows of 64 tokens at tiny
size, 2048 at the paper sizes).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("samba", size, tiny=dict(window=64), paper=dict(window=2048),
                              mlp_ratio=2.375)
