"""The train state: model and optimiser, built (fresh or from ``model.init_from``), abstracted
(shapes and shardings, for restoring and planning), and taken apart (``merge``, ``unpack``).

Everything that needs the train state's structure imports it from here: the recipe
(``rmjax.train``), checkpoints, memory planning, the feature cache and the loss lab.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx

from rmjax import convert
from rmjax.models import LlamaConfig, RewardModel
from rmjax.models.llama import RUN_ONLY_FIELDS


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """AdamW (no decay on vectors), warmup + cosine schedule, global-norm clipping, and
  ``apply_if_finite``: an update with a non-finite gradient is skipped (params untouched), however
  many in a row; ``train`` stops at ``optim.max_consecutive_nonfinite`` in a row."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
      end_value=optim.lr * optim.final_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                               weight_decay=optim.weight_decay, mask=decay_mask))
  # optax applies the update after max_consecutive_errors skips (NaN params): never here
  return optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)


# fields that are not architecture
ARCH_EXEMPT = ("init_from", "dtype", "param_dtype", *RUN_ONLY_FIELDS)


def _same(a, b) -> bool:  # floats from checkpoints are often float32 roundings (GGUF)
  return math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b


def model_config(config) -> LlamaConfig:
  """``config.model`` as a ``LlamaConfig``. With ``model.init_from`` the architecture is the
  checkpoint's; any architecture field the config also sets must agree with it."""
  fields = {k: v for k, v in config.model.items() if k != "init_from"}
  init_from = config.model.get("init_from", "")
  if not init_from:  # None: LlamaConfig's default
    return LlamaConfig(**{k: v for k, v in fields.items() if v is not None})
  cfg = convert.pretrained_config(init_from, **{k: fields[k] for k in ARCH_EXEMPT if k in fields})
  wrong = {k: (v, getattr(cfg, k)) for k, v in fields.items()
           if k not in ARCH_EXEMPT and v is not None and not _same(getattr(cfg, k), v)}
  if wrong:
    raise ValueError(f"model.init_from={init_from}: the checkpoint disagrees with the config on "
                     + ", ".join(f"model.{k}={a!r} (checkpoint: {b!r})"
                                 for k, (a, b) in wrong.items()))
  return cfg


def trainable_filter(config, num_layers: int | None = None):
  """NNX filter of the trained parameters (``train.trainable_top_layers`` = k): all (k < 0), or
  the head plus, when k > 0, the final norm and the top k blocks (the rest stays frozen).
  ``num_layers``: the model's, when known (else read from ``model_config``)."""
  top_layers = config.train.get("trainable_top_layers", -1)
  if top_layers < 0:
    return nnx.Param
  num_layers = num_layers or model_config(config).num_layers
  if top_layers > num_layers:
    raise ValueError(f"train.trainable_top_layers={top_layers} exceeds the {num_layers} layers")

  def trainable(path, node) -> bool:
    if not isinstance(node, nnx.Param):
      return False
    if path[0] == "head":
      return True
    return top_layers > 0 and (path[1] == "final_norm" or
                               (path[1] == "layers" and int(path[2]) >= num_layers - top_layers))
  return trainable


def create_state(config, mesh=None, *, pretrained: bool = True):
  """Model and optimiser, created under the current mesh so parameters are born sharded; with
  ``pretrained``, the weights come from ``model.init_from`` when set (needs ``mesh``)."""
  cfg = model_config(config)
  tx = make_optimizer(config.optim, config.train.steps)
  wrt = trainable_filter(config, cfg.num_layers)
  make = lambda model: {"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=wrt)}
  if pretrained and config.model.get("init_from"):
    return nnx.split(nnx.jit(make)(convert.load_reward_model(config.model.init_from, cfg, mesh,
                                                             seed=config.seed)))
  # built eagerly: the blocks share one compiled init (models.llama.jitted_init); same numbers
  # as one jitted init of the whole model, which compiled for minutes on a GPU
  return nnx.split(nnx.jit(make)(RewardModel(cfg, rngs=nnx.Rngs(config.seed))))


def unpack(merged: dict):
  return merged["model"], merged["optimizer"]


def merge(graphdef, state):
  """``(model, optimizer)`` of a split train state."""
  return unpack(nnx.merge(graphdef, state))


def abstract_state(config, mesh):
  """Shapes, dtypes and shardings of ``create_state``'s state, without allocating it."""
  graphdef, state = nnx.eval_shape(lambda: create_state(config, pretrained=False))
  shardings = nnx.get_named_sharding(state, mesh)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
