"""Multi-host start-up, the device mesh of ``config.mesh``, and logical-axis sharding.

The mesh (``make_mesh``) has the axes ``data``, ``fsdp``, ``tensor``; each is ``ici × dcn`` long:
``mesh.data`` etc. within a TPU slice, ``mesh.dcn_data`` etc. across the slices of a multislice
run. Devices are laid out by ``jax.experimental.mesh_utils`` (the physical torus on TPU).

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
from jax.experimental import mesh_utils
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


def slice_count(devices: Sequence[Any]) -> int:
  """The slices ``devices`` come from: distinct ``slice_index`` values (TPU), else 1."""
  return len({d.slice_index for d in devices if getattr(d, "slice_index", None) is not None}) or 1


def _slice_array(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """The devices of one slice as an array of ``shape``, in the library's ICI-aware order on TPU
  and GPU (``mesh_utils.create_device_mesh``; a TPU axis is split when no whole physical axes fit
  it); CPU devices, and TPU devices that are not a whole cuboid (a subset such as
  ``jax.devices()[:3]``), in their own order."""
  if getattr(devices[0], "platform", "cpu") in ("tpu", "gpu"):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except AssertionError:  # the TPU devices have holes: no physical layout to follow
      pass
  return np.asarray(devices, dtype=object).reshape(shape)


def device_array(mesh_config, devices: Sequence[Any]) -> np.ndarray:
  """The ``(data, fsdp, tensor)`` array of ``devices`` for ``mesh_config`` (see ``make_mesh``)."""
  devices = list(devices)
  if not devices:
    raise ValueError("make_mesh: no devices; allowed: a non-empty list of devices")
  n_slices = slice_count(devices)
  ici, dcn = mesh_config.resolve_ici_dcn(len(devices), n_slices)
  ici_shape = tuple(ici[a] for a in MESH_AXES)
  if n_slices == 1:
    return _slice_array(ici_shape, devices)
  slices = {}
  for d in devices:
    slices.setdefault(d.slice_index, []).append(d)
  counts = {k: len(v) for k, v in sorted(slices.items())}
  if len(set(counts.values())) > 1:
    raise ValueError(f"the slices hold different numbers of devices ({counts} by slice_index); "
                     "allowed: the same number in every slice")
  # Slice k's ici block sits at position k of the dcn grid (row-major, slices by slice_index):
  # mesh axis i is dcn_i blocks of ici_i devices.
  return mesh_utils.create_hybrid_device_mesh(ici_shape, tuple(dcn[a] for a in MESH_AXES),
                                              devices, allow_split_physical_axes=True)


def make_mesh(mesh_config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh of ``mesh_config`` over ``devices`` (default: every device).

  Each mesh axis is ``ici × dcn`` long (``MeshConfig.resolve_ici_dcn``). One slice: the devices
  laid out by ``jax.experimental.mesh_utils.create_device_mesh`` (ICI-aware on TPU). Several
  slices (devices carrying distinct ``slice_index``, a multislice TPU run): each slice laid out
  alike, the slices placed along the dcn sizes as ``mesh_utils.create_hybrid_device_mesh``
  does, so an axis with ``dcn_* > 1`` crosses the data-center network only between its blocks.

  Raises:
    ValueError: the sizes do not fit the devices or the slices, naming the fields
      (``mesh.dcn_data=2 but the run has 1 slice; ...``).
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_array(mesh_config, devices), MESH_AXES)


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
