"""Titans MAL: memory layer, then sliding-window attention (windows of 64 tokens at
tiny size, 512 at the paper sizes).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("titans_mal", size, tiny=dict(window=64), paper=dict(window=512),
                              mlp_ratio=2.5)
