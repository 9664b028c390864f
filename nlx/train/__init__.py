"""Training: run-config sections and validation (``config``), mesh and sharding (``sharding``),
train state and step (``state``, ``step``), optimizer (``optimizer``), orbax checkpoints
(``checkpoint``), metrics (``metrics``), the loop (``loop``) and TPU ahead-of-time compiles (``aot``).

Submodules are imported where used: ``nlx.train.config`` needs no JAX (it runs before
``jax.distributed.initialize``).
"""
