"""Hope-attention: the softmax attention of Transformer++, then the Continuum Memory System.

Sizes: tiny (laptop CPU: CMS periods 16 / 64), 340m, 760m, 1.3b, 20m (the benchmark size): CMS
periods 32 / 256 / 2048. ``nlx.convert.transformer_to_hope_attention`` builds one from a trained
Transformer++ (level stacking).

Paper sizes are meant for a TPU v5p:4x4x4 slice (64 chips, FSDP over the slice) and compile
there with no overrides: ``nlx aot --config configs/hope_attention.py:1.3b --topology v5p:4x4x4``
(docs/TRAINING.md, "TPU table").

Build the model::

  cfg = nlx.configs.load("configs/hope_attention.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  model = nlx_configs.model_config("hope_attention", size, mlp_ratio=0.55,
                                   tiny=dict(cms_periods=(16, 64), mlp_dim=96),
                                   paper=dict(cms_periods=(32, 256, 2048)))
  return nlx_configs.config(model)
