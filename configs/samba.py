"""Samba: Mamba2 and sliding-window attention, interleaved.

Sizes: tiny (laptop CPU), 340m, 760m, 1.3b. Build the model::

  cfg = nlx.configs.load("configs/samba.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  model = nlx_configs.model_config("samba",
                                   size,
                                   tiny=dict(window=64),
                                   paper=dict(window=2048),
                                   mlp_ratio=2.375)
  return nlx_configs.config(model)
