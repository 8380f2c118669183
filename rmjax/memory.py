"""Per-device memory of one training step, predicted from the config alone (no device, no compile).

# B: pairs per device and micro-batch, L: sequence length, T: tokens per device (2·B·L),
# D: model dim, N / K: query / kv heads on this device, H: head dim, F: mlp dim on this device

* params, optimiser state, gradients: every array of the train state is created abstractly
  (``nnx.eval_shape`` on an ``AbstractMesh`` of the requested shape), and each dimension is
  divided by the mesh axes its logical axis maps to (``config.mesh.rules``): exact.
* batch: the int32 token / mask / response arrays and the margins of this device's rows: exact.
* activations: what the backward pass keeps per block on a fusing compiler (XLA on GPU/TPU: the
  block input and the matmul outputs; ``_block_bytes``) under the remat policy, plus one block's
  backward pass and the final hidden states: an estimate (docs/scale.md: against XLA:GPU on an H200
  and XLA:TPU). It depends on the backend: XLA:CPU ignores remat, and XLA:TPU without remat also
  keeps elementwise results that XLA:GPU recomputes (``backend``).
* weights in flight: the running block's weights gathered whole over fsdp (or cast) in the compute
  dtype and their unsharded gradient; with ``scan_layers`` the stacked weight shards (compute
  dtype) and the stacked gradients (the loop state of the optimised HLO, docs/scale.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

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
  weights_in_flight: int = 0  # a block's gathered / cast weights and their unsharded gradient

  @property
  def total(self) -> int:
    return (self.params + self.optimizer + self.gradients + self.batch + self.activations
            + self.weights_in_flight)

  def table(self) -> str:
    rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
    rows.append(("total", self.total))
    return "\n".join(f"{name:<18}{b / MiB:>12.2f} MiB" for name, b in rows)


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


def _block_bytes(cfg, t: int, l: int, n: int, k: int, f: int, remat: str,
                 backend: str = "gpu") -> tuple[int, int]:
  """(bytes one block keeps for the backward pass, bytes more alive while it runs backward:
  its recomputed part under remat, and transients).

  A fusing compiler (XLA on GPU/TPU) keeps the block input and the matmul outputs and recomputes
  elementwise results (norms, RoPE, SiLU) inside the fusions that read them, so 'none' and
  'dots_saveable' keep the same here; XLA:GPU may keep less under 'dots_saveable'. XLA:TPU
  without remat keeps elementwise results too (the loop state of its optimised HLO,
  docs/scale.md): the softmax probabilities in the compute dtype, four more MLP-wide arrays
  (SiLU and product results) and six fp32 D-wide arrays (the norms'). While one block runs
  backward, XLA's attention also holds the fp32 gradient of its L x L logits."""
  c, h, d = np.dtype(DTYPES[cfg.dtype]).itemsize, cfg.hd, cfg.dim
  block_input = t * d * c
  # matmul outputs: q, k, v, attention logits (fp32; flash attention, cuDNN's or splash, keeps
  # only the softmax statistics, one fp32 per query and head), attention output, o, gate, up, down
  logits = t * n * 4 if cfg.attention in ("cudnn", "splash") else t * n * l * 4
  dots = t * c * ((n + 2 * k) * h + n * h + 2 * d + 2 * f) + logits
  kept = block_input + dots if remat in ("none", "dots_saveable") else block_input
  grad_logits = 0 if cfg.attention in ("cudnn", "splash") else logits
  recompute = block_input + dots - kept + grad_logits
  if backend == "tpu" and remat == "none":  # probabilities, SiLU/product, fp32 norm arrays
    kept += logits * c // 4 + 4 * t * f * c + 6 * t * d * 4
  return kept, recompute


_STATE_BYTES: dict = {}  # plan's cache: (model, optimiser, trainable, rules, mesh) -> bytes


BACKENDS = ("gpu", "tpu", "cpu")  # jax's Device.platform names


def plan(config, mesh_shape, dcn_shape=None, *, backend: str = "gpu") -> MemoryPlan:
  """Per-device bytes of ``rmjax.train``'s step for ``config`` on a mesh of ``mesh_shape``,
  compiled by XLA for ``backend`` (``BACKENDS``): 'cpu' ignores remat (activations as without
  it), 'tpu' without remat keeps elementwise results that 'gpu' recomputes (``_block_bytes``)."""
  if backend not in BACKENDS:
    raise ValueError(f"memory plan: backend {backend!r}, expected one of {BACKENDS}")
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mesh = abstract_mesh(mesh_shape, dcn_shape)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  # the state's bytes depend on neither the batch nor remat: computed once per model and mesh
  model_fields = {k: v for k, v in config.model.to_dict().items() if k != "remat"}
  key = (json.dumps(model_fields, sort_keys=True, default=str), json.dumps(config.optim.to_dict(),
         sort_keys=True, default=str), config.train.get("trainable_top_layers", -1), rules,
         tuple(sorted(sizes.items())))
  if key not in _STATE_BYTES:
    with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(rules):
      graphdef, state = nnx.eval_shape(lambda: train_state.create_state(config, pretrained=False))
      model = nnx.merge(graphdef, state)["model"]
      _STATE_BYTES[key] = (
          _state_bytes(nnx.state(model, nnx.Param), rules, sizes),
          _state_bytes(nnx.state(model, train_state.trainable_filter(config)), rules, sizes),
          _state_bytes(state["optimizer"], rules, sizes))
  params, gradients, optimizer = _STATE_BYTES[key]

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
      math.ceil(cfg.mlp_dim / shards("mlp")), "none" if backend == "cpu" else cfg.remat, backend)
  final_hidden = 2 * t * cfg.dim * 4  # fp32 final-norm input and output, read by the losses
  top = config.train.get("trainable_top_layers", -1)  # frozen blocks keep nothing for backward
  kept_layers = cfg.num_layers if top < 0 else min(top, cfg.num_layers)
  activations = kept_layers * kept + recompute + final_hidden
  # the block running holds its weights whole over fsdp (gathered) in the compute dtype, and
  # their gradient before it is reduce-scattered; a layer scan also stacks the weight shards in
  # the compute dtype and the blocks' gradients (a second copy, unstacked after the scan)
  c = np.dtype(DTYPES[cfg.dtype]).itemsize
  block = (cfg.dim * cfg.hd * (2 * math.ceil(cfg.num_heads / shards("heads"))
                               + 2 * math.ceil(cfg.num_kv_heads / shards("kv_heads")))
           + 3 * cfg.dim * math.ceil(cfg.mlp_dim / shards("mlp")))
  gathered = shards("embed") > 1 or cfg.dtype != cfg.param_dtype
  stacked = params * c // np.dtype(DTYPES[cfg.param_dtype]).itemsize + gradients
  in_flight = 2 * block * c * gathered + stacked * cfg.scan_layers
  return MemoryPlan(params=params, optimizer=optimizer, gradients=gradients, batch=batch,
                    activations=activations, weights_in_flight=in_flight)


def with_fields(config, **fields):
  """A resolved copy of ``config`` with ``block__name=value`` fields set."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for path, value in fields.items():
      block, name = path.split("__")
      c[block][name] = value
  return c


def levers(config, mesh_shape) -> list[tuple[str, object, tuple]]:
  """(flag, config, mesh shape) one memory lever away from ``config`` on ``mesh_shape``
  (data, fsdp, tensor): more remat, FSDP instead of data parallel, tensor parallel, more
  accumulation, half the batch."""
  data, fsdp, tensor = mesh_shape
  spell = lambda shape: str(tuple(shape)).replace(" ", "")
  out = []
  if config.model.remat != "full":
    out.append(("--config.model.remat=full", with_fields(config, model__remat="full"), mesh_shape))
  if data > 1:
    shape = (1, data * fsdp, tensor)
    out.append((f"--config.mesh.shape='{spell(shape)}' (FSDP)",
                with_fields(config, mesh__shape=shape), shape))
  if fsdp % 2 == 0 and config.model.num_kv_heads % (2 * tensor) == 0:
    shape = (data, fsdp // 2, 2 * tensor)
    out.append((f"--config.mesh.shape='{spell(shape)}' (tensor)",
                with_fields(config, mesh__shape=shape), shape))
  batch, accum = config.train.batch_size, config.train.accum_steps
  if batch % (2 * accum) == 0:
    out.append((f"--config.train.accum_steps={2 * accum}",
                with_fields(config, train__accum_steps=2 * accum), mesh_shape))
  if batch % 2 == 0 and (batch // 2) % accum == 0:
    out.append((f"--config.train.batch_size={batch // 2}",
                with_fields(config, train__batch_size=batch // 2), mesh_shape))
  return out


def bucket_lengths(config) -> list[int]:
  """The sequence lengths of the training batches (``data.buckets`` up to ``data.max_len``)."""
  from rmjax.data.pipeline import BucketTrim
  return BucketTrim(config.data.get("buckets", ()), config.data.max_len, "right").buckets


def device_bytes(device) -> tuple[int, str]:
  """(bytes one device may use, where the figure comes from): the runtime's limit on GPU/TPU;
  on CPU the host's memory (its cgroup limit when lower) shared by this process's devices."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit:
    return int(limit), f"{device.device_kind} bytes_limit"
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      host = min(host, int(f.read()))
  except (OSError, ValueError):  # no cgroup v2 limit ('max')
    pass
  n = jax.local_device_count()
  return host // n, f"host memory / {n} {device.platform} device(s)"


class DoesNotFit(ValueError):
  """The step's planned memory exceeds the devices' (``check_fits``)."""


# the most XLA has needed over the plan (XLA:CPU: 2.1-2.5x, docs/scale.md): a step whose plan
# times this fits the budget is not compiled to check
PLAN_MARGIN = 4.0


def check_fits(config, mesh_shape, budget: int, where: str = "", *, backend: str = "gpu",
               measure=None) -> dict[int, int]:
  """Plans the step at every batch length the pipeline produces (``bucket_lengths``) and returns
  {length: bytes per device}; raises ``DoesNotFit`` with the figures, and the levers (``levers``,
  or a chain of them) that fit, when the longest does not fit ``budget``. ``measure(config)``:
  the compiled step's bytes at the longest length (``used_bytes``), which then replaces the plan
  there and scales every other figure by its ratio to the plan (the plan calibrated by XLA);
  skipped when the plan fits ``PLAN_MARGIN`` times over. ``backend``: the devices' platform
  (``plan``)."""
  gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / MiB:.2f} MiB"
  total = lambda c, shape, length: plan(with_fields(c, data__max_len=length), shape,
                                        backend=backend)
  mesh_shape = tuple(int(s) for s in mesh_shape)
  planned = {n: total(config, mesh_shape, n).total for n in bucket_lengths(config)}
  longest = max(planned)
  worst = total(config, mesh_shape, longest)
  if measure is not None and worst.total * PLAN_MARGIN <= budget:
    measure = None  # fits whatever XLA adds to the plan: no compile needed
  scale = 1.0 if measure is None else measure(with_fields(config, data__max_len=longest)) / worst.total
  need = {n: round(b * scale) for n, b in planned.items()}
  if need[longest] <= budget:
    return need
  fits = [n for n, b in need.items() if b <= budget]
  cost = lambda c, shape: total(c, shape, longest).total * scale
  good = [f"  {flag}: {gib(cost(c, shape))}" for flag, c, shape in levers(config, mesh_shape)
          if cost(c, shape) <= budget]
  if not good:  # no single lever is enough: apply the best one until it fits (4 at most)
    chain, c, shape = {}, config, mesh_shape
    for _ in range(4):  # ties (within 1%) go to the earlier lever: accumulation before batch
      options = [(cost(c2, s2), i, flag, c2, s2) for i, (flag, c2, s2) in enumerate(levers(c, shape))]
      if not options:
        break
      least = min(o[0] for o in options)
      b, _, flag, c, shape = min((o for o in options if o[0] <= 1.01 * least), key=lambda o: o[1])
      chain[flag.split("=")[0]] = flag  # a field set twice: the last value
      if b <= budget:
        good = [f"  {' '.join(chain.values())}: {gib(b)}"]
        break
  parts = ", ".join(f"{f.name} {gib(getattr(worst, f.name))}" for f in dataclasses.fields(worst))
  measured = "" if measure is None else (
      f"XLA's compiled step needs {gib(need[longest])} per device ({scale:.2f} x the plan's "
      f"{gib(worst.total)}: {parts}")
  planned_only = f"rmjax.memory.plan needs {gib(worst.total)} per device ({parts}"
  raise DoesNotFit(
      f"{where}the train step does not fit: at {longest} tokens (batch {config.train.batch_size} "
      f"pairs, mesh {mesh_shape}) {measured or planned_only}"
      f"{'; remat not honoured on CPU' if backend == 'cpu' else ''}), {gib(budget)} "
      f"available. Lengths that fit: {fits or 'none'} of {sorted(planned)}.\n"
      + ("Levers that fit (per device):\n" + "\n".join(good) if good else
         "No lever (remat, FSDP, tensor, accumulation, batch) makes it fit; use more devices.")
      + "\n(The plan is an estimate: docs/scale.md. Skip this check with --memory_check=none.)")


def versus_xla(plan: MemoryPlan, stats) -> dict[str, tuple[int, int]]:
  """(planned, XLA) bytes per device for ``compiled``'s memory analysis: arguments = parameters
  + optimiser state + batch (exact); temp = gradients + activations + weights in flight (XLA's
  temp also holds its scratch)."""
  return {"arguments": (plan.params + plan.optimizer + plan.batch, stats.argument_size_in_bytes),
          "temp": (plan.gradients + plan.activations + plan.weights_in_flight,
                   stats.temp_size_in_bytes)}


def compiled(config, mesh: jax.sharding.Mesh):
  """XLA's ``memory_analysis()`` of ``rmjax.train``'s step for ``config`` on ``mesh`` (real
  devices), compiled as the trainer compiles it (sharded, state donated); nothing is allocated.
  Per device: arguments = state + batch, outputs = state (+ metrics), temp = everything else."""
  return compile_step(config, mesh).memory_analysis()


def abstract_batch(config, mesh: jax.sharding.Mesh) -> dict:
  """The trainer's global batch (``train.batch_size`` pairs x ``data.max_len``) as sharded
  ``ShapeDtypeStruct``s; with ``data.layout='shared_prompt'`` also its longest shared rows
  (``2 * max_len``: a pair's two sequences with nothing in common), with ``'packed'`` its largest
  packed fields (``packing.largest_shapes``)."""
  from rmjax.data import packing
  from rmjax.data.pipeline import SHARED_FIELDS
  rules = tuple(tuple(r) for r in config.mesh.rules)
  b, l = config.train.batch_size, config.data.max_len
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules))
  batch = {k: spec((b, 2, l), np.int32) for k in ("tokens", "mask", "response")}
  batch["margin"] = spec((b,), np.float32)
  batch["truncated"] = spec((b, 2), np.int32)
  if config.data.get("layout", "pairs") == "shared_prompt":
    batch.update({k: spec((b, 2 * l), np.int32) for k in SHARED_FIELDS})
    batch["shared_index"] = spec((b, 2, l), np.int32)
  if config.data.get("layout", "pairs") == "packed":  # a group per batch shard and micro-batch
    groups = sharding.batch_shards(mesh, rules) * config.train.accum_steps
    batch.update({k: spec(shape, np.int32) for k, shape in packing.largest_shapes(
        b, groups, l, config.data.get("pack_len", 0)).items()})
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
