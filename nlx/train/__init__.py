"""Training: run-config sections and validation (``config``), paths of a run (``paths``), mesh and
sharding (``sharding``), train state and step (``step``), optimizer (``optimizer``), orbax
checkpoints (``checkpoint``), metrics (``metrics``), the loop (``loop``), TPU ahead-of-time compiles
(``aot``) and a trained model loaded from a workdir (``trained``).

Submodules are imported where used: ``nlx.train.config`` needs no JAX (it runs before
``jax.distributed.initialize``).
"""
