"""nlx: Nested Learning in JAX.

The associative-memory core (``nlx.memory``), the public sequence ops built on it (``nlx.ops``),
levels with their own update periods (``nlx.levels``) and optimizers whose state is a memory
(``nlx.optim``). See DESIGN.md in the project docs.
"""

from nlx import levels, memory, ops, optim
from nlx.nn import build_model
from nlx.ops import TitansState, delta_rule, linear_attention, titans_memory

__version__ = "0.1.0"

__all__ = ["levels", "memory", "ops", "optim", "linear_attention", "delta_rule", "titans_memory",
           "TitansState", "build_model", "__version__"]
