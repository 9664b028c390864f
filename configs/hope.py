"""HOPE: self-modifying Titans (MLP memories for k, v, η, α and the output, DGD with weight decay
and momentum, chunk-wise), then the Continuum Memory System (docs/EQUATIONS.md §4, §7).

Sizes: tiny (laptop CPU: CMS periods 16 / 64, the fastest level updating once per memory chunk),
340m, 760m, 1.3b, 20m (the benchmark size): CMS periods 32 / 256 / 2048, memory chunks 64. MLP
memories have hidden width head_dim at every size.

Paper sizes are meant for a TPU v5p:4x4x4 slice (64 chips, FSDP over the slice) and compile
there with no overrides: ``nlx aot --config configs/hope.py:1.3b --topology v5p:4x4x4``
(docs/TRAINING.md, "TPU table"). The 1.3b preset also fits a v5e:8x16 slice (16 GiB chips).

Build the model::

  cfg = nlx.configs.load("configs/hope.py:tiny")
  model = nlx.build_model(cfg.model, rngs=nnx.Rngs(0))

Ablations of Table 6 are overrides, e.g. ``model.hope_dgd=off``, ``model.hope_momentum=False``,
``model.hope_weight_decay=False``, ``model.cms=False``, ``model.hope_adaptive_k=False``.
"""

from nlx import configs as nlx_configs


def get_config(size: str = "tiny"):
  # Each CMS update is a sequential step: at tiny size, periods 4 / 16 made the CMS most of the
  # step's time (docs/RESULTS.md, "HOPE throughput").
  model = nlx_configs.model_config("hope", size, mlp_ratio=0.3, memory_expand=1,
                                   tiny=dict(cms_periods=(16, 64), mlp_dim=112),
                                   paper=dict(cms_periods=(32, 256, 2048), memory_chunk_size=64))
  # The main job (`make train`): HOPE runs several times fewer tokens/s than Transformer++ on a
  # CPU at this size, so the tiny run is 300 steps of 8 x 256 tokens (a few minutes on 2 cores).
  train = dict(steps=300, batch_size=8) if size == "tiny" else {}
  return nlx_configs.config(model, train=train)
