"""HOPE: self-modifying Titans (MLP memories for k, v, η, α and the output, DGD with weight decay
and momentum, chunk-wise), then the Continuum Memory System (PAPER.md §4, §7).

Sizes: tiny (laptop CPU: CMS periods 4 / 16), 340m, 760m, 1.3b, 20m (the benchmark size): CMS
periods 32 / 256 / 2048, memory chunks 64, MLP memories of hidden width head_dim. Build the model::

  cfg = nlx.configs.load("configs/hope.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))

Ablations of Table 6 are overrides, e.g. ``model.hope_dgd=off``, ``model.hope_momentum=False``,
``model.hope_weight_decay=False``, ``model.cms=False``, ``model.hope_adaptive_k=False``.
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  model = nlx_configs.model_config("hope", size, mlp_ratio=0.3,
                                   tiny=dict(cms_periods=(4, 16), mlp_dim=64),
                                   paper=dict(cms_periods=(32, 256, 2048), memory_chunk_size=64,
                                              memory_expand=1))
  # The main job (`make train`): HOPE runs ~13x fewer tokens/s than Transformer++ on a CPU at this
  # size, so the tiny run is 300 steps of 8 x 256 tokens (a few minutes on 2 cores).
  train = dict(steps=300, batch_size=8) if size == "tiny" else {}
  return nlx_configs.config(model, train=train)
