"""The associative-memory core: objectives, memories, one recurrence and its parallel forms.

* ``objectives``: inner objectives (``dot``, ``l2``) with their errors ``∂loss/∂M(k)``.
* ``core``: the ``Memory`` abstraction, ``recurrent_scan`` (the token-by-token reference for every
  op) and ``chunk_start_scan`` (the dual form for chunk-start gradients, any memory).
* ``linear``: the matrix memory and the delta rule's UT-transform chunked form.
* ``deep``: the residual MLP memory of Titans and HOPE.
"""

from nlx.memory.core import Memory, chunk_start_scan, recurrent_scan
from nlx.memory.deep import MLPMemory
from nlx.memory.linear import LINEAR, LinearMemory, delta_rule_chunked
from nlx.memory.objectives import DOT, L2, Objective, get_objective

__all__ = ["Memory", "LinearMemory", "MLPMemory", "LINEAR", "Objective", "DOT", "L2",
           "get_objective", "recurrent_scan", "chunk_start_scan", "delta_rule_chunked"]
