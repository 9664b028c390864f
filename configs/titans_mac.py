"""Titans MAC: memory as context (segments of `window` tokens: 64 at tiny size, 512 at
the paper sizes).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("titans_mac", size, tiny=dict(window=64), paper=dict(window=512),
                              mlp_ratio=0.75)
