"""Transformer++: RoPE, causal softmax attention, SwiGLU.

Sizes and run defaults: configs/_common.py.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("transformer", size)
