"""Multi-process start-up, the device mesh and the logical-axis -> mesh-axis rules, in one place.

Parameters and activations are annotated with *logical* axis names (``embed``, ``mlp``, ...);
the rules table below decides which mesh axes (``data``, ``fsdp``, ``tensor``) shard them, so a
change of parallelism is a config change, never a model change. ``init_distributed`` joins the
processes of a TPU pod, a SLURM job or an explicit launch before anything touches a device.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
INIT_MODES = ("auto", "none", "explicit", "slurm", "tpu")

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


# --- processes ---

def init_distributed(mode: str = "auto", coordinator: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> None:
  """Joins this process to the others of a multi-process run; must precede any device use.

  ``mode``: ``none`` (one process, nothing to do); ``explicit`` (``coordinator`` ``host:port``,
  ``num_processes`` and ``process_id`` given); ``slurm`` (counts and rank from the SLURM step;
  coordinator from ``coordinator``, ``$JAX_COORDINATOR_ADDRESS`` or the step's first node);
  ``tpu`` (Cloud TPU VM pod: JAX reads everything from the TPU metadata); ``auto`` picks
  ``explicit`` if any of the three values is given, else ``slurm`` in a SLURM step of several
  tasks, else ``tpu`` on a TPU VM, else ``none``. CPU collectives between processes use gloo.
  """
  if mode not in INIT_MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {INIT_MODES}")
  if mode == "auto":
    mode = _detect_mode(coordinator, num_processes, process_id)
  elif mode in ("none", "tpu") and (coordinator, num_processes, process_id) != (None,) * 3:
    raise ValueError(f"distributed mode {mode!r} takes no --coordinator, --num_processes or "
                     "--process_id; use 'explicit' (or 'auto') to pass them")
  if mode == "none":
    return
  if mode == "explicit" and None in (coordinator, num_processes, process_id):
    raise ValueError("explicit multi-process start needs --coordinator=host:port, "
                     f"--num_processes and --process_id (got {coordinator!r}, "
                     f"{num_processes!r}, {process_id!r})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == "explicit":
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif mode == "slurm":
    jax.distributed.initialize(**slurm_args(os.environ, coordinator),
                               cluster_detection_method="deactivate")
  else:  # tpu
    jax.distributed.initialize()
  log.info("process %d of %d: %d local of %d devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())


def _detect_mode(coordinator, num_processes, process_id) -> str:
  if (coordinator, num_processes, process_id) != (None, None, None):
    return "explicit"
  if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # what JAX checks for TPU VMs
    return "tpu"
  return "none"


def slurm_args(env, coordinator: str | None = None) -> dict:
  """``jax.distributed.initialize`` arguments for one task of a SLURM step (``srun``).

  One task per node sees all the node's GPUs; several tasks per node each take GPU
  ``SLURM_LOCALID``, unless SLURM already restricted ``CUDA_VISIBLE_DEVICES`` per task.
  """
  missing = [k for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_NODES")
             if k not in env]
  if missing:
    raise ValueError(f"SLURM start: {missing} not set; run the command under srun")
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
  if coordinator is None:
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    coordinator = f"{first_host(nodes)}:{int(env['SLURM_JOB_ID']) % 4096 + 61440}"
  ntasks, nnodes = int(env["SLURM_NTASKS"]), int(env["SLURM_STEP_NUM_NODES"])
  gpu_bound = "," not in env.get("CUDA_VISIBLE_DEVICES", ",")  # SLURM gave this task one GPU
  local = None if ntasks == nnodes or gpu_bound else [int(env["SLURM_LOCALID"])]
  return {"coordinator_address": coordinator, "num_processes": ntasks,
          "process_id": int(env["SLURM_PROCID"]), "local_device_ids": local}


def first_host(nodelist: str) -> str:
  """First host of a SLURM node list: ``gpu[003-010,012],cpu1`` -> ``gpu003``."""
  m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)
  if m is None:
    raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
  return m.group(1) + (m.group(2) or "")


# --- mesh ---

def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices.

  With ``dcn_shape`` (multi-slice), ``shape`` is the mesh within one slice (fast interconnect,
  ICI) and ``dcn_shape`` how many slices each axis spans over the data-centre network; the
  global mesh is their element-wise product. When the devices are not spread over several TPU
  slices (GPU clusters, CPU), each process counts as a slice: run one process per node. Without
  ``dcn_shape``, devices of several slices (e.g. GPU nodes that JAX reports as slices) fill
  ``shape`` slice by slice, so that the leading axes span the slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = (1,) * len(MESH_AXES) if dcn_shape is None else tuple(dcn_shape)
  if len(dcn) != len(MESH_AXES) or min(dcn) < 1:
    raise ValueError(f"mesh dcn_shape {dcn} must have {len(MESH_AXES)} positive entries")
  if len(devices) % int(np.prod(dcn)):
    raise ValueError(f"mesh dcn_shape {dcn}: {len(devices)} devices do not split into "
                     f"{int(np.prod(dcn))} slices")
  shape = _fill_shape(shape, len(devices) // int(np.prod(dcn)))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  one_slice = len({_slice_of(d) for d in devices}) == 1
  if dcn_shape is None and one_slice:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if dcn_shape is None:  # jax.make_mesh refuses several slices
    ordered = sorted(devices, key=lambda d: (_slice_of(d), d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(ordered).reshape(shape), MESH_AXES, axis_types=axis_types)
  grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices, process_is_granule=one_slice)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def _slice_of(device: jax.Device) -> int:
  return getattr(device, "slice_index", 0)


def _fill_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {num_devices}")
  return tuple(shape)


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


def batch_shards(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> int:
  """How many pieces ``batch_sharding`` cuts the batch into (the data-parallel axes' sizes)."""
  return mesh.size // batch_sharding(mesh, 1, rules).shard_shape((mesh.size,))[0]


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Whole on every device: what every process can read back (``jax.device_get``)."""
  return NamedSharding(mesh, P())


def host_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Assembles each process's slice of the batch into global arrays sharded on ``batch``."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
          for k, v in batch.items()}
