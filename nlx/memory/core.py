"""The associative-memory core: one recurrence and one chunk-parallel form for every memory.

Every sequence op of nlx is an associative memory ``M`` written once per token by a gradient step
on an inner objective (docs/EQUATIONS.md §1). For token t with key k_t, value v_t, query q_t,
learning rate lr_t, log-decay g_t and momentum η_t:

    decayed = exp(g_t) · M_{t-1}
    G_t     = ∇_M loss(M_ref(k_t), v_t)        M_ref = decayed (online), or the chunk-start state
    P_t     = η_t · P_{t-1} − lr_t · G_t       (P_t = −lr_t · G_t when there is no momentum)
    M_t     = decayed + P_t
    o_t     = M_t(q_t)                         (the read sees token t's own write)

Two options change the write and the read (HOPE's delta gradient descent, docs/EQUATIONS.md §4):

* ``dgd=True`` adds DGD's decay term: each dense layer ``W_l`` (input ``h_l`` at the gradient's
  reference state) becomes ``(exp(g_t) I − lr_t h_lᵀ h_l) W_l + P_t``, the decay touching only that
  layer (``h_l`` a row vector, ``W_l`` ``[in, out]``);
* ``read="before_write"`` reads ``o_t = M_{t−1}(q_t)`` (the memory before token t's write).

A third option is TTT's learning-rate schedule inside a chunk (Sun et al. 2024, Eq. 4 and the
``token_idx`` of its code), for gradients at the chunk-start state and without momentum or DGD:

* ``row_scale`` ``c [C]`` scales the chunk's accumulated writes by the token's position i in its
  chunk: ``M_t = γ_t M_0 + c_i A_t`` with ``A_t = Σ_{j≤t} (γ_t/γ_j) U_j`` (γ_t: the decay since
  the chunk start; ``M_0`` the chunk-start state), so ``c_i = 1/(i+1)`` makes every token read
  the chunk-start weights minus the *mean* of the chunk's gradient steps so far. ``c ≡ 1`` is the
  plain recurrence above. ``A`` is not a function of ``M``, so a call continuing a chunk needs it
  (``accumulated``; zero at a chunk boundary).

``recurrent_scan`` runs exactly this, token by token, with ``jax.grad`` for G_t: it is the
reference every fast path is tested against. ``chunk_start_scan`` is the parallel (dual) form for
gradients taken at the chunk-start state: within a chunk all G_j are known from the chunk-start
weights, so M_t is a linear combination of M_0, P_0 and the per-token gradients, and reads become
masked matmuls. ``nlx.ops.delta_rule.delta_rule_chunked`` covers the remaining case (online L2
gradients on a matrix memory) with the UT transform and shares the same chunk algebra.

All functions here work on ONE (batch, head) slice: sequences are ``[T, D]``, gates ``[T]``,
memory weights a dict ``{layer name: [in, out]}``; ``batch_ndim`` leading axes are vmapped.

This module is the core's one entry point; the code lives in four modules, read in this order:

* ``nlx/memory/base.py``: the ``Memory`` abstraction (dense layers used once each through a
  ``matmul`` callback; fixed parameters) and the per-slice helpers;
* ``nlx/memory/recurrent.py``: ``recurrent_scan``, the reference;
* ``nlx/memory/chunks.py``: the chunk algebra (decay matrices, ``unit_lower_inverse``/``solve``,
  ``ChunkCoefficients``, ``chunk_matmul``, ``scan_chunks``);
* ``nlx/memory/chunk_start.py``: the chunk-start dual form (``chunk_start_scan``, its ``_offset``
  variant that continues a chunk, its ``_packed`` variant with document boundaries, and
  ``chunk_update``/``chunk_output`` for callers that scan over chunks themselves).

``nlx/memory/rates.py`` bounds a chunk's rates by how alike its keys are (``gram_rates``).
"""

from nlx.memory.base import (Array, MatMul, Memory, READS, Weights, batched, bind, check_read,
                             check_row_scale, decay_term, layer_inputs, tree_scale)
from nlx.memory.chunk_start import (ChunkWrites, chunk_output, chunk_read, chunk_start_scan,
                                    chunk_start_scan_offset, chunk_update, chunk_writes,
                                    layer_grad_factors, layer_rates)
from nlx.memory.packed import (buffer_chunks, chunk_start_scan_packed, document_slots,
                               gradient_chunks, place_at_slots, small_buffer_chunks,
                               with_small_buffer)
from nlx.memory.chunks import (ChunkCoefficients, chunk_coefficients, chunk_end_weights,
                               chunk_matmul, decay_matrix, previous_rows, scan_chunks,
                               segment_decay, segment_sum, unit_lower_inverse, unit_lower_solve)
from nlx.memory.rates import gram_rates
from nlx.memory.recurrent import chunk_positions, recurrent_scan

__all__ = [
    "Array", "MatMul", "Memory", "READS", "Weights", "batched", "bind", "check_read",
    "check_row_scale", "decay_term", "layer_inputs", "tree_scale", "recurrent_scan",
    "ChunkCoefficients",
    "chunk_coefficients", "chunk_end_weights", "chunk_matmul", "decay_matrix", "previous_rows",
    "scan_chunks", "segment_decay", "segment_sum", "unit_lower_inverse", "unit_lower_solve",
    "ChunkWrites", "chunk_output", "chunk_read", "chunk_start_scan", "chunk_start_scan_offset",
    "chunk_update", "chunk_writes", "layer_grad_factors", "layer_rates", "chunk_start_scan_packed",
    "document_slots", "buffer_chunks", "chunk_positions", "place_at_slots",
    "gradient_chunks", "small_buffer_chunks", "with_small_buffer", "gram_rates",
]
