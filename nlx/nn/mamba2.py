"""Mamba2 (SSD): a gated linear attention with a per-head scalar decay, plus the short conv.

With ``dt = softplus(x W_dt + dt_bias)`` and ``A = −exp(A_log)`` per head, the SSD recurrence
``h ← exp(A dt_t) h + B_t (dt_t x_t)ᵀ``, ``y_t = hᵀ C_t + D x_t`` is ``nlx.ops.linear_attention``
with ``q = C``, ``k = B``, ``v = dt · x``, ``g = A · dt`` and ``scale = 1``. B and C are shared by
all heads (one group). The input branch (x, B, C) passes a causal depthwise conv and SiLU; the
output is RMSNorm(y) ⊙ SiLU(z), projected back to d_model. Packed documents: ``segments.reset``
restarts the conv window and the SSD state (``linear_attention``'s ``reset``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx import ops
from nlx.nn.config import ModelConfig
from nlx.nn.conv import ShortConv
from nlx.nn.mixer import Mixer
from nlx.nn.norms import RMSNorm
from nlx.nn.params import Dense, constant, param
from nlx.nn.registry import register
from nlx.nn.segments import Segments

Array = jax.Array


class Mamba2State(NamedTuple):
  conv: Array    # [B, W − 1, inner + 2N]
  memory: Array  # [B, H, N, P]


def _dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=0.1):
  """Inverse softplus of dt ~ log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
  dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min)) +
               math.log(dt_min))
  return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(key, shape, dtype):
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def check_mamba2(cfg: ModelConfig) -> None:
  inner = cfg.mamba_expand * cfg.d_model
  cfg.require("mamba2", mamba_head_dim=(inner % cfg.mamba_head_dim == 0,
                                        f"must divide mamba_expand * d_model = {inner}"))
  cfg.require("mamba2", conv_size=(cfg.conv_size >= 1, "Mamba2 needs its short conv (>= 1)"))


class Mamba2(Mixer):
  """The Mamba2 mixer: ``inner = mamba_expand · d`` channels in ``inner / mamba_head_dim`` heads."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    check_mamba2(cfg)
    d, n = cfg.d_model, cfg.state_dim
    inner = cfg.mamba_expand * d
    h, p = inner // cfg.mamba_head_dim, cfg.mamba_head_dim
    self.heads, self.head_dim, self.state_dim, self.inner = h, p, n, inner
    self.chunk_size, self.impl = cfg.chunk_size, cfg.impl
    self.z = Dense((d,), (inner,), ("embed", "mlp"), rngs=rngs)
    self.xbc = Dense((d,), (inner + 2 * n,), ("embed", "mlp"), rngs=rngs)
    self.dt = Dense((d,), (h,), ("embed", "heads"), rngs=rngs)
    self.conv = ShortConv(inner + 2 * n, cfg.conv_size, "mlp", rngs=rngs)
    self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))
    self.a_log = param(rngs, _a_log_init, (h,), ("heads",))
    self.d_skip = param(rngs, constant(1.0), (h,), ("heads",))
    self.norm = RMSNorm((inner,), ("mlp",), rngs=rngs, eps=cfg.norm_eps)
    self.out = Dense((inner,), (d,), ("mlp", "embed"), rngs=rngs)

  def init_state(self, batch_size: int, max_len: int) -> Mamba2State:
    del max_len
    return Mamba2State(self.conv.init_state(batch_size),
                       jnp.zeros((batch_size, self.heads, self.state_dim, self.head_dim)))

  def __call__(self, x: Array, state: Optional[Mamba2State] = None, pos: Array | int = 0,
               segments: Optional[Segments] = None) -> tuple[Array, Optional[Mamba2State]]:
    del pos
    b, t, _ = x.shape
    h, p, n = self.heads, self.head_dim, self.state_dim
    reset = None if segments is None else segments.reset
    xbc, conv_state = self.conv(self.xbc(x), None if state is None else state.conv, reset)
    xs, bs, cs = jnp.split(xbc, [self.inner, self.inner + n], axis=-1)
    xs = xs.reshape(b, t, h, p)
    dt = jax.nn.softplus(self.dt(x).astype(jnp.promote_types(x.dtype, jnp.float32)) +
                         self.dt_bias[...])  # [B, T, H], float32 (float64 for float64 x)
    g = -jnp.exp(self.a_log[...]) * dt
    heads = lambda y: jnp.broadcast_to(y[:, :, None, :], (b, t, h, n))
    y, memory = ops.linear_attention(heads(cs), heads(bs), xs * dt[..., None].astype(xs.dtype),
                                     g=g.astype(x.dtype), scale=1.0,
                                     initial_state=None if state is None else state.memory,
                                     chunk_size=self.chunk_size, impl=self.impl, reset=reset)
    y = y + self.d_skip[...].astype(y.dtype)[:, None] * xs
    y = self.norm(y.reshape(b, t, self.inner), gate=self.z(x))
    new_state = None if state is None else Mamba2State(conv_state, memory)
    return self.out(y), new_state


register("mamba2", Mamba2, validate=check_mamba2, description="Mamba2 (SSD) with its short conv")
