"""Hugging Face checkpoints <-> rmjax: config mapping, safetensors import, reward-model export.

Supported architectures: Llama, Mistral, Qwen2, Qwen3 and Gemma 2 (``*ForCausalLM`` or
``*ForSequenceClassification`` folders with ``config.json`` and ``*.safetensors``, sharded index
included), each a set of ``LlamaConfig`` switches (``FAMILIES``). Tensors are read with
``safetensors`` (no PyTorch) one device shard at a time, straight into their target sharding.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np

from rmjax.models import LlamaConfig

# HF model_type -> the LlamaConfig switches that family sets (the rest keep their defaults)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True},
    "gemma2": {"norm_plus_one": True, "sandwich_norms": True, "embed_scale": True},
}
ARCHITECTURES = tuple(FAMILIES)
SWITCHES = ("qkv_bias", "qk_norm", "norm_plus_one", "sandwich_norms", "embed_scale")
# HF config classes' head_dim where config.json has none (the others: hidden_size / heads)
HEAD_DIM_DEFAULTS = {"qwen3": 128, "gemma2": 256}
# HF hidden_act / hidden_activation -> LlamaConfig.mlp_act
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
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
  if arch not in FAMILIES:
    raise ValueError(f"model_type={arch!r} is not supported; supported: {', '.join(FAMILIES)}")
  _check_one_label(hf)
  heads = hf["num_attention_heads"]
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if arch != "qwen2" and hf.get("attention_bias"):
    raise ValueError(f"model_type={arch!r} with attention_bias=True is not supported: it adds a "
                     "bias to the attention output projection (o_proj), which rmjax lacks")
  act = hf.get("hidden_activation" if arch == "gemma2" else "hidden_act") or "silu"
  if act not in ACTIVATIONS:
    raise ValueError(f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
  window, sliding_layers = _windows(hf, arch)
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or HEAD_DIM_DEFAULTS.get(arch, hf["hidden_size"] // heads),
      mlp_dim=hf["intermediate_size"],
      norm_eps=hf["rms_norm_eps"], mlp_act=ACTIVATIONS[act],
      tie_embeddings=bool(hf.get("tie_word_embeddings", arch != "mistral")),
      sliding_window=window, sliding_layers=sliding_layers, **FAMILIES[arch], **_rope_fields(hf))
  if arch == "gemma2":  # HF's defaults where config.json lacks a field
    fields.update(attn_softcap=float(hf.get("attn_logit_softcapping", 50.0) or 0.0),
                  query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256))
  fields.update(overrides)
  return LlamaConfig(**fields)


def _check_one_label(hf: dict):
  """A sequence classifier must have one output (the reward), as HF counts its labels."""
  if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
    return
  labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2  # HF's default: 2
  if labels != 1:
    raise ValueError(f"a sequence classifier with num_labels={labels}: a reward model has one "
                     "output (num_labels=1); rmjax cannot read a multi-label score head")


def _windows(hf: dict, arch: str) -> tuple[int, tuple[int, ...] | None]:
  """HF's sliding window and the layers it applies to (None: every layer), or ``(0, None)``.

  Mistral windows every layer; Qwen2/3 the layers whose ``layer_types[i]`` is
  ``sliding_attention`` (by default, with ``use_sliding_window``, ``i >= max_window_layers``);
  Gemma 2 likewise (by default every other layer, from layer 0)."""
  n = hf["num_hidden_layers"]
  if arch == "llama":
    return 0, None
  if arch == "mistral":
    return int(hf.get("sliding_window") or 0), None
  if arch == "gemma2":
    window = hf.get("sliding_window", 4096)
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  else:  # qwen2, qwen3: HF drops the window without use_sliding_window
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    default = ["sliding_attention" if window and i >= hf.get("max_window_layers", 28)
               else "full_attention" for i in range(n)]
  types = hf.get("layer_types") or default
  if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
    raise ValueError(f"layer_types={types}: expected {n} of 'sliding_attention' / "
                     "'full_attention'")
  layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
  if not window or not layers:
    return 0, None
  return int(window), None if len(layers) == n else layers


def rmjax_to_hf_names(cfg: LlamaConfig) -> dict[str, tuple[str, bool]]:
  """rmjax parameter path -> (HF tensor name, stored transposed?). Without the reward head."""
  names = {"backbone/embed/embedding": ("model.embed_tokens.weight", False),
           "backbone/final_norm/scale": ("model.norm.weight", False)}
  attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
  mlp = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
  # Gemma 2's sandwich: post_attention_layernorm is on the attention output, not the MLP input
  norms = ({"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
           if cfg.sandwich_norms else
           {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"})
  if cfg.qk_norm:
    norms.update({"attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm"})
  for i in range(cfg.num_layers):
    ours, theirs = f"backbone/layers/{i}", f"model.layers.{i}"
    for a, b in norms.items():
      names[f"{ours}/{a}/scale"] = (f"{theirs}.{b}.weight", False)
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
    if reader.shape(HEAD[1][0])[0] != 1:
      raise ValueError(f"{folder}: score.weight has {reader.shape(HEAD[1][0])[0]} outputs "
                       "(num_labels); a reward model has one")
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

def hf_family(cfg: LlamaConfig) -> str:
  """The HF ``model_type`` that computes what ``cfg`` does; a clear error when none does."""
  switches = {s: getattr(cfg, s) for s in SWITCHES}
  found = [a for a, sw in FAMILIES.items() if switches == {s: sw.get(s, False) for s in SWITCHES}]
  if not found:
    raise ValueError(f"no HF family has the switches {switches} (families: {FAMILIES})")
  arch = found[0] if found[0] != "llama" else ("mistral" if cfg.sliding_window else "llama")
  problems = []
  if arch == "mistral" and cfg.sliding_layers is not None:
    problems.append(f"sliding_layers={cfg.sliding_layers} (Mistral windows every layer)")
  if arch != "gemma2" and (cfg.attn_softcap or cfg.query_pre_attn_scalar):
    problems.append("attn_softcap / query_pre_attn_scalar (Gemma 2 only)")
  if problems:
    raise ValueError(f"model_type={arch!r} cannot express " + "; ".join(problems))
  return arch


def hf_config_dict(cfg: LlamaConfig, pad_token_id: int) -> dict:
  """An HF ``config.json`` for ``cfg`` as a one-label sequence classifier."""
  arch = hf_family(cfg)
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "linear":
    rope["factor"] = cfg.rope_factor
  elif cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_positions)
  act = {v: k for k, v in ACTIVATIONS.items()}[cfg.mlp_act]
  out = {
      "model_type": arch, "architectures": [f"{arch.capitalize()}ForSequenceClassification"],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.hd, "intermediate_size": cfg.mlp_dim, "rms_norm_eps": cfg.norm_eps,
      "hidden_activation" if arch == "gemma2" else "hidden_act": act,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope,
      "rope_scaling": None if cfg.rope_type == "default" else rope,
      "max_position_embeddings": max(32768, cfg.rope_original_max_positions),
      "tie_word_embeddings": cfg.tie_embeddings, "num_labels": 1, "pad_token_id": pad_token_id,
      "id2label": {"0": "reward"}, "label2id": {"reward": 0},
  }
  layer_types = [("sliding_attention" if cfg.windowed(i) else "full_attention")
                 for i in range(cfg.num_layers)]
  if arch == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if arch in ("qwen2", "qwen3"):  # layer_types says which layers HF windows
    out.update(use_sliding_window=bool(cfg.sliding_window),
               sliding_window=cfg.sliding_window or None, max_window_layers=0,
               layer_types=layer_types)
  if arch == "gemma2":  # no window: every layer full (HF still wants a sliding_window value)
    scalar = cfg.query_pre_attn_scalar or cfg.hd
    out.update(sliding_window=cfg.sliding_window or 4096, layer_types=layer_types,
               query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=None)
  if arch in ("llama", "qwen3", "gemma2"):
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
