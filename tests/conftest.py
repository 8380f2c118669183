import os

# Eight fake CPU devices for the multi-device tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from rmjax import sharding  # noqa: E402


@pytest.fixture
def mesh1():
  """A (1, 1, 1) mesh on one device, made current with the default logical rules."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    yield mesh
