"""Matrix memories: ``M(x) = x S`` with ``S`` of shape ``[K, V]``.

Linear attention, RetNet, Mamba2/SSD, GLA, DeltaNet, Gated DeltaNet, TTT-Linear and linear-memory
Titans all write a matrix memory (README.md, "The ops"). Their token-by-token reference is
``core.recurrent_scan`` with ``LINEAR``; linear attention and Titans use ``core.chunk_start_scan``
for their parallel form. The delta rule's gradient depends on the memory written by the previous
token of the same chunk, so its parallel form needs the UT transform: ``delta_rule_chunked``, next
to its op in ``nlx/ops/delta_rule.py``, built from the chunk algebra of ``nlx.memory.chunks``.
"""

from __future__ import annotations

import jax

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
