"""Model conversions. Level stacking (docs/EQUATIONS.md §3; the paper's §7.3): a Hope-attention
model from a trained Transformer++, each block's SwiGLU MLP becoming one level of the block's CMS.

``transformer_to_hope_attention(model_or_state, cfg)`` copies every parameter of the Transformer++
(embedding, attention, norms, head) into a Hope-attention model of ``cfg`` and puts each block's
MLP weights into CMS level ``level`` (default: the slowest, which holds what the model knows
longest); the other levels start with a zero ``down`` projection, so they add exactly 0 until
they learn. With ``cms_lr = 0`` (nothing learns in context) the converted model's logits are
exactly the Transformer's; with ``cms_lr > 0`` its MLPs keep learning in context at their periods.
A tuple ``cms_lr`` gives each level its own rate, e.g. 0 for the level that holds the Transformer's
MLP (its knowledge stays fixed) and > 0 for the faster levels that start at zero output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn import LM, ModelConfig, build_model

SHARED = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
          "tie_embeddings", "rope_theta", "window", "norm_eps")


def _check(source: ModelConfig, target: ModelConfig) -> None:
  if source.family != "transformer":
    raise ValueError(f"the source model must be family 'transformer'; got {source.family!r}")
  if target.family != "hope_attention" or not target.cms:
    raise ValueError(f"cfg must be family 'hope_attention' with cms=True; got family "
                     f"{target.family!r}, cms={target.cms}")
  for name in SHARED:
    if getattr(source, name) != getattr(target, name):
      raise ValueError(f"model.{name}={getattr(target, name)!r} of cfg must equal the "
                       f"Transformer's {getattr(source, name)!r} (level stacking copies weights)")


def transformer_to_hope_attention(model_or_state: Any, cfg: Any, *, level: int = -1,
                                  source_cfg: Any = None, seed: int = 0) -> LM:
  """A Hope-attention ``LM`` whose CMS levels are built from a Transformer++'s MLPs.

  Args:
    model_or_state: a Transformer++ ``LM``, or its parameters (``nnx.state(model, nnx.Param)``,
      e.g. restored from an orbax checkpoint; then ``source_cfg`` is required).
    cfg: the Hope-attention model config (``config.model``; ConfigDict, mapping or ModelConfig);
      every field that shapes the copied weights (``SHARED``) must equal the Transformer's.
    level: the CMS level that receives each block's MLP (index into ``cms_periods``).
    source_cfg: the Transformer's model config, when ``model_or_state`` is a state.
    seed: seed of the parameters that have no source (the other levels' gate/up and the local
      targets).

  Returns:
    The converted ``LM``.
  """
  target_cfg = ModelConfig.from_config(cfg)
  if isinstance(model_or_state, LM):
    source_cfg, state = model_or_state.cfg, nnx.state(model_or_state, nnx.Param)
  elif source_cfg is None:
    raise ValueError("source_cfg (the Transformer's model config) is required when "
                     "model_or_state is a parameter state")
  else:
    source_cfg, state = ModelConfig.from_config(source_cfg), model_or_state
  _check(source_cfg, target_cfg)
  n_levels = len(target_cfg.cms_periods)
  if not -n_levels <= level < n_levels:
    raise ValueError(f"level={level} is not a CMS level of cms_periods="
                     f"{target_cfg.cms_periods}; allowed: {-n_levels}..{n_levels - 1}")
  level %= n_levels
  model = build_model(target_cfg, rngs=nnx.Rngs(seed))
  dst_state = nnx.state(model, nnx.Param)
  src, dst = nnx.to_pure_dict(state), nnx.to_pure_dict(dst_state)
  for name in src:
    if name != "layers":
      dst[name] = src[name]
  src_block, dst_block = src["layers"]["blocks"][0], dst["layers"]["blocks"][0]
  for name in ("mixer", "norm1", "norm2"):
    dst_block[name] = src_block[name]
  cms_blocks = dst_block["mlp"]["blocks"]
  for i in range(n_levels):
    if i == level:
      cms_blocks[i] = src_block["mlp"]
    else:
      cms_blocks[i]["down"]["kernel"] = jnp.zeros_like(cms_blocks[i]["down"]["kernel"])
  nnx.replace_by_pure_dict(dst_state, jax.tree.map(jnp.asarray, dst))
  nnx.update(model, dst_state)
  return model
