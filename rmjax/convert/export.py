"""Reward model out: a Hugging Face ``*ForSequenceClassification`` folder (num_labels=1).

Plain ``transformers`` then scores as rmjax does, with no hand-work:
``model(**tok(texts, padding=True, return_tensors="pt")).logits`` (right or left padding) and
``pipeline("text-classification", model=out, function_to_apply="none")``. What that takes:

* The saved tokenizer produces what rmjax reads. A run under the 'rmjax' convention (EOS appended
  to every response, rmjax.data.tokenizer) gets a tokenizer that appends EOS itself (its fast
  post-processor, ``add_eos_token``); one under the 'hf' convention (a fine-tuned hub classifier)
  keeps its tokenizer as it is.
* HF reads the last token that is not ``config.pad_token_id``. An appended EOS must not be that id,
  so when the tokenizer pads with EOS or BOS (or has no pad) a dedicated ``<|rm_pad|>`` token is
  added and a zero row to the embedding table.
* Positions: HF counts them from the row's first column, padding included (transformers 5.x
  Llama-family models, unless ``position_ids`` is passed), rmjax from the first real token. With
  left padding that shifts every position of a row by the same amount, which rotary attention
  does not see (it depends only on distances), so the rewards agree to float rounding.

The folder is checked before this returns: the saved tokenizer, reloaded, must encode a sample
text as rmjax does, else a clear error (rather than an export that scores wrong).
"""
from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from rmjax.convert import hf
from rmjax.models import RewardModel

PAD_TOKEN = "<|rm_pad|>"
SAMPLE = "Natalia sold 48 clips. The answer is 48"


def flat_params(model: RewardModel) -> dict[str, np.ndarray]:
  """Every parameter as a float32 host array, keyed ``backbone/layers/0/attn/q/kernel``."""
  return {"/".join(str(p) for p in path): np.asarray(jax.device_get(v[...]), np.float32)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _append_eos(hf_tok, prefix_ids: list[int]) -> dict:
  """Makes ``hf_tok(text)`` = prefix + text + EOS; returns the ``tokenizer_config.json`` keys that
  keep it so on reload (transformers rebuilds the post-processor from explicit add_*_token)."""
  if prefix_ids in ([], [hf_tok.bos_token_id]) and hasattr(hf_tok, "add_eos_token"):
    hf_tok.add_bos_token = bool(prefix_ids)  # setters rebuild the fast post-processor
    hf_tok.add_eos_token = True
    return {"add_bos_token": bool(prefix_ids), "add_eos_token": True}
  from tokenizers import processors
  if not hf_tok.is_fast:
    raise ValueError(f"export: {type(hf_tok).__name__} (not a fast tokenizer) adds the prefix "
                     f"{prefix_ids} and cannot be made to append EOS; export from a fast one")
  names = hf_tok.convert_ids_to_tokens(prefix_ids + [hf_tok.eos_token_id])
  single = " ".join(names[:-1] + ["$A", names[-1]])
  hf_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single=single, pair=f"{single} $B:1 {names[-1]}:1",
      special_tokens=sorted(set(zip(names, prefix_ids + [hf_tok.eos_token_id]))))
  return {"add_bos_token": None, "add_eos_token": None}


def export_tokenizer(tokenizer, out_dir: str) -> int:
  """Saves a copy of the rmjax ``HFTokenizer``'s tokenizer that encodes as rmjax reads (module
  docstring); returns the pad id the exported config must carry."""
  from transformers import AutoTokenizer
  if not hasattr(tokenizer, "convention"):
    raise TypeError(f"export: tokenizer must be rmjax's HFTokenizer (rmjax.data.sources."
                    f"make_tokenizer), which knows the run's convention; got {type(tokenizer)}")
  hf_tok = copy.deepcopy(tokenizer.hf)
  keys = {}
  if tokenizer.convention == "hf":  # HF already reads where rmjax does: keep its pad id
    pad_token_id = tokenizer.skip_id if tokenizer.skip_id is not None else tokenizer.pad_id
  else:
    if hf_tok.pad_token_id is None or hf_tok.pad_token_id in (hf_tok.eos_token_id,
                                                              hf_tok.bos_token_id):
      hf_tok.add_special_tokens({"pad_token": PAD_TOKEN})
    pad_token_id = hf_tok.pad_token_id
    keys = _append_eos(hf_tok, list(tokenizer.prefix_ids))
  hf_tok.save_pretrained(out_dir)
  config_path = os.path.join(out_dir, "tokenizer_config.json")
  if keys and os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
    config.update({k: v for k, v in keys.items() if v is not None})
    for k in (k for k, v in keys.items() if v is None):
      config.pop(k, None)
    with open(config_path, "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
  got = AutoTokenizer.from_pretrained(out_dir)(SAMPLE).input_ids
  while len(got) > 1 and got[-1] == pad_token_id:  # HF skips trailing pad ids; so does rmjax
    got.pop()
  want = sum(tokenizer.encode_prompt_response("", SAMPLE), [])
  if got != want:
    raise ValueError(f"export {out_dir}: the saved tokenizer encodes {SAMPLE!r} as {got}, rmjax "
                     f"reads {want} (convention {tokenizer.convention!r}); this tokenizer class "
                     "cannot be made to append EOS")
  return pad_token_id


def export_reward_model(model: RewardModel, out_dir, *, tokenizer=None, pad_token_id: int = 0,
                        reward_stats: dict | None = None) -> str:
  """Writes ``config.json``, ``model.safetensors`` (float32) and, given the run's rmjax
  ``HFTokenizer``, its tokenizer (``export_tokenizer``). Without one (byte-level models),
  ``pad_token_id`` must be an id no input uses. ``reward_stats`` (a run's
  ``reward_stats.json``): written as ``rmjax_reward_mean`` / ``rmjax_reward_std`` for
  ``rmjax.score --normalize``."""
  if jax.process_count() > 1:
    raise RuntimeError("export runs in a single process (it gathers every parameter on the host)")
  out_dir = str(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.backbone.cfg
  params = flat_params(model)
  if tokenizer is not None:
    pad_token_id = export_tokenizer(tokenizer, out_dir)
    embed = params["backbone/embed/embedding"]
    if pad_token_id >= embed.shape[0]:
      grow = pad_token_id + 1 - embed.shape[0]
      params["backbone/embed/embedding"] = np.concatenate(
          [embed, np.zeros((grow, embed.shape[1]), embed.dtype)])
      cfg = cfg.__class__(**{**cfg.__dict__, "vocab_size": pad_token_id + 1})
  config = hf.hf_config_dict(cfg, pad_token_id)
  config["torch_dtype"] = "float32"
  if reward_stats is not None:
    config.update(rmjax_reward_mean=float(reward_stats["mean"]),
                  rmjax_reward_std=float(reward_stats["std"]))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(hf.export_tensors(cfg, params), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  return out_dir
