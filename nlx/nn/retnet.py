"""RetNet's multi-scale retention: linear attention with a fixed decay per head.

``S ← γ_h S + k_t v_tᵀ``, ``o_t = Sᵀ q_t`` (``nlx.ops.linear_attention`` with constant
``g = log γ_h``, ``γ_h = 1 − 2^(−5−h)``), RoPE on q and k, per-head RMSNorm (RetNet's group norm)
and a SiLU output gate. Values are ``expand_v`` times wider than keys (2 in RetNet). Packed
documents: RoPE at the positions inside the documents, the state restarts at each document.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.nn.config import ModelConfig
from nlx.nn.mixer import Mixer
from nlx.nn.params import Dense
from nlx.nn.qkv import OutputGate
from nlx.nn.registry import register
from nlx.nn.rope import rope
from nlx.nn.segments import Segments

Array = jax.Array


class RetentionState(NamedTuple):
  memory: Array  # [B, H, dk, dv]


class Retention(Mixer):
  """Multi-scale retention with ``cfg.n_heads`` heads of key dim ``dk`` and value dim ``dv``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, dk, dv = cfg.d_model, cfg.n_heads, cfg.dk, cfg.dv
    self.heads, self.dk, self.dv = h, dk, dv
    self.rope_theta, self.chunk_size, self.impl = cfg.rope_theta, cfg.chunk_size, cfg.impl
    self.q = Dense((d,), (h, dk), ("embed", "heads", "head_dim"), rngs=rngs)
    self.k = Dense((d,), (h, dk), ("embed", "heads", "head_dim"), rngs=rngs)
    self.v = Dense((d,), (h, dv), ("embed", "heads", "head_dim"), rngs=rngs)
    self.out = OutputGate(d, h, dv, rngs=rngs, eps=cfg.norm_eps)

  def log_decay(self) -> Array:
    """``log γ_h`` for h = 0..H−1 (RetNet's multi-scale decays)."""
    return jnp.log1p(-2.0**(-5.0 - jnp.arange(self.heads, dtype=jnp.float32)))

  def init_state(self, batch_size: int, max_len: int) -> RetentionState:
    del max_len
    return RetentionState(jnp.zeros((batch_size, self.heads, self.dk, self.dv)))

  def __call__(self, x: Array, state: Optional[RetentionState] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None) -> tuple[Array, Optional[RetentionState]]:
    b, t, _ = x.shape
    positions = (pos + jnp.arange(t, dtype=jnp.int32) if segments is None
                 else segments.positions)
    q = rope(self.q(x), positions, self.rope_theta)
    k = rope(self.k(x), positions, self.rope_theta)
    g = jnp.broadcast_to(self.log_decay(), (b, t, self.heads)).astype(x.dtype)
    o, memory = ops.linear_attention(q, k, self.v(x), g=g,
                                     initial_state=None if state is None else state.memory,
                                     chunk_size=self.chunk_size, impl=self.impl,
                                     reset=None if segments is None else segments.reset)
    return self.out(o, x), None if state is None else RetentionState(memory)


register("retnet", Retention, description="RetNet: multi-scale retention (fixed per-head decay)")
