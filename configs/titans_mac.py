"""Titans MAC: memory as context (segments of `window` tokens).

Sizes: tiny (laptop CPU), 340m, 760m, 1.3b.

Paper sizes are meant for a TPU v5p:4x4x4 slice (64 chips, FSDP over the slice) and compile
there with no overrides: ``nlx aot --config configs/titans_mac.py:1.3b --topology v5p:4x4x4``
(docs/TRAINING.md, "TPU table").

Build the model::

  cfg = nlx.configs.load("configs/titans_mac.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  model = nlx_configs.model_config("titans_mac",
                                   size,
                                   tiny=dict(window=64),
                                   paper=dict(window=512),
                                   mlp_ratio=0.75)
  return nlx_configs.config(model)
