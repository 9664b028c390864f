"""Titans MAG: sliding-window attention gated by the memory (windows of 64 tokens at
tiny size, 512 at the paper sizes).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("titans_mag", size, tiny=dict(window=64), paper=dict(window=512),
                              mlp_ratio=1.0)
