"""DeltaNet: the delta rule on L2-normalised keys.

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("deltanet", size)
