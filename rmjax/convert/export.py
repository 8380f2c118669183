"""Reward model out: a Hugging Face ``*ForSequenceClassification`` folder (num_labels=1).

``transformers.AutoModelForSequenceClassification.from_pretrained(out)`` then scores exactly as
rmjax does, provided the input carries the same positions: right padding (HF's default), or pass
``position_ids = cumsum(attention_mask) - 1`` for left-padded batches.

HF picks the reward token as the last token that is not ``pad_token_id``. rmjax appends EOS to
every response, and many tokenizers pad with EOS, so when the pad id is EOS (or unset) a dedicated
``<|rm_pad|>`` token is added to the tokenizer and a zero row to the embedding table.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from rmjax.convert import hf
from rmjax.models import RewardModel

PAD_TOKEN = "<|rm_pad|>"


def flat_params(model: RewardModel) -> dict[str, np.ndarray]:
  """Every parameter as a float32 host array, keyed ``backbone/layers/0/attn/q/kernel``."""
  return {"/".join(str(p) for p in path): np.asarray(jax.device_get(v[...]), np.float32)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def export_reward_model(model: RewardModel, out_dir, *, tokenizer=None, pad_token_id: int = 0
                        ) -> str:
  """Writes ``config.json``, ``model.safetensors`` (float32) and, given an HF ``tokenizer``, its
  files. Without one (byte-level models), ``pad_token_id`` must be an id no input uses."""
  if jax.process_count() > 1:
    raise RuntimeError("export runs in a single process (it gathers every parameter on the host)")
  out_dir = str(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.backbone.cfg
  params = flat_params(model)
  if tokenizer is not None:
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None or pad_token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
      tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
      pad_token_id = tokenizer.pad_token_id
    embed = params["backbone/embed/embedding"]
    if pad_token_id >= embed.shape[0]:
      grow = pad_token_id + 1 - embed.shape[0]
      params["backbone/embed/embedding"] = np.concatenate(
          [embed, np.zeros((grow, embed.shape[1]), embed.dtype)])
      cfg = cfg.__class__(**{**cfg.__dict__, "vocab_size": pad_token_id + 1})
    tokenizer.save_pretrained(out_dir)
  config = hf.hf_config_dict(cfg, pad_token_id)
  config["torch_dtype"] = "float32"
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(hf.export_tensors(cfg, params), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  return out_dir
