"""llama.cpp GGUF files -> rmjax: metadata to config, tensors dequantised.

Architectures: ``llama`` (Llama, SmolLM2, Mistral-style without a window), ``qwen2`` (QKV bias)
and ``qwen3`` (q/k norm). llama.cpp's converter stores a ``llama`` model's Q and K projection rows
permuted (interleaved rotary pairs); we undo it so the weights match the rotate-half layout of
Hugging Face and rmjax. Qwen models are stored unpermuted (llama.cpp runs them with NeoX rope).
Gemma 2 is not read: its GGUF lacks ``query_pre_attn_scalar`` and the window's layer pattern
(llama.cpp hard-codes both per model size).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rmjax.models import LlamaConfig

# GGUF general.architecture -> the LlamaConfig switches it sets (as rmjax.convert.hf.FAMILIES)
ARCHITECTURES = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"GGUF metadata field {key!r} missing")
    return default
  return field.contents()


def config_from_gguf(reader, **overrides) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    why = (": the file lacks query_pre_attn_scalar and the window's layer pattern; import the "
           "Hugging Face folder instead" if arch == "gemma2" else "")
    raise ValueError(f"GGUF architecture {arch!r} is not supported{why}; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  heads = int(_field(reader, f"{arch}.attention.head_count"))
  dim = int(_field(reader, f"{arch}.embedding_length"))
  embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
  head_dim = _field(reader, f"{arch}.attention.key_length",
                    _field(reader, f"{arch}.rope.dimension_count", dim // heads))
  fields = dict(
      vocab_size=int(embed.shape[1]), dim=dim,
      num_layers=int(_field(reader, f"{arch}.block_count")),
      num_heads=heads, num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=int(head_dim), mlp_dim=int(_field(reader, f"{arch}.feed_forward_length")),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
      tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
      **ARCHITECTURES[arch])
  if f"{arch}.rope.scaling.type" in reader.fields:
    raise ValueError("GGUF rope scaling is not supported")
  fields.update(overrides)
  return LlamaConfig(**fields)


def unpermute_rows(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: per head, interleaved (x0, y0, x1, y1, ...) rows back to
  the rotate-half order (x0, x1, ..., y0, y1, ...)."""
  o = w_OxI.shape[0]
  return (w_OxI.reshape(heads, o // heads // 2, 2, *w_OxI.shape[1:])
          .swapaxes(1, 2).reshape(w_OxI.shape))


def gguf_tensor_getters(path: str, cfg: LlamaConfig
                        ) -> dict[str, tuple[tuple[int, ...], Callable]]:
  """rmjax path -> (target shape, ``read(index)``); each tensor is dequantised once, on demand."""
  import gguf
  reader = gguf.GGUFReader(path)
  tensors = {t.name: t for t in reader.tensors}

  def load(name: str, transpose: bool, heads: int = 0) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"{path}: tensor {name!r} not found")
    t = tensors[name]
    w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # numpy order = reversed GGUF dims
    if heads:
      w = unpermute_rows(w, heads)
    return w.T if transpose else w

  permuted = reader.fields["general.architecture"].contents() == "llama"
  q_heads, k_heads = (cfg.num_heads, cfg.num_kv_heads) if permuted else (0, 0)
  plan = {"backbone/embed/embedding": ("token_embd.weight", False, 0),
          "backbone/final_norm/scale": ("output_norm.weight", False, 0)}
  for i in range(cfg.num_layers):
    ours, blk = f"backbone/layers/{i}", f"blk.{i}"
    plan.update({
        f"{ours}/attn_norm/scale": (f"{blk}.attn_norm.weight", False, 0),
        f"{ours}/mlp_norm/scale": (f"{blk}.ffn_norm.weight", False, 0),
        f"{ours}/attn/q/kernel": (f"{blk}.attn_q.weight", True, q_heads),
        f"{ours}/attn/k/kernel": (f"{blk}.attn_k.weight", True, k_heads),
        f"{ours}/attn/v/kernel": (f"{blk}.attn_v.weight", True, 0),
        f"{ours}/attn/o/kernel": (f"{blk}.attn_output.weight", True, 0),
        f"{ours}/mlp/gate/kernel": (f"{blk}.ffn_gate.weight", True, 0),
        f"{ours}/mlp/up/kernel": (f"{blk}.ffn_up.weight", True, 0),
        f"{ours}/mlp/down/kernel": (f"{blk}.ffn_down.weight", True, 0),
    })
    for a in ("q", "k", "v") if cfg.qkv_bias else ():
      plan[f"{ours}/attn/{a}/bias"] = (f"{blk}.attn_{a}.bias", False, 0)
    for a in ("q", "k") if cfg.qk_norm else ():
      plan[f"{ours}/attn/{a}_norm/scale"] = (f"{blk}.attn_{a}_norm.weight", False, 0)

  def getter(args):
    cache = {}

    def read(index):
      if "w" not in cache:
        cache["w"] = load(*args)
      return cache["w"][index]
    return read

  return {p: (tuple(int(d) for d in (tensors[a[0]].shape if a[1] else reversed(tensors[a[0]].shape))),
              getter(a)) for p, a in plan.items()}


def open_gguf(path: str):
  import gguf
  return gguf.GGUFReader(path)
