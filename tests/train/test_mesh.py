"""The device mesh of ``config.mesh``: shapes and axis names over 8 devices, -1 filled from the
devices of a slice and from the slices, the multislice (ICI × DCN) layout on devices carrying a
``slice_index``, and the refusals that name the fields. Fake device objects stand in for TPU
slices; 8 real CPU devices (``--xla_force_host_platform_device_count=8``) run in a subprocess."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nlx import configs
from nlx.train import sharding
from nlx.train.config import MeshConfig
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AXES = ("data", "fsdp", "tensor")


class FakeDevice:
  """What the mesh layout reads of a device: id, platform, kind and (TPU) slice_index."""

  def __init__(self, id_, slice_index=None):
    self.id, self.platform, self.device_kind = id_, "cpu", "cpu"
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"FakeDevice({self.id}, slice {getattr(self, 'slice_index', None)})"


def _devices(n=8, slices=None, shuffle=False):
  devices = [FakeDevice(i, None if slices is None else i // (n // slices)) for i in range(n)]
  if shuffle:  # slices need not come in order: the layout groups them by slice_index
    random.Random(0).shuffle(devices)
  return devices


def _slices_of(mesh):
  return np.vectorize(lambda d: d.slice_index)(mesh.devices)


@pytest.mark.parametrize("sizes, shape", [
    ({}, (8, 1, 1)),
    ({"data": 2, "fsdp": -1}, (2, 4, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "tensor": -1}, (1, 1, 8)),
    ({"data": 1, "fsdp": 8}, (1, 8, 1)),
])
def test_one_slice_mesh_shapes_and_axis_names(sizes, shape):
  devices = _devices()
  mesh = sharding.make_mesh(MeshConfig(**sizes), devices)
  assert mesh.axis_names == AXES and mesh.devices.shape == shape
  # CPU devices keep their order (a plain reshape); TPU follows mesh_utils (tests/train/test_aot).
  assert [d.id for d in mesh.devices.flat] == list(range(8))


def test_resolve_fills_ici_from_the_devices_of_a_slice_and_dcn_from_the_slices():
  mesh = MeshConfig(data=2, fsdp=-1, dcn_data=-1)
  assert mesh.resolve_ici_dcn(16, 2) == ({"data": 2, "fsdp": 4, "tensor": 1},
                                         {"data": 2, "fsdp": 1, "tensor": 1})
  assert mesh.resolve(16, 2) == {"data": 4, "fsdp": 4, "tensor": 1}
  assert mesh.resolve(16, 4) == {"data": 8, "fsdp": 2, "tensor": 1}
  # Without a slice count, fixed dcn sizes give it (what validate(config, n_devices) relies on).
  assert MeshConfig(dcn_fsdp=2).resolve(8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert MeshConfig().resolve(8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_validate_splits_the_batch_over_ici_times_dcn():
  tiny = os.path.join(ROOT, "configs", "transformer.py") + ":tiny"
  run = configs.validate(configs.load(tiny, ["mesh.dcn_fsdp=2", "train.batch_size=8"]),
                         n_devices=8)
  assert run.mesh.resolve(8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"train.batch_size=12 must be a multiple of mesh data x "
                     r"fsdp = 8"):
    configs.validate(configs.load(tiny, ["mesh.dcn_fsdp=2", "train.batch_size=12"]),
                     n_devices=8)


def test_dcn_data_puts_each_slice_in_one_block_of_the_data_axis():
  mesh = sharding.make_mesh(MeshConfig(dcn_data=2), _devices(slices=2, shuffle=True))
  assert mesh.axis_names == AXES and mesh.devices.shape == (8, 1, 1)
  assert _slices_of(mesh)[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_dcn_fsdp_and_dcn_data_lay_slices_on_a_grid():
  # 4 slices of 2 devices: ici data=2; dcn 2 x 2 over (data, fsdp). Mesh axis data is 2 blocks
  # of 2, fsdp 2 blocks of 1; slice k sits at dcn position (k // 2, k % 2).
  mesh = sharding.make_mesh(MeshConfig(data=-1, dcn_data=2, dcn_fsdp=-1),
                            _devices(slices=4, shuffle=True))
  assert mesh.devices.shape == (4, 2, 1)
  slices = _slices_of(mesh)[:, :, 0]
  assert slices.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
  # Within a slice the ici axis keeps the slice's devices (ids 2k, 2k+1).
  assert sorted(d.id for d in mesh.devices[0:2, 1, 0]) == [2, 3]
  # dcn_fsdp alone: the fsdp axis crosses the slices, data stays within each.
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, dcn_fsdp=2), _devices(slices=2))
  assert mesh.devices.shape == (2, 4, 1)
  assert _slices_of(mesh)[0, :, 0].tolist() == [0, 0, 1, 1]


def test_slice_count_reads_slice_index():
  assert sharding.slice_count(_devices()) == 1
  assert sharding.slice_count(_devices(slices=1)) == 1
  assert sharding.slice_count(_devices(slices=4)) == 4


@pytest.mark.parametrize("sizes, devices, message", [
    ({"dcn_data": 2}, _devices(), r"mesh.dcn_data=2 but the run has 1 slice; allowed: dcn sizes "
     r"whose product is the slice count \(1\), or one of them -1"),
    ({}, _devices(slices=2), r"mesh.dcn_data=mesh.dcn_fsdp=mesh.dcn_tensor=1 but the run has 2 "
     r"slices"),
    ({"dcn_data": 2, "dcn_tensor": 2}, _devices(slices=2), r"mesh.dcn_data=2, mesh.dcn_tensor=2 "
     r"but the run has 2 slices"),
    ({"dcn_data": 3, "dcn_fsdp": -1}, _devices(slices=2), r"mesh \{'dcn_data': 3, 'dcn_fsdp': "
     r"-1, 'dcn_tensor': 1\}: the fixed axes \(3 slices\) do not divide the 2 slices"),
    ({"data": 3}, _devices(), r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\}: product 3 != 8 "
     r"devices; allowed"),
    ({"data": 8, "dcn_data": 2}, _devices(slices=2), r"product 8 != 4 devices per slice \(8 "
     r"devices / 2 slices\)"),
    ({"data": 3, "fsdp": -1, "dcn_data": -1}, _devices(slices=2), r"the fixed axes \(3 "
     r"devices\) do not divide the 4 devices per slice"),
    ({"dcn_data": 2}, [FakeDevice(i, int(i >= 3)) for i in range(8)], r"the slices hold "
     r"different numbers of devices \(\{0: 3, 1: 5\} by slice_index\)"),
    ({"dcn_data": 2}, [FakeDevice(i, i % 2) for i in range(7)], r"the run's 7 devices do not "
     r"split evenly over its 2 slices"),
    ({}, [], r"make_mesh: no devices"),
], ids=["dcn_without_slices", "slices_without_dcn", "dcn_product", "dcn_fill", "ici_product",
        "ici_per_slice", "ici_fill_per_slice", "uneven_slices", "indivisible_slices", "none"])
def test_meshes_that_do_not_fit_are_refused_by_name(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(MeshConfig(**sizes), devices)


SCRIPT = r"""
import json
import jax
from nlx.train import sharding
from nlx.train.config import MeshConfig
out = {"n": jax.device_count(), "slices": sharding.slice_count(jax.devices())}
for name, sizes in json.loads(__import__("sys").argv[1]).items():
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  out[name] = [list(mesh.axis_names), list(mesh.devices.shape),
               [d.id for d in mesh.devices.flat]]
try:
  sharding.make_mesh(MeshConfig(dcn_data=2))
except ValueError as e:
  out["refused"] = str(e)
print("MESHES", json.dumps(out))
"""


def test_meshes_over_eight_cpu_devices():
  cases = {"default": {}, "fsdp": {"data": 2, "fsdp": -1}, "all": {"data": 2, "fsdp": 2,
                                                                   "tensor": 2}}
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  line = [l for l in result.stdout.splitlines() if l.startswith("MESHES ")]
  assert line, result.stderr[-3000:]
  out = json.loads(line[0][len("MESHES "):])
  assert (out["n"], out["slices"]) == (8, 1)
  assert out["default"][:2] == [list(AXES), [8, 1, 1]]
  assert out["fsdp"][:2] == [list(AXES), [2, 4, 1]]
  assert out["all"][:2] == [list(AXES), [2, 2, 2]]
  assert all(sorted(out[name][2]) == list(range(8)) for name in cases)
  assert out["refused"].startswith("mesh.dcn_data=2 but the run has 1 slice; allowed:")
