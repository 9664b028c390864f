"""Public sequence ops of nlx: associative memories over ``[B, T, H, D]`` sequences.

Conventions (README.md, "The ops"; the layout of flash-linear-attention):

* q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gates (g, beta, lr, momentum): ``[B, T, H]``.
* ``g`` is a log-decay (≤ 0; the memory is multiplied by ``exp(g_t)`` before token t's write).
* A matrix memory's state is ``[B, H, K, V]``; token t reads ``o_t = S_tᵀ (scale · q_t)`` after its
  own write.
* Recurrences accumulate in float32 (float64 for float64 inputs); ``o`` takes the input dtype and
  the final state stays in the accumulation dtype.
* Every op returns ``(o, final_state)``; passing ``final_state`` as ``initial_state`` of the next
  call continues the sequence.
* Gates are keyword-only (``delta_rule(q, k, v, beta=beta, g=g)``): flash-linear-attention orders
  them ``(q, k, v, g, beta)``, and a positional call in that order would compute something else
  silently; here it is a TypeError.

``impl`` picks the algorithm: ``"recurrent"`` (token-by-token ``lax.scan``: the reference),
``"chunked"`` (parallel form over chunks of ``chunk_size`` tokens), ``"pallas"`` (the kernels of
``pallas_kernels/chunked_memory``: Triton on GPU, Mosaic on TPU, the GPU kernel in Pallas interpret
mode on CPU) and ``"auto"``: the kernel on GPU/TPU when it supports the arguments (float32/bfloat16,
power-of-two head dims and chunk size in [16, 256], a linear memory), else ``"chunked"``.

All four ops are instances of the one memory core in ``nlx.memory`` (``recurrent.py``: the
token-by-token reference; ``chunks.py`` and ``chunk_start.py``: its chunk-parallel forms;
``core.py`` names them all). One module per op family,
each with its public op, its ``impl`` dispatch and, in its docstring, where its reference, its
chunked form and its kernel live:

* ``linear_attention.py``: ``linear_attention`` (and the layout/dispatch of matrix memories);
* ``delta_rule.py``: ``delta_rule`` and its UT-transform chunked form ``delta_rule_chunked``;
* ``titans.py``: ``titans_memory`` and ``TitansState`` (and the body shared with DGD);
* ``dgd.py``: ``dgd_memory``;
* ``validation.py``: every argument check; ``common.py``: ``impl`` resolution and layout.
"""

# A module and its op share a name (nlx/ops/delta_rule.py defines delta_rule): the package's
# attribute is the op, bound here after the modules are loaded.
from nlx.ops.delta_rule import delta_rule
from nlx.ops.dgd import dgd_memory
from nlx.ops.linear_attention import linear_attention
from nlx.ops.titans import TitansState, titans_memory
from nlx.ops.validation import FLOAT_DTYPES, IMPLS

__all__ = ["linear_attention", "delta_rule", "titans_memory", "dgd_memory", "TitansState",
           "IMPLS", "FLOAT_DTYPES"]
