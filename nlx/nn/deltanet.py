"""DeltaNet: the delta rule on L2-normalised keys, ``S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ``.

``nlx.ops.delta_rule`` with ``β = sigmoid(x W_β)``; q, k, v through the shared ``QKV`` input
(short conv, SiLU, L2-normalised q and k) and per-head RMSNorm before the output projection.
``DeltaRuleMixer`` also serves Gated DeltaNet (``nlx.nn.gated_deltanet``): with ``gated=True`` it
adds the Mamba2-style decay ``g = −exp(A_log) · softplus(x W_a + dt_bias)`` and a SiLU output gate.
Packed documents: ``segments.reset`` restarts the conv window and the memory (``delta_rule``'s
``reset``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.nn.config import ModelConfig
from nlx.nn.mamba2 import _a_log_init, _dt_bias_init
from nlx.nn.mixer import Mixer
from nlx.nn.params import Dense, param
from nlx.nn.qkv import QKV, OutputGate
from nlx.nn.registry import register
from nlx.nn.segments import Segments

Array = jax.Array


class DeltaState(NamedTuple):
  conv: Optional[Array]  # [B, W − 1, H (2 dk + dv)] or None without conv
  memory: Array          # [B, H, dk, dv]


class DeltaRuleMixer(Mixer):
  """DeltaNet (``gated=False``) or Gated DeltaNet (``gated=True``)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, gated: bool = False):
    d, h, dk, dv = cfg.d_model, cfg.n_heads, cfg.dk, cfg.dv
    self.heads, self.dk, self.dv, self.gated = h, dk, dv, gated
    self.chunk_size, self.impl = cfg.chunk_size, cfg.impl
    self.qkv = QKV(d, h, dk, dv, cfg.conv_size, rngs=rngs)
    self.beta = Dense((d,), (h,), ("embed", "heads"), rngs=rngs)
    if gated:
      self.a = Dense((d,), (h,), ("embed", "heads"), rngs=rngs)
      self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))
      self.a_log = param(rngs, _a_log_init, (h,), ("heads",))
    self.out = OutputGate(d, h, dv, rngs=rngs, gated=gated, eps=cfg.norm_eps)

  def init_state(self, batch_size: int, max_len: int) -> DeltaState:
    del max_len
    return DeltaState(self.qkv.init_state(batch_size),
                      jnp.zeros((batch_size, self.heads, self.dk, self.dv)))

  def log_decay(self, x: Array) -> Optional[Array]:
    """Gated DeltaNet's ``g [B, T, H]`` (None for DeltaNet)."""
    if not self.gated:
      return None
    dt = jax.nn.softplus(self.a(x).astype(jnp.promote_types(x.dtype, jnp.float32)) +
                         self.dt_bias[...])
    return (-jnp.exp(self.a_log[...]) * dt).astype(x.dtype)

  def __call__(self, x: Array, state: Optional[DeltaState] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None) -> tuple[Array, Optional[DeltaState]]:
    del pos
    reset = None if segments is None else segments.reset
    q, k, v, conv = self.qkv(x, None if state is None else state.conv, reset)
    beta = jax.nn.sigmoid(self.beta(x))
    o, memory = ops.delta_rule(q, k, v, beta=beta, g=self.log_decay(x),
                               initial_state=None if state is None else state.memory,
                               chunk_size=self.chunk_size, impl=self.impl, reset=reset)
    return self.out(o, x), None if state is None else DeltaState(conv, memory)


register("deltanet", DeltaRuleMixer, description="DeltaNet: the delta rule, L2-normalised keys")
