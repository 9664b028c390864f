"""Test-session setup shared by every test module."""

import os

# libtpu (the `tpu` extra, for the TPU ahead-of-time lowering tests) takes a machine-wide lock
# when loaded; parallel test workers (pytest-xdist) must be allowed to load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Tests run on the CPU backend: with libtpu installed, JAX would otherwise probe for a TPU in
# every worker (and print libtpu's warnings). The TPU lowering tests name their topology
# explicitly, which works under this setting.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The token cache (nlx.data.token_cache) of a test session: a temporary directory, never the
# user's ~/.cache/nlx. Each xdist worker gets its own.
if "NLX_CACHE" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["NLX_CACHE"] = tempfile.mkdtemp(prefix="nlx_test_cache_")
  atexit.register(shutil.rmtree, os.environ["NLX_CACHE"], True)
