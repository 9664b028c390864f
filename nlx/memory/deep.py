"""Deep (MLP) memories of Titans and HOPE.

``MLPMemory`` is the per-head residual two-layer MLP ``M(x) = x + W1 σ(W2 x)`` (PAPER.md §4,
Eq. 89). It is written like any other memory by ``core.recurrent_scan`` (reference) and
``core.chunk_start_scan`` (the TTT/Titans dual form: per-token gradients at the chunk-start
weights, combined with decay and momentum, read through per-layer masked matmuls).

Weights, in the row-vector convention of nlx (``h @ W``): ``w2: [K, hidden]`` (in),
``w1: [hidden, V]`` (out); the residual needs ``K == V``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nlx.memory import core

Array = jax.Array

ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class MLPMemory(core.Memory):
  """Residual two-layer MLP memory ``M(x) = x + σ(x @ w2) @ w1``.

  Attributes:
    activation: σ, one of ``ACTIVATIONS`` ("gelu" by default, as in TTT-MLP).
  """

  activation: str = "gelu"

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"MLPMemory.activation={self.activation!r} is not supported; "
                       f"allowed: {sorted(ACTIVATIONS)}")

  def forward(self, matmul: core.MatMul, x: Array) -> Array:
    return x + matmul("w1", ACTIVATIONS[self.activation](matmul("w2", x)))

  def layer_shapes(self, key_dim: int, value_dim: int, hidden_dim: int) -> dict:
    if key_dim != value_dim:
      raise ValueError(f"the residual MLP memory needs K == V; got K={key_dim}, V={value_dim}")
    return {"w2": (key_dim, hidden_dim), "w1": (hidden_dim, value_dim)}

  def hidden_dim(self, weights: dict) -> int:
    return weights["w2"].shape[-1]

  def init_state(self, key: Array, batch: int, heads: int, dim: int, hidden: int,
                 dtype=jnp.float32) -> dict:
    """Random initial weights ``{"w2": [B, H, dim, hidden], "w1": [B, H, hidden, dim]}``.

    Fan-in scaled normals; the same draw for every batch element (an outer loop learns them).
    """
    k2, k1 = jax.random.split(key)
    w2 = jax.random.normal(k2, (heads, dim, hidden), dtype) * dim**-0.5
    w1 = jax.random.normal(k1, (heads, hidden, dim), dtype) * hidden**-0.5
    return {"w2": jnp.broadcast_to(w2, (batch,) + w2.shape),
            "w1": jnp.broadcast_to(w1, (batch,) + w1.shape)}
