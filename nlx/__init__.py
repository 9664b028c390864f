"""nlx: Nested Learning in JAX.

The associative-memory core (``nlx.memory``), the public sequence ops built on it (``nlx.ops``),
levels with their own update periods (``nlx.levels``) and optimizers whose state is a memory
(``nlx.optim``); the model zoo (``nlx.nn``, ``nlx.build_model``) and pretrained directories
(``nlx.from_pretrained``). README.md ("Layout") maps the modules, each page of docs/ covers one
part, and docs/EQUATIONS.md gives the equations the code implements.

Names are imported on first use, so ``import nlx`` (and ``nlx --help``) does not load JAX.
"""

import importlib

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "levels": ("nlx.levels", None), "memory": ("nlx.memory", None), "ops": ("nlx.ops", None),
    "optim": ("nlx.optim", None),
    "linear_attention": ("nlx.ops", "linear_attention"), "delta_rule": ("nlx.ops", "delta_rule"),
    "titans_memory": ("nlx.ops", "titans_memory"), "TitansState": ("nlx.ops", "TitansState"),
    "dgd_memory": ("nlx.ops", "dgd_memory"),
    "build_model": ("nlx.nn", "build_model"),
    "from_pretrained": ("nlx.pretrained", "from_pretrained"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'nlx' has no attribute {name!r}")
  module, attribute = _LAZY[name]
  value = importlib.import_module(module)
  value = value if attribute is None else getattr(value, attribute)
  globals()[name] = value
  return value


def __dir__():
  return __all__
