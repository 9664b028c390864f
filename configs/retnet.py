"""RetNet: multi-scale retention (linear attention with a fixed decay per head).

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("retnet", size, expand_v=2, mlp_ratio=1.5)
