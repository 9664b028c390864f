"""Matrix memories: ``M(x) = x S`` with ``S`` of shape ``[K, V]``, and the delta rule's chunked form.

Linear attention, RetNet, Mamba2/SSD, GLA, DeltaNet, Gated DeltaNet, TTT-Linear and linear-memory
Titans all write a matrix memory (README.md, "The ops"). Their token-by-token reference is
``core.recurrent_scan`` with ``LINEAR``; linear attention and Titans use ``core.chunk_start_scan``
for their parallel form. The delta rule's gradient depends on the memory written by the previous
token of the same chunk, so its parallel form needs the UT transform, below; it shares the chunk
algebra of ``core``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlx.memory import core

Array = jax.Array


class LinearMemory(core.Memory):
  """``M(x) = x @ w`` with one layer ``w: [K, V]`` (the state ``S`` of the ops)."""

  def forward(self, matmul: core.MatMul, x: Array) -> Array:
    return matmul("w", x)

  def layer_shapes(self, key_dim: int, value_dim: int, hidden_dim: int = 0) -> dict:
    del hidden_dim
    return {"w": (key_dim, value_dim)}


LINEAR = LinearMemory()


def _delta_rule_prepare(chunk):
  """State-independent part of a delta-rule chunk: solve the UT system (all chunks at once).

  Inside a chunk (local times 1..C, γ_t = Π_{l≤t} exp(g_l)), the memory is
  ``S_t = γ_t S_0 + Σ_{j≤t} (γ_t/γ_j) k_j w_jᵀ`` where the pseudo-values w solve
  ``w_t + β_t Σ_{j<t} (γ_t/γ_j)(k_t·k_j) w_j = β_t v_t − β_t γ_t S_0ᵀ k_t``, a unit lower triangular
  system ``(I + A) W = βV − (βγ K) S_0``. With ``(I + A)^{-1}`` (``core.unit_lower_inverse``),
  ``W = U − Wk S_0`` with U and Wk independent of S_0.
  """
  q, k, v, beta, log_decay = chunk
  decay = core.decay_matrix(log_decay)
  gamma = jnp.exp(jnp.cumsum(log_decay))
  inverse = core.unit_lower_inverse(beta[:, None] * decay * (k @ k.T))
  u = inverse @ (beta[:, None] * v)
  wk = inverse @ ((beta * gamma)[:, None] * k)
  return q, k, u, wk, decay, gamma


def _delta_rule_body(state, prepared):
  """Sequential part of a chunk: its pseudo-values and the state after it."""
  _, k, u, wk, decay, gamma = prepared
  writes = u - wk @ state
  return core.chunk_end_weights(state, k, writes, decay[-1], gamma[-1]), (state, writes)


def _delta_rule_read(prepared, y):
  """Parallel part of a chunk: every token's read, from the chunk-start state and pseudo-values."""
  q, k, _, _, decay, gamma = prepared
  state, writes = y
  return core.chunk_matmul(q, state, k, writes, decay, gamma)


def delta_rule_chunked(q: Array, k: Array, v: Array, beta: Array, log_decay: Array, state: Array,
                       chunk_size: int, batch_ndim: int = 0):
  """Chunk-parallel (gated) delta rule, exact for every chunk size.

  Args:
    q: ``[T, K]`` (already scaled); k: ``[T, K]``; v: ``[T, V]``; beta, log_decay: ``[T]``;
    state: ``[K, V]``; chunk_size: C; batch_ndim: leading batch axes on every argument.

  Returns:
    ``(o [T, V], final state [K, V])``.
  """
  state, o = core.scan_chunks(_delta_rule_body, state, (q, k, v, beta, log_decay), chunk_size,
                              prepare=_delta_rule_prepare, finish=_delta_rule_read,
                              batch_ndim=batch_ndim)
  return o, state
