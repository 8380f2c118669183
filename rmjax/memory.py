"""Per-device memory of one training step, predicted from the config alone (no device, no compile).

# B: pairs per device and micro-batch, L: sequence length, T: tokens per device (2·B·L),
# D: model dim, N / K: query / kv heads on this device, H: head dim, F: mlp dim on this device

* params, optimiser state, gradients: every array of the train state is created abstractly
  (``nnx.eval_shape`` on an ``AbstractMesh`` of the requested shape), and each dimension is
  divided by the mesh axes its logical axis maps to (``config.mesh.rules``): exact.
* batch: the int32 token / mask / response arrays and the margins of this device's rows: exact.
* activations: what the backward pass keeps per block on a fusing compiler (XLA on GPU/TPU: the
  block input and the matmul outputs; ``_block_bytes``) under the remat policy, plus one block's
  backward pass and the final hidden states: an estimate (docs/scale.md: against XLA:GPU on an H200;
  XLA:CPU ignores remat).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from rmjax import sharding, train_state
from rmjax.models.llama import DTYPES

MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device."""
  params: int
  optimizer: int
  gradients: int
  batch: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.batch + self.activations

  def table(self) -> str:
    rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
    rows.append(("total", self.total))
    return "\n".join(f"{name:<12}{b / MiB:>12.2f} MiB" for name, b in rows)


def abstract_mesh(shape, dcn_shape=None) -> AbstractMesh:
  """The global (data, fsdp, tensor) mesh of ``shape`` x ``dcn_shape``, without devices."""
  if -1 in shape:
    raise ValueError(f"mesh shape {tuple(shape)}: give every axis size (no -1) to plan memory")
  dcn = (1,) * len(shape) if dcn_shape is None else dcn_shape
  sizes = tuple(int(a) * int(b) for a, b in zip(shape, dcn))
  return AbstractMesh(sizes, sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _shard_bytes(shape, dtype, axes, rules, mesh_sizes) -> int:
  table = dict((k, v) for k, v in rules)
  n = 1
  for dim, name in zip(shape, axes or (None,) * len(shape)):
    mesh_axes = table.get(name) if name is not None else None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    n *= math.ceil(dim / math.prod(mesh_sizes[a] for a in mesh_axes))
  return n * np.dtype(dtype).itemsize


def _state_bytes(state, rules, mesh_sizes) -> int:
  return sum(_shard_bytes(v.shape, v.dtype, v.get_metadata().get("out_sharding"), rules,
                          mesh_sizes)
             for _, v in nnx.to_flat_state(state))


def _block_bytes(cfg, t: int, l: int, n: int, k: int, f: int, remat: str) -> tuple[int, int]:
  """(bytes one block keeps for the backward pass, bytes more alive while it runs backward:
  its recomputed part under remat, and transients).

  A fusing compiler (XLA on GPU/TPU) keeps the block input and the matmul outputs and recomputes
  elementwise results (norms, RoPE, SiLU) inside the fusions that read them, so 'none' and
  'dots_saveable' keep the same here; XLA:GPU may keep less under 'dots_saveable'. While one
  block runs backward, XLA's attention also holds the fp32 gradient of its L x L logits."""
  c, h, d = np.dtype(DTYPES[cfg.dtype]).itemsize, cfg.hd, cfg.dim
  block_input = t * d * c
  # matmul outputs: q, k, v, attention logits (fp32; cuDNN's flash attention keeps only the
  # softmax statistics, one fp32 per query and head), attention output, o, gate, up, down
  logits = t * n * 4 if cfg.attention == "cudnn" else t * n * l * 4
  dots = t * c * ((n + 2 * k) * h + n * h + 2 * d + 2 * f) + logits
  kept = block_input + dots if remat in ("none", "dots_saveable") else block_input
  grad_logits = 0 if cfg.attention == "cudnn" else logits
  return kept, block_input + dots - kept + grad_logits


def plan(config, mesh_shape, dcn_shape=None) -> MemoryPlan:
  """Per-device bytes of ``rmjax.train``'s step for ``config`` on a mesh of ``mesh_shape``."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mesh = abstract_mesh(mesh_shape, dcn_shape)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, state = nnx.eval_shape(lambda: train_state.create_state(config, pretrained=False))
    model = nnx.merge(graphdef, state)["model"]
    params = _state_bytes(nnx.state(model, nnx.Param), rules, sizes)
    gradients = _state_bytes(nnx.state(model, train_state.trainable_filter(config)), rules, sizes)
    optimizer = _state_bytes(state["optimizer"], rules, sizes)

  cfg = train_state.model_config(config)
  table = dict((k, v) for k, v in rules)
  shards = lambda name: math.prod(sizes[a] for a in np.atleast_1d(table.get(name) or ()))
  pairs = math.ceil(config.train.batch_size / shards("batch"))
  micro = math.ceil(pairs / config.train.accum_steps)
  l = config.data.max_len
  batch = pairs * (3 * 2 * l * 4 + 4)
  t = 2 * micro * l
  kept, recompute = _block_bytes(
      cfg, t, l, math.ceil(cfg.num_heads / shards("heads")),
      math.ceil(cfg.num_kv_heads / shards("kv_heads")),
      math.ceil(cfg.mlp_dim / shards("mlp")), cfg.remat)
  final_hidden = 2 * t * cfg.dim * 4  # fp32 final-norm input and output, read by the losses
  activations = cfg.num_layers * kept + recompute + final_hidden
  return MemoryPlan(params=params, optimizer=optimizer, gradients=gradients, batch=batch,
                    activations=activations)


def versus_xla(plan: MemoryPlan, stats) -> dict[str, tuple[int, int]]:
  """(planned, XLA) bytes per device for ``compiled``'s memory analysis: arguments = parameters
  + optimiser state + batch (exact); temp = gradients + activations (XLA's temp also holds its
  scratch)."""
  return {"arguments": (plan.params + plan.optimizer + plan.batch, stats.argument_size_in_bytes),
          "temp": (plan.gradients + plan.activations, stats.temp_size_in_bytes)}


def compiled(config, mesh: jax.sharding.Mesh):
  """XLA's ``memory_analysis()`` of ``rmjax.train``'s step for ``config`` on ``mesh`` (real
  devices), compiled as the trainer compiles it (sharded, state donated); nothing is allocated.
  Per device: arguments = state + batch, outputs = state (+ metrics), temp = everything else."""
  return compile_step(config, mesh).memory_analysis()


def abstract_batch(config, mesh: jax.sharding.Mesh) -> dict:
  """The trainer's global batch (``train.batch_size`` pairs x ``data.max_len``) as sharded
  ``ShapeDtypeStruct``s."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  b, l = config.train.batch_size, config.data.max_len
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules))
  batch = {k: spec((b, 2, l), np.int32) for k in ("tokens", "mask", "response")}
  batch["margin"] = spec((b,), np.float32)
  return batch


def compile_step(config, mesh: jax.sharding.Mesh):
  """``rmjax.train.jit_train_step`` for ``config``, lowered on abstract state and batch and
  compiled for ``mesh``; its devices need not exist here (TPU topologies: ``rmjax.aot``)."""
  from rmjax import train  # train imports the data pipeline: only when compiling
  rules = tuple(tuple(r) for r in config.mesh.rules)
  with sharding.use_mesh(mesh, rules):
    graphdef, abstract = train_state.abstract_state(config, mesh)
  # built outside the mesh: the step's PRNG key is made eagerly, on this host's device
  step = train.jit_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract))
  with sharding.use_mesh(mesh, rules):
    return step.lower(abstract, abstract_batch(config, mesh)).compile()
