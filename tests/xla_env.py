"""XLA_FLAGS for the subprocesses that tests start (see the suite's flags in tests/conftest.py)."""

import os


def xla_flags(devices: int = 0) -> str:
  """The suite's XLA flags, plus ``devices`` fake CPU devices when it is not 0."""
  flags = os.environ.get("NLX_TEST_XLA_FLAGS", "")
  return f"{flags} --xla_force_host_platform_device_count={devices}" if devices else flags
