"""Training: run-config sections and validation (``config``), paths of a run (``paths``), mesh and
sharding (``sharding``), train state and step (``step``), optimizer (``optimizer``), orbax
checkpoints (``checkpoint``), metrics (``metrics``), the loop (``loop``), TPU ahead-of-time compiles
(``aot``) and a trained model loaded from a workdir (``trained``); ``fitting`` holds ``fit``, the
small loop of the studies, examples and benchmarks, on the same step (``step.apply_gradients``).

Submodules are imported where used: ``nlx.train.config`` needs no JAX (it runs before
``jax.distributed.initialize``).
"""

import importlib

# name -> module: exported on first use (this package imports no JAX until then).
_LAZY = {"fit": "nlx.train.fitting", "FitResult": "nlx.train.fitting",
         "next_token_loss": "nlx.train.fitting", "apply_gradients": "nlx.train.step"}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'nlx.train' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value
