"""TTT-Linear: chunked gradient descent on a linear memory (mini-batch 16).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("ttt_linear", size, mlp_ratio=2.375)
