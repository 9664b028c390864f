"""Titans LMM: the neural long-term memory (MLP, momentum, decay) alone.

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("titans_lmm", size, mlp_ratio=2.375)
