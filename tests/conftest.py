import atexit
import os
import shutil
import tempfile

# Eight fake CPU devices for the multi-device tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session, shared with the subprocesses tests start: many tests
# compile the same tiny train step, and on 2 cores compiling dominates the suite's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rmjax_test_jit_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Implicit rank promotion ((B,) + (B, 1) -> (B, B)) is an error in the tests and in the
# subprocesses they start (they inherit the environment): broadcasting must be written out.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402
import pytest  # noqa: E402

from rmjax import sharding  # noqa: E402


@pytest.fixture
def mesh1():
  """A (1, 1, 1) mesh on one device, made current with the default logical rules."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    yield mesh
