"""Hugging Face checkpoints <-> rmjax: config mapping, safetensors import, reward-model export.

Supported architectures: Llama, Mistral and Qwen2 (``*ForCausalLM`` or ``*ForSequenceClassification``
folders with ``config.json`` and ``*.safetensors``, sharded index included). Tensors are read with
``safetensors`` (no PyTorch) one device shard at a time, straight into their target sharding.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np

from rmjax.models import LlamaConfig

ARCHITECTURES = ("llama", "mistral", "qwen2")
# tensors a reward model does not use: the LM head, rotary buffers of old checkpoints
UNUSED_OK = (re.compile(r"lm_head\.weight"), re.compile(r".*\.rotary_emb\.inv_freq"))


def _rope_fields(hf: dict) -> dict:
  """HF rope settings (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  out = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type == "linear":
    out["rope_factor"] = float(params["factor"])
  elif rope_type == "llama3":
    out.update(rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_positions=int(params["original_max_position_embeddings"]))
  elif rope_type != "default":
    raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")
  return out


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """``config.json`` contents -> ``LlamaConfig`` (``overrides``: e.g. dtype, param_dtype)."""
  arch = hf.get("model_type")
  if arch not in ARCHITECTURES:
    raise ValueError(f"model_type={arch!r} is not supported; expected one of {ARCHITECTURES}")
  heads = hf["num_attention_heads"]
  window = (hf.get("sliding_window") or 0) if arch == "mistral" else _qwen2_window(hf)
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if arch != "qwen2" and hf.get("attention_bias"):
    raise ValueError(f"model_type={arch!r} with attention_bias=True is not supported: it adds a "
                     "bias to the attention output projection (o_proj), which rmjax lacks")
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
      norm_eps=hf["rms_norm_eps"], qkv_bias=arch == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", arch != "mistral")),
      sliding_window=int(window), **_rope_fields(hf))
  fields.update(overrides)
  return LlamaConfig(**fields)


def _qwen2_window(hf: dict) -> int:
  """Qwen2's sliding window, which rmjax applies to every layer; 0 when there is none.

  HF gives layer ``i`` the window when ``layer_types[i] == "sliding_attention"``, by default when
  ``use_sliding_window`` and ``i >= max_window_layers``: only all or none are supported."""
  if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
    return 0
  n = hf["num_hidden_layers"]
  types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                    else "full_attention" for i in range(n)]
  sliding = [t == "sliding_attention" for t in types]
  if all(sliding):
    return int(hf["sliding_window"])
  if any(sliding):
    raise ValueError(f"qwen2 sliding window on layers {[i for i, s in enumerate(sliding) if s]} "
                     f"of {n} only (use_sliding_window, max_window_layers="
                     f"{hf.get('max_window_layers')}): rmjax windows all layers or none")
  return 0


def rmjax_to_hf_names(cfg: LlamaConfig) -> dict[str, tuple[str, bool]]:
  """rmjax parameter path -> (HF tensor name, stored transposed?). Without the reward head."""
  names = {"backbone/embed/embedding": ("model.embed_tokens.weight", False),
           "backbone/final_norm/scale": ("model.norm.weight", False)}
  attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
  mlp = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
  for i in range(cfg.num_layers):
    ours, theirs = f"backbone/layers/{i}", f"model.layers.{i}"
    names[f"{ours}/attn_norm/scale"] = (f"{theirs}.input_layernorm.weight", False)
    names[f"{ours}/mlp_norm/scale"] = (f"{theirs}.post_attention_layernorm.weight", False)
    for a, b in attn.items():
      names[f"{ours}/attn/{a}/kernel"] = (f"{theirs}.self_attn.{b}.weight", True)
      if cfg.qkv_bias and a != "o":
        names[f"{ours}/attn/{a}/bias"] = (f"{theirs}.self_attn.{b}.bias", False)
    for a, b in mlp.items():
      names[f"{ours}/mlp/{a}/kernel"] = (f"{theirs}.mlp.{b}.weight", True)
  return names


HEAD = ("head/kernel", ("score.weight", True))


class SafetensorsReader:
  """Random access to the tensors of an HF folder (single file or sharded index)."""

  def __init__(self, folder: str):
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
      weight_map = {}
      for name in files:
        with safe_open(os.path.join(folder, name), framework="flax") as f:
          weight_map.update({k: name for k in f.keys()})
    self._files = {name: safe_open(os.path.join(folder, name), framework="flax")
                   for name in sorted(set(weight_map.values()))}
    self._where = weight_map
    self.folder = folder

  def __contains__(self, name: str) -> bool:
    return name in self._where

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def _slice(self, name: str):
    if name not in self._where:
      raise KeyError(f"{self.folder}: tensor {name!r} not found")
    return self._files[self._where[name]].get_slice(name)

  def read(self, name: str, index: tuple[slice, ...]):
    """Only the requested region is read from disk."""
    return self._slice(name)[index]


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
  with open(path) as f:
    return json.load(f)


def hf_tensor_getters(folder: str, cfg: LlamaConfig
                      ) -> dict[str, tuple[tuple[int, ...], Callable]]:
  """rmjax path -> (target shape, ``read(index)``) for every tensor the folder provides."""
  reader = SafetensorsReader(folder)
  names = rmjax_to_hf_names(cfg)
  if HEAD[1][0] in reader:
    names[HEAD[0]] = HEAD[1]
  unused = sorted(set(reader.names) - {name for name, _ in names.values()}
                  - {n for n in reader.names if any(p.fullmatch(n) for p in UNUSED_OK)})
  if unused:
    raise ValueError(f"{folder}: tensors {unused[:5]} ({len(unused)} in all) have no place in "
                     f"rmjax's model; does config.json match the checkpoint?")
  getters = {}
  for path, (name, transposed) in names.items():
    shape = reader.shape(name)
    if transposed:
      getters[path] = (shape[::-1], lambda idx, n=name: reader.read(n, idx[::-1]).T)
    else:
      getters[path] = (shape, lambda idx, n=name: reader.read(n, idx))
  return getters


# --- export ---

def hf_config_dict(cfg: LlamaConfig, pad_token_id: int) -> dict:
  """An HF ``config.json`` for ``cfg`` as a one-label sequence classifier."""
  arch = "qwen2" if cfg.qkv_bias else ("mistral" if cfg.sliding_window else "llama")
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "linear":
    rope["factor"] = cfg.rope_factor
  elif cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_positions)
  out = {
      "model_type": arch, "architectures": [f"{arch.capitalize()}ForSequenceClassification"],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.hd, "intermediate_size": cfg.mlp_dim, "rms_norm_eps": cfg.norm_eps,
      "hidden_act": "silu", "rope_theta": cfg.rope_theta, "rope_parameters": rope,
      "rope_scaling": None if cfg.rope_type == "default" else rope,
      "max_position_embeddings": max(32768, cfg.rope_original_max_positions),
      "tie_word_embeddings": False, "num_labels": 1, "pad_token_id": pad_token_id,
      "id2label": {"0": "reward"}, "label2id": {"reward": 0},
  }
  if arch == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if arch == "qwen2":  # HF windows layers >= max_window_layers: here every layer, or none
    out.update(use_sliding_window=bool(cfg.sliding_window),
               sliding_window=cfg.sliding_window or None, max_window_layers=0,
               layer_types=[("sliding_attention" if cfg.sliding_window else "full_attention")
                            for _ in range(cfg.num_layers)])
  if arch == "llama":
    out["attention_bias"] = False
  return out


def export_tensors(cfg: LlamaConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """rmjax flat params (path -> array) -> HF tensor dict of a sequence classifier."""
  names = rmjax_to_hf_names(cfg)
  names[HEAD[0]] = HEAD[1]
  missing = set(names) - set(params)
  if missing:
    raise ValueError(f"parameters missing for export: {sorted(missing)[:5]}")
  return {name: np.ascontiguousarray(params[path].T if transposed else params[path])
          for path, (name, transposed) in names.items()}
