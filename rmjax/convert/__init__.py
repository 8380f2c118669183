"""Pretrained backbones in: Hugging Face folders (safetensors) and GGUF files -> sharded NNX params.

  cfg = pretrained_config(path, dtype="bfloat16")
  with sharding.use_mesh(mesh, rules):
    model = load_reward_model(path, cfg, mesh, seed=0)

Every parameter is created directly in its target sharding: each device's shard is read from the
checkpoint on its own (a region of a safetensors file; GGUF tensors are dequantised once each), so
no device ever holds a full copy of the model. The reward head is loaded from a sequence-classifier
checkpoint's ``score`` tensor when present, else freshly initialised (the paper's init).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from rmjax.convert import gguf as gguf_lib
from rmjax.convert import hf
from rmjax.models import LlamaConfig, RewardModel


def is_gguf(path: str) -> bool:
  return os.path.isfile(path) and path.endswith(".gguf")


def pretrained_config(path: str, **overrides) -> LlamaConfig:
  """Architecture of the checkpoint at ``path`` (HF folder or ``.gguf``), plus ``overrides``."""
  if is_gguf(path):
    return gguf_lib.config_from_gguf(gguf_lib.open_gguf(path), **overrides)
  if os.path.isdir(path):
    try:
      return hf.config_from_hf(hf.read_hf_config(path), **overrides)
    except ValueError as e:
      raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None
  raise FileNotFoundError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def load_reward_model(path: str, cfg: LlamaConfig, mesh: jax.sharding.Mesh, *, seed: int = 0
                      ) -> RewardModel:
  """A ``RewardModel`` with the checkpoint's weights, sharded over ``mesh`` (call it under
  ``sharding.use_mesh``). Parameters the checkpoint lacks (the head) get their usual init."""
  getters = (gguf_lib.gguf_tensor_getters(path, cfg) if is_gguf(path)
             else hf.hf_tensor_getters(path, cfg))
  abstract = nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  shardings = dict(nnx.to_flat_state(nnx.get_named_sharding(state, mesh)))
  flat = dict(nnx.to_flat_state(state))
  missing = [p for p in flat if _path_str(p) not in getters]
  fresh = {}
  if missing:
    if any(p[0] != "head" for p in missing):
      raise ValueError(f"{path}: no weights for {[_path_str(p) for p in missing][:5]}")

    @nnx.jit
    def init_missing():  # only the missing parameters survive dead-code elimination
      full = dict(nnx.to_flat_state(nnx.state(RewardModel(cfg, rngs=nnx.Rngs(seed)))))
      return {p: full[p][...] for p in missing}
    fresh = init_missing()

  for p, var in flat.items():
    key = _path_str(p)
    if p in fresh:
      var.set_value(fresh[p])
      continue
    shape, read = getters.pop(key)
    if tuple(shape) != tuple(var.shape):
      raise ValueError(f"{path}: tensor for {key} has shape {tuple(shape)}, the model expects "
                       f"{tuple(var.shape)}; does the config match the checkpoint?")
    dtype = var.dtype
    var.set_value(jax.make_array_from_callback(
        var.shape, shardings[p].get_value(),
        lambda idx, read=read, dtype=dtype: np.asarray(read(idx), dtype=dtype)))
  if getters:
    raise ValueError(f"{path}: unused tensors {sorted(getters)[:5]}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
