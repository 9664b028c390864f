"""RetNet: multi-scale retention (linear attention with a fixed decay per head).

Sizes: tiny (laptop CPU), 340m, 760m, 1.3b. Build the model::

  cfg = nlx.configs.load("configs/retnet.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  return nlx_configs.config(nlx_configs.model_config("retnet", size, expand_v=2, mlp_ratio=1.5))
