"""The input side shared by the memory mixers: q, k, v projections, short conv, SiLU, L2 norm.

DeltaNet, Gated DeltaNet, TTT and Titans all read ``x`` the same way (docs/EQUATIONS.md §5, the
block): ``q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))`` with q and k
L2-normalised per head; one depthwise convolution over the concatenated channels equals three
separate ones. The output side shared by them is ``OutputGate``: per-head RMSNorm, an optional SiLU
gate from ``x``, and the output projection.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nlx.nn.conv import ShortConv
from nlx.nn.norms import RMSNorm, l2_normalize
from nlx.nn.params import Dense

Array = jax.Array


class QKV(nnx.Module):
  """``x [B, T, d] -> q, k [B, T, H, dk], v [B, T, H, dv]`` (and the conv state)."""

  def __init__(self, d_model: int, heads: int, dk: int, dv: int, conv_size: int, *,
               rngs: nnx.Rngs, normalize_qk: bool = True):
    self.heads, self.dk, self.dv, self.normalize_qk = heads, dk, dv, normalize_qk
    self.q = Dense((d_model,), (heads, dk), ("embed", "heads", "head_dim"), rngs=rngs)
    self.k = Dense((d_model,), (heads, dk), ("embed", "heads", "head_dim"), rngs=rngs)
    self.v = Dense((d_model,), (heads, dv), ("embed", "heads", "head_dim"), rngs=rngs)
    channels = heads * (2 * dk + dv)
    self.conv = ShortConv(channels, conv_size, "qkv", rngs=rngs) if conv_size else None

  def init_state(self, batch_size: int) -> Optional[Array]:
    return None if self.conv is None else self.conv.init_state(batch_size)

  def __call__(self, x: Array, conv_state: Optional[Array] = None,
               reset: Optional[Array] = None):
    """Returns ``(q, k, v, conv_state)``; conv_state is None when none was given. ``reset
    [B, T]`` (document starts, or None) restarts the conv window (``ShortConv``)."""
    b, t, _ = x.shape
    h, dk, dv = self.heads, self.dk, self.dv
    qkv = jnp.concatenate([self.q(x).reshape(b, t, h * dk), self.k(x).reshape(b, t, h * dk),
                           self.v(x).reshape(b, t, h * dv)], axis=-1)
    if self.conv is not None:
      qkv, conv_state = self.conv(qkv, conv_state, reset)
    else:
      qkv = jax.nn.silu(qkv)
    q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
    q, k, v = q.reshape(b, t, h, dk), k.reshape(b, t, h, dk), v.reshape(b, t, h, dv)
    if self.normalize_qk:
      q, k = l2_normalize(q), l2_normalize(k)
    return q, k, v, conv_state


class OutputGate(nnx.Module):
  """``o [B, T, H, dv] -> [B, T, d]``: per-head RMSNorm, ``⊙ SiLU(x W_g)`` if gated, projection."""

  def __init__(self, d_model: int, heads: int, dv: int, *, rngs: nnx.Rngs, gated: bool = True,
               eps: float = 1e-6):
    self.norm = RMSNorm((dv,), ("head_dim",), rngs=rngs, eps=eps)
    self.gate = (Dense((d_model,), (heads, dv), ("embed", "heads", "head_dim"), rngs=rngs)
                 if gated else None)
    self.o = Dense((heads, dv), (d_model,), ("heads", "head_dim", "embed"), rngs=rngs)

  def __call__(self, o: Array, x: Array) -> Array:
    gate = None if self.gate is None else self.gate(x)
    return self.o(self.norm(o, gate))
