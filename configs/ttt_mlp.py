"""TTT-MLP: chunked gradient descent on a residual MLP memory (mini-batch 16).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("ttt_mlp", size, ttt_base_lr=0.1, mlp_ratio=2.375)
