"""HOPE: self-modifying Titans (MLP memories for k, v, η, α and the output, DGD with weight decay
and momentum, chunk-wise), then the Continuum Memory System (docs/EQUATIONS.md §4, §7).

Sizes (configs/_common.py): tiny (laptop CPU: CMS periods 16 / 64, the fastest level updating
once per memory chunk), 340m, 760m, 1.3b: CMS periods 32 / 256 / 2048, memory chunks 64; 20m (the
benchmark size, T = 2048): periods 16 / 128 / 1024, so that the slowest level updates inside a
training window. MLP memories have hidden width head_dim at every size. The 1.3b preset also
fits a v5e:8x16 slice (16 GiB chips).

Ablations of Table 6 are overrides, e.g. ``model.hope_dgd=off``, ``model.hope_momentum=False``,
``model.hope_weight_decay=False``, ``model.cms=False``, ``model.hope_adaptive_k=False``.
"""

from nlx.presets import _common as common


def get_config(size: str = "tiny"):
  # Each CMS update is a sequential step: at tiny size, periods 4 / 16 made the CMS most of the
  # step's time (docs/RESULTS.md, "HOPE throughput").
  # The main job (`make train`): HOPE runs several times fewer tokens/s than Transformer++ on a
  # CPU at this size, so the tiny run is 300 steps of 8 x 256 tokens (a few minutes on 2 cores).
  return common.family_config(
      "hope", size, mlp_ratio=0.3, memory_expand=1,
      tiny=dict(cms_periods=(16, 64), mlp_dim=112),
      paper=dict(cms_periods=common.paper_cms_periods(size), memory_chunk_size=64),
      train=dict(steps=300, batch_size=8) if size == "tiny" else None)
