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

# One persistent XLA compilation cache per test session, shared by the xdist workers and the
# subprocesses they start (`nlx train` runs, child processes): many tests compile the same tiny
# train steps, and a cached executable skips XLA's compile (JAX still traces). The controller
# (or the only process) makes the directory before the workers start, so they inherit it, and
# removes it at the end. A test whose point is a fresh compile (tests/ops/test_remainder_chunk.py)
# drops it from its subprocesses' environment.
COMPILE_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_COMPILE_CACHE = COMPILE_CACHE_ENV not in os.environ  # else the user's or the controller's
if _OWN_COMPILE_CACHE:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ[COMPILE_CACHE_ENV] = tempfile.mkdtemp(prefix="nlx_test_compile_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


# XLA compiles the suite's many small programs at optimisation level 0: on the 2-core CPU the
# suite's time is mostly compilation, and level 0 halves it (tests/ops/test_ops_equivalence.py's
# Titans and DGD MLP cases: 98 s -> 47 s) while the programs, and so what the tests check, are the
# same (float64 cases still agree to 1e-10). `NLX_TEST_XLA_FLAGS=` (empty) runs the suite with
# XLA's default optimisation. Subprocesses that set their own XLA_FLAGS (8 fake devices) add
# these to theirs.
TEST_XLA_FLAGS_ENV = "NLX_TEST_XLA_FLAGS"
os.environ.setdefault(TEST_XLA_FLAGS_ENV, "--xla_backend_optimization_level=0")
if os.environ[TEST_XLA_FLAGS_ENV] not in os.environ.get("XLA_FLAGS", ""):  # workers inherit it
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), os.environ[TEST_XLA_FLAGS_ENV]) if f)


def pytest_sessionfinish(session):
  if _OWN_COMPILE_CACHE:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.environ[COMPILE_CACHE_ENV], ignore_errors=True)
