"""Deep (MLP) memories of Titans and HOPE, and TTT's inner models with their LayerNorm.

``MLPMemory`` is the per-head residual two-layer MLP ``M(x) = x + W1 σ(W2 x)`` (Eq. 89
(docs/EQUATIONS.md)). It is written like any other memory by ``core.recurrent_scan`` (reference) and
``core.chunk_start_scan`` (the TTT/Titans dual form: per-token gradients at the chunk-start
weights, combined with decay and momentum, read through per-layer masked matmuls).

Weights, in the row-vector convention of nlx (``h @ W``): ``w2: [K, hidden]`` (in),
``w1: [hidden, V]`` (out); the residual needs ``K == V``.

``TTTMemory`` is the inner model of TTT-Linear and TTT-MLP as the TTT paper's code defines it
(Sun et al. 2024): ``f(x) = x + LN(x W + b)`` or ``f(x) = x + LN(σ(x W1 + b1) W2 + b2)``, with a
per-head LayerNorm whose scale and shift are learned by the outer loop only. The biases are
written by the inner loop like the weights: each is a dense layer with a constant-1 input, so the
core's "every layer used once through ``matmul``" rule covers them. The LayerNorm's scale and
shift are the memory's fixed parameters (``core.Memory.param_shapes`` / ``bind``): the core writes
every entry of the weights dict, and these must not be written, so they travel beside the weights
(per slice, like them) and are bound to the memory inside each per-slice step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

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


TTT_KINDS = ("linear", "mlp")


def layer_norm(x: Array, scale: Array, shift: Array, eps: float) -> Array:
  """LayerNorm over the last axis: ``scale · (x − mean) / sqrt(var + eps) + shift``."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return scale * (x - mean) * jax.lax.rsqrt(var + eps) + shift


@dataclasses.dataclass(frozen=True)
class TTTMemory(core.Memory):
  """TTT's inner model ``f(x) = x + LN(g(x))`` (module docstring).

  The inner loss ``½‖f(k) − v‖²`` (``objectives.L2``) is TTT's ``½‖LN(g(k)) − (v − k)‖²``: the
  residual sits outside the LayerNorm, so the reconstruction target of ``LN(g(k))`` is ``v − k``;
  the read ``f(q) = q + LN(g(q))`` is TTT's output.

  Weights (row vectors, ``h @ W``; TTT's names, W1 the first layer): "linear": ``w [K, V]``,
  ``b [1, V]``; "mlp": ``w1 [K, hidden]``, ``b1 [1, hidden]``, ``w2 [hidden, V]``, ``b2 [1, V]``.
  Fixed parameters (one slice): ``scale [V]``, ``shift [V]`` (the LayerNorm's γ and β). The
  residual needs ``K == V``.

  Attributes:
    kind: "linear" (``g(x) = x W + b``) or "mlp" (``g(x) = σ(x W1 + b1) W2 + b2``).
    activation: σ of "mlp", one of ``ACTIVATIONS`` ("gelu", tanh approximation, as TTT).
    eps: the LayerNorm's epsilon (TTT: 1e-6).
    params: the bound fixed parameters ``{"scale", "shift"}`` of one slice (``bind``); None on
      an unbound memory, whose forward pass refuses to run.
  """

  kind: str = "linear"
  activation: str = "gelu"
  eps: float = 1e-6
  params: Optional[dict] = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    if self.kind not in TTT_KINDS:
      raise ValueError(f"TTTMemory.kind={self.kind!r} is not one of {TTT_KINDS}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"TTTMemory.activation={self.activation!r} is not supported; "
                       f"allowed: {sorted(ACTIVATIONS)}")

  def forward(self, matmul: core.MatMul, x: Array) -> Array:
    if self.params is None:
      raise ValueError("TTTMemory needs its LayerNorm parameters: bind them with "
                       "memory.bind({'scale': [V], 'shift': [V]}) (titans_memory's "
                       "memory_params does so per head)")
    one = jnp.ones(x.shape[:-1] + (1,), x.dtype)  # a bias is a layer whose input is 1
    if self.kind == "linear":
      z = matmul("w", x) + matmul("b", one)
    else:
      hidden = ACTIVATIONS[self.activation](matmul("w1", x) + matmul("b1", one))
      z = matmul("w2", hidden) + matmul("b2", one)
    return x + layer_norm(z, self.params["scale"], self.params["shift"], self.eps)

  def layer_shapes(self, key_dim: int, value_dim: int, hidden_dim: int) -> dict:
    if key_dim != value_dim:
      raise ValueError(f"TTT's inner model x + LN(g(x)) needs K == V; got K={key_dim}, "
                       f"V={value_dim}")
    if self.kind == "linear":
      return {"w": (key_dim, value_dim), "b": (1, value_dim)}
    return {"w1": (key_dim, hidden_dim), "b1": (1, hidden_dim), "w2": (hidden_dim, value_dim),
            "b2": (1, value_dim)}

  def hidden_dim(self, weights: dict) -> int:
    return 0 if self.kind == "linear" else weights["w1"].shape[-1]

  def param_shapes(self, key_dim: int, value_dim: int, hidden_dim: int) -> dict:
    del key_dim, hidden_dim
    return {"scale": (value_dim,), "shift": (value_dim,)}

  def bind(self, params: Optional[dict]) -> "TTTMemory":
    if params is None or set(params) != {"scale", "shift"}:
      raise ValueError(f"TTTMemory.bind needs params {{'scale', 'shift'}}; got "
                       f"{None if params is None else sorted(params)}")
    return dataclasses.replace(self, params=params)

  def init_state(self, key: Array, batch: int, heads: int, dim: int, hidden: int = 0,
                 std: float = 0.02, dtype=jnp.float32) -> dict:
    """Initial weights ``{name: [B, H, in, out]}`` as TTT's code draws them: normals of std
    ``std`` (0.02), biases zero; the same draw for every batch element."""
    shapes = self.layer_shapes(dim, dim, hidden)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    weights = {name: (jnp.zeros((heads,) + shape, dtype) if name.startswith("b") else
                      std * jax.random.normal(keys[name], (heads,) + shape, dtype))
               for name, shape in shapes.items()}
    return {name: jnp.broadcast_to(w, (batch,) + w.shape) for name, w in weights.items()}

  def init_params(self, heads: int, dim: int, dtype=jnp.float32) -> dict:
    """The LayerNorm's initial scale (1) and shift (0) per head: ``{name: [H, dim]}``."""
    return {"scale": jnp.ones((heads, dim), dtype), "shift": jnp.zeros((heads, dim), dtype)}
