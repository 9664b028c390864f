"""nlx.xla_flags: the XLA:CPU flags nlx's commands set, and when they stay out of the way."""

import os
import subprocess
import sys

from nlx import xla_flags

FLAG = xla_flags.CPU_FLAGS[0]


def test_adds_the_flags_to_xla_flags_on_a_tested_jaxlib():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply(env, jaxlib_version="0.10.2") == [FLAG]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert xla_flags.apply(env, jaxlib_version="0.10.2") == []  # once only
  empty = {}
  xla_flags.apply(empty, jaxlib_version="0.10.2")
  assert empty["XLA_FLAGS"] == FLAG


def test_the_users_value_an_opt_out_and_an_untested_jaxlib_win():
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert xla_flags.apply(mine, jaxlib_version="0.10.2") == []
  assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  off = {"NLX_XLA_CPU_FLAGS": "0"}
  assert xla_flags.apply(off, jaxlib_version="0.10.2") == [] and "XLA_FLAGS" not in off
  for version in ("0.11.0", None):  # XLA aborts on a flag it does not know: add none
    env = {}
    assert xla_flags.apply(env, jaxlib_version=version) == [] and "XLA_FLAGS" not in env


def test_the_installed_jaxlib_accepts_the_flags():
  """A fresh process with the flags set computes a reduction (an unknown flag aborts XLA)."""
  env = dict(os.environ, XLA_FLAGS=FLAG, JAX_PLATFORMS="cpu")
  code = "import jax.numpy as jnp; print(float((jnp.ones((64, 32)) * 2).sum(0)[0]))"
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "128.0"


def test_import_nlx_leaves_the_environment_alone():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = "import os, nlx, nlx.nn; print(os.environ.get('XLA_FLAGS', 'unset'))"
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "unset"
