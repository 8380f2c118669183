"""Device mesh and the logical-axis -> mesh-axis rules, in one place.

Parameters and activations are annotated with *logical* axis names (``embed``, ``mlp``, ...);
the rules table below decides which mesh axes (``data``, ``fsdp``, ``tensor``) shard them, so a
change of parallelism is a config change, never a model change.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Makes ``mesh`` current and the logical rules active (model creation, jit tracing)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(tuple(r) for r in rules)):
    yield


def logical_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array whose dimensions carry the logical ``names``."""
  table = dict((k, v) for k, v in rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) dimension of an ``ndim``-array over the data-parallel axes."""
  return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1), rules))


def host_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Assembles each process's slice of the batch into global arrays sharded on ``batch``."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
          for k, v in batch.items()}
