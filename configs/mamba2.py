"""Mamba2 (SSD) with its short convolution, and a SwiGLU MLP in every block.

Sizes: tiny (laptop CPU), 340m, 760m, 1.3b.

Paper sizes are meant for a TPU v5p:4x4x4 slice (64 chips, FSDP over the slice) and compile
there with no overrides: ``nlx aot --config configs/mamba2.py:1.3b --topology v5p:4x4x4``
(docs/TRAINING.md, "TPU table").

Build the model::

  cfg = nlx.configs.load("configs/mamba2.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  return nlx_configs.config(nlx_configs.model_config("mamba2", size, mlp_ratio=2.0))
