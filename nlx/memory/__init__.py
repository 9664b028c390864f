"""The associative-memory core: objectives, memories, one recurrence and its parallel forms.

* ``objectives``: inner objectives (``dot``, ``l2``) with their errors ``∂loss/∂M(k)``.
* ``core``: the recurrence every op runs, and the one entry point to its pieces:
  ``base`` (the ``Memory`` abstraction), ``recurrent`` (``recurrent_scan``, the token-by-token
  reference for every op), ``chunks`` (the chunk algebra and the UT inverse) and
  ``chunk_start`` (``chunk_start_scan``, the dual form for chunk-start gradients, any memory).
* ``linear``: the matrix memory.
* ``deep``: the residual MLP memory of Titans and HOPE, and TTT's inner models.

The ops built on it (``linear_attention``, ``delta_rule`` with its UT-transform chunked form,
``titans_memory``, ``dgd_memory``) are in ``nlx.ops``.
"""

from nlx.memory.core import Memory, chunk_start_scan, recurrent_scan
from nlx.memory.deep import MLPMemory
from nlx.memory.linear import LINEAR, LinearMemory
from nlx.memory.objectives import DOT, L2, Objective, get_objective

__all__ = ["Memory", "LinearMemory", "MLPMemory", "LINEAR", "Objective", "DOT", "L2",
           "get_objective", "recurrent_scan", "chunk_start_scan"]

