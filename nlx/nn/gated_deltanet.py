"""Gated DeltaNet: the delta rule with a data-dependent decay and an output gate.

``S ← exp(g_t) S``; ``S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ`` (``nlx.ops.delta_rule`` with g), where
``g = −exp(A_log) · softplus(x W_a + dt_bias)`` as in Mamba2; the output is
``RMSNorm(o) ⊙ SiLU(x W_g)`` projected back. The mixer is ``DeltaRuleMixer(gated=True)``.
"""

from __future__ import annotations

from flax import nnx

from nlx.nn.config import ModelConfig
from nlx.nn.deltanet import DeltaRuleMixer
from nlx.nn.registry import register


def gated_delta_net(cfg: ModelConfig, *, rngs: nnx.Rngs) -> DeltaRuleMixer:
  return DeltaRuleMixer(cfg, rngs=rngs, gated=True)


register("gated_deltanet", gated_delta_net,
         description="Gated DeltaNet: delta rule with Mamba2-style decay and output gate")
