"""Multi-host start-up, the device mesh of ``config.mesh``, and logical-axis sharding.

Every parameter of nlx.nn names its logical axes (``("vocab", "embed")``); ``config.axis_rules``
maps each name to a mesh axis (``data``, ``fsdp``, ``tensor``), a tuple of them, or None. A
dimension whose size the mesh axes do not divide, or whose mesh axis an earlier dimension of the
same array already uses, is replicated instead.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nlx.train.config import MESH_AXES


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` when launched as several processes.

  Several processes means: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` are set (any cluster, or localhost on CPU), or a Cloud TPU pod slice with
  more than one host (``TPU_WORKER_HOSTNAMES`` lists several), where JAX finds the rest itself.

  Returns:
    Whether it initialized.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
      if not os.environ.get(name):
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not; set both "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or none of the three)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    return True
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
    return True
  return False


def make_mesh(mesh_config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every device of the run)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_config.resolve(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], rules: dict,
                    mesh: Mesh) -> P:
  """The PartitionSpec of an array of ``shape`` whose dimensions have logical names ``axes``."""
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    targets = tuple(t for t in (target if isinstance(target, tuple) else (target,))
                    if t is not None and t not in used and mesh.shape[t] > 1)
    if not targets or dim % math.prod(mesh.shape[t] for t in targets):
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def param_shardings(abstract_params: nnx.State, rules: dict, mesh: Mesh) -> nnx.State:
  """The parameters' structure holding a ``NamedSharding`` per parameter (from its logical axes)."""

  def sharding(variable: nnx.Variable) -> nnx.Variable:
    axes = variable.get_metadata().get("out_sharding") or (None,) * variable.value.ndim
    return variable.replace(
        NamedSharding(mesh, logical_to_spec(axes, variable.value.shape, rules, mesh)))

  return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
  """Tokens ``[B, T]``: B over the ``batch`` rule's mesh axes."""
  target = rules["batch"]
  targets = tuple(t for t in (target if isinstance(target, tuple) else (target,)) if t)
  return NamedSharding(mesh, P(targets or None, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global ``[B, ...]`` array of every host's ``[B / P, ...]`` rows (in process order)."""
  global_shape = (host_rows.shape[0] * jax.process_count(),) + host_rows.shape[1:]
  return jax.make_array_from_process_local_data(sharding, host_rows, global_shape)
