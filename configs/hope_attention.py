"""Hope-attention: the softmax attention of Transformer++, then the Continuum Memory System.

Sizes (configs/_common.py): tiny (laptop CPU: CMS periods 16 / 64), 340m, 760m, 1.3b: CMS
periods 32 / 256 / 2048; 20m (the benchmark size, T = 2048): 16 / 128 / 1024, so that the slowest
level updates inside a training window. ``nlx.convert.transformer_to_hope_attention``
builds one from a trained Transformer++ (level stacking).
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  return common.family_config("hope_attention", size, mlp_ratio=0.55,
                              tiny=dict(cms_periods=(16, 64), mlp_dim=96),
                              paper=dict(cms_periods=common.paper_cms_periods(size)))
