"""Shared inputs for the ops tests: each op variant as a function of a dict of arrays.

A variant maps ``(arrays, impl, chunk_size) -> (o, [state leaves])`` so that the tests can take
gradients with respect to every array (sequences, gates and initial states) in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nlx import ops
from nlx.memory.deep import MLPMemory

# (B, T, H, K, V, chunk): every value of B ∈ {1,2}, T ∈ {1,17,64,130}, H ∈ {1,3}, K, V ∈ {16,32},
# chunk ∈ {1,16,64} appears, with T < chunk, T a multiple of chunk, and T with a remainder.
SHAPES = [
    (1, 1, 1, 16, 16, 64),
    (2, 17, 3, 16, 32, 16),
    (1, 64, 1, 32, 16, 64),
    (2, 130, 3, 32, 32, 16),
    (1, 17, 3, 32, 16, 1),
    (2, 64, 1, 16, 16, 16),
    (1, 130, 1, 16, 32, 64),
    (2, 1, 3, 32, 32, 16),
    (1, 64, 3, 16, 32, 1),
]
SHAPES_SQUARE = [s for s in SHAPES if s[3] == s[4]]  # the residual MLP memory needs K == V


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _is_mlp(variant: str) -> bool:
  return variant.startswith(("titans_mlp", "dgd_mlp"))


def make_arrays(variant: str, b: int, t: int, h: int, dk: int, dv: int, dtype, seed: int = 0):
  """Random, well-conditioned inputs for ``variant`` (keys unit-norm, gates in range)."""
  r = jax.random.split(jax.random.PRNGKey(seed), 10)
  normal = lambda i, shape: jax.random.normal(r[i], shape, jnp.float32)
  arrays = {
      "q": normal(0, (b, t, h, dk)),
      "k": _unit(normal(1, (b, t, h, dk))),
      "v": normal(2, (b, t, h, dv)),
  }
  gate = (b, t, h)
  if "_g" in variant or variant.endswith("_full"):
    arrays["g"] = -0.5 * jax.nn.softplus(normal(3, gate))
  if variant.startswith("delta"):
    arrays["beta"] = jax.nn.sigmoid(normal(4, gate))
  if variant.startswith(("titans", "dgd")):
    arrays["lr"] = 0.5 * jax.nn.sigmoid(normal(4, gate))
    if variant.endswith("_full"):
      arrays["momentum"] = jax.nn.sigmoid(normal(5, gate))
  if _is_mlp(variant):
    state = MLPMemory().init_state(r[6], b, h, dk, 2 * dk)
    arrays["s0"] = {"w1": state["w1"] + 0.0, "w2": state["w2"] + 0.0}
  else:
    arrays["s0"] = 0.3 * normal(6, (b, h, dk, dv))
  if variant.endswith("_full"):
    arrays["p0"] = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), arrays["s0"])
  return jax.tree.map(lambda x: x.astype(dtype), arrays)


def run(variant: str, arrays: dict, impl: str, chunk_size: int):
  """Runs ``variant`` on ``arrays``; returns ``(o, list of final-state leaves)``."""
  a = arrays
  if variant.startswith("linear_attention"):
    o, s = ops.linear_attention(a["q"], a["k"], a["v"], g=a.get("g"), initial_state=a["s0"],
                                chunk_size=chunk_size, impl=impl)
    return o, [s]
  if variant.startswith("delta"):
    o, s = ops.delta_rule(a["q"], a["k"], a["v"], beta=a["beta"], g=a.get("g"),
                          initial_state=a["s0"],
                          chunk_size=chunk_size, impl=impl)
    return o, [s]
  o, s = memory_op(variant, a, ops.TitansState(a["s0"], a.get("p0")), chunk_size, impl)
  # The offset is an int (where the next token falls in its chunk); compared by the tests of
  # continuation, not differentiated.
  return o, jax.tree.leaves((s.memory, s.momentum, s.chunk_start))


def memory_op(variant: str, a: dict, state, chunk_size: int, impl: str):
  """``titans_memory`` or ``dgd_memory`` (``dgd_*`` variants; ``_before``: read before the write,
  ``_dot``: the dot-product objective; ``_prox``: the proximal rate) on the sequences and gates of
``a``."""
  kwargs = dict(lr=a["lr"], momentum=a.get("momentum"), g=a.get("g"),
                memory="mlp" if _is_mlp(variant) else "linear", initial_state=state,
                chunk_size=chunk_size, impl=impl)
  if variant.startswith("dgd"):
    return ops.dgd_memory(a["q"], a["k"], a["v"], objective="dot" if "_dot" in variant else "l2",
                          read="before_write" if "_before" in variant else "after_write",
                          proximal="_prox" in variant, **kwargs)
  return ops.titans_memory(a["q"], a["k"], a["v"], **kwargs)


VARIANTS = ["linear_attention", "linear_attention_g", "delta_rule", "delta_rule_g",
            "titans_linear", "titans_linear_full", "titans_mlp", "titans_mlp_full",
            "dgd_linear_full", "dgd_mlp_full", "dgd_mlp_g_before", "dgd_linear_dot_g",
            "dgd_mlp_prox_full"]


def shapes_for(variant: str):
  return SHAPES_SQUARE if _is_mlp(variant) else SHAPES


def loss_and_grads(variant: str, impl: str, chunk_size: int):
  """A jitted ``arrays -> ((o, states), grads)`` with a random linear functional as the loss."""

  def loss(arrays):
    o, states = run(variant, arrays, impl, chunk_size)
    weights = [jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)) for x in [o] + states]
    total = sum((w * x).sum() for w, x in zip(weights, [o] + states))
    return total, (o, states)

  return jax.jit(jax.grad(loss, has_aux=True))


def to_np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
