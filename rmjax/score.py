"""Batch scoring: ``python -m rmjax.score --model=M --input=in.jsonl --output=out.jsonl``.

``--model`` is an rmjax run (a workdir, its ``checkpoints/`` or one step folder; the tokenizer is
the run's ``data.tokenizer`` under its convention), a Hugging Face folder, or a ``.gguf`` file (the
tokenizer comes from the same place; the reward head is the checkpoint's ``score`` layer for
sequence-classifier folders, else freshly initialised — useful only for smoke tests). A
sequence-classifier folder (a hub reward model, or an rmjax export) is scored as transformers
scores it (the 'hf' convention of rmjax.data.tokenizer); the others as rmjax runs are.

``--normalize``: rewards become ``(r - mean) / std`` with the stats stored with the model: a run's
``reward_stats.json``, an HF folder's ``config.json`` ``rmjax_reward_mean`` / ``rmjax_reward_std``.

Each input line is one of ``{"prompt": ..., "response": ...}``, ``{"text": ...}`` (scored as a
response with an empty prompt) or ``{"messages": [{"role", "content"}, ...]}`` (chat template
applied; the last turn must be the assistant's). Every output line is the input object plus
``"reward"``, in input order. Sequences longer than ``--max_len`` lose the left end of their prompt
(then, if the response alone is too long, its middle; the final token is always kept); such lines
also get ``"truncated": <tokens cut>``. Work is sorted by length and padded to a few bucket lengths
so the forward pass compiles once per bucket.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from tqdm import tqdm

from rmjax import sharding
from rmjax.data.pipeline import encode_sequence, fit, kept_prefix
from rmjax.data.readers import iter_jsonl
from rmjax.data.tokenizer import HFTokenizer, is_classifier_folder


def check_record(record: dict, where: str) -> dict:
  """One input object, checked: ``messages``, ``text`` or ``prompt`` + ``response``."""
  if "messages" in record:
    return record
  if "text" in record:
    keys = ("text",)
  elif "prompt" in record or "response" in record:
    keys = ("prompt", "response")
  else:
    raise ValueError(f"{where}: expected 'prompt' + 'response', 'text' or 'messages'")
  for k in keys:
    if not isinstance(record.get(k), str):
      raise ValueError(f"{where}: field {k!r} missing or not a string")
  if not record[keys[-1]].strip():
    raise ValueError(f"{where}: field {keys[-1]!r} is empty")
  return record


def encode_record(record: dict, tokenizer) -> tuple[list[int], list[int]]:
  if "messages" in record:
    return tokenizer.encode_messages(record["messages"])
  if "text" in record:
    return tokenizer.encode_prompt_response("", record["text"])
  return tokenizer.encode_prompt_response(record["prompt"], record["response"])


def bucket_length(n: int, max_len: int) -> int:
  """Next power of two (at least 16), capped at ``max_len``: few distinct compiled shapes."""
  return min(max_len, max(16, 1 << (n - 1).bit_length()))


def is_hf_folder(path: str) -> bool:
  return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def load_model(path: str, mesh):
  """``(model, tokenizer)`` for an rmjax run, an HF folder or a ``.gguf`` file."""
  from rmjax import convert
  from rmjax.checkpoint import load_trained
  from rmjax.data.sources import make_tokenizer
  if convert.is_gguf(path) or is_hf_folder(path):
    tokenizer = HFTokenizer(path, "hf" if is_classifier_folder(path) else "rmjax")
    return convert.load_reward_model(path, convert.pretrained_config(path), mesh), tokenizer
  config, model = load_trained(path, mesh)
  return model, make_tokenizer(config)


def reward_stats(path: str) -> dict:
  """``{"mean", "std", ...}`` stored with the model at ``path`` (``--model``): ``--normalize``."""
  from rmjax.checkpoint import resolve_run
  if is_hf_folder(path):
    where = os.path.join(path, "config.json")
    with open(where) as f:
      config = json.load(f)
    stats = {k: config.get(f"rmjax_reward_{k}") for k in ("mean", "std")}
    missing = "no rmjax_reward_mean / rmjax_reward_std (export writes them from a run's stats)"
  elif os.path.isdir(path):
    directory, step, workdir = resolve_run(path)
    where = os.path.join(workdir, "reward_stats.json")
    stats = {}
    if os.path.exists(where):
      with open(where) as f:
        stats = json.load(f)
    missing = "missing (training writes it at its end; rerun or resume the run to make it)"
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    step = step if step is not None else max(steps, default=None)
    if stats.get("step") is not None and step is not None and stats["step"] != step:
      raise ValueError(f"--normalize: {where}: stats of step {stats['step']}, but the checkpoint "
                       f"scored is step {step}")
  elif path.endswith(".gguf"):
    where, stats, missing = path, {}, "a .gguf file carries no reward stats"
  else:
    raise FileNotFoundError(f"--model={path}: no such run folder, HF folder or .gguf file")
  if stats.get("mean") is None or stats.get("std") is None:
    raise ValueError(f"--normalize: {where}: {missing}")
  if not (np.isfinite(stats["mean"]) and np.isfinite(stats["std"]) and stats["std"] > 0):
    raise ValueError(f"--normalize: {where}: mean={stats['mean']}, std={stats['std']}: expected "
                     "finite values and std > 0")
  return stats


def score_file(model, tokenizer, input_path: str, output_path: str, *, batch_size: int = 16,
               max_len: int = 2048, mesh=None, stats: dict | None = None) -> int:
  """Scores every line of ``input_path`` into ``output_path``; returns the number of lines.
  ``stats``: ``{"mean", "std"}`` to write ``(r - mean) / std`` (``reward_stats``).

  The output is written to ``<output>.tmp`` and renamed when complete, so a crash never leaves a
  partial file under the final name (nor destroys an earlier output)."""
  records, encoded = [], []
  for lineno, record in iter_jsonl(input_path):  # malformed JSON / UTF-8: path:line errors
    where = f"{input_path}:{lineno}"
    try:
      encoded.append(encode_record(check_record(record, where), tokenizer))
    except ValueError as e:
      raise ValueError(e if str(e).startswith(where) else f"{where}: {e}") from None
    records.append(record)
  n_dev = mesh.size if mesh is not None else 1
  batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
  forward = jax.jit(lambda tokens, mask: model(tokens, mask)[0])
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
  rewards = np.zeros(len(encoded), np.float32)
  for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch"):
    idx = order[start:start + batch_size]
    length = bucket_length(max(len(encoded[i][0]) + len(encoded[i][1]) for i in idx), max_len)
    rows = [encode_sequence(*encoded[i], length, tokenizer.pad_id,
                            keep=kept_prefix(tokenizer, encoded[i][0])) for i in idx]
    rows += [rows[-1]] * (batch_size - len(rows))  # fixed batch shape: pad with a repeat
    tokens, mask = (np.stack([r[k] for r in rows]) for k in (0, 1))
    batch = {"tokens": tokens, "mask": mask}
    if mesh is not None:
      batch = sharding.host_to_global(batch, mesh)
    rewards[idx] = np.asarray(jax.device_get(forward(batch["tokens"], batch["mask"])))[:len(idx)]
  if stats is not None:
    rewards = (rewards - np.float32(stats["mean"])) / np.float32(stats["std"])
  tmp = output_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for record, (p, r), reward in zip(records, encoded, rewards):
      out = dict(record, reward=float(reward))
      cut = sum(fit(len(p), len(r), max_len, kept_prefix(tokenizer, p)))
      if cut:
        out["truncated"] = cut
      f.write(json.dumps(out, ensure_ascii=False) + "\n")
  os.replace(tmp, output_path)
  return len(records)


def _cli():
  from absl import app, flags
  from absl import logging as absl_logging
  model_flag = flags.DEFINE_string("model", None, "rmjax run dir, HF folder or .gguf file.")
  input_flag = flags.DEFINE_string("input", None, "JSONL: prompt+response, text or messages.")
  output_flag = flags.DEFINE_string("output", None, "JSONL: each input line plus 'reward'.")
  batch_flag = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
  max_len_flag = flags.DEFINE_integer("max_len", 2048, "Longest sequence in tokens.")
  normalize_flag = flags.DEFINE_bool(
      "normalize", False, "Write (r - mean) / std with the model's stored validation stats (a "
      "run's reward_stats.json, an HF folder's config.json rmjax_reward_mean/std).")
  flags.mark_flags_as_required(["model", "input", "output"])

  def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    stats = reward_stats(model_flag.value) if normalize_flag.value else None  # before loading
    mesh = sharding.make_mesh((-1, 1, 1))
    with sharding.use_mesh(mesh):
      model, tokenizer = load_model(model_flag.value, mesh)
      n = score_file(model, tokenizer, input_flag.value, output_flag.value,
                     batch_size=batch_flag.value, max_len=max_len_flag.value, mesh=mesh,
                     stats=stats)
    print(json.dumps({"scored": n, "output": output_flag.value}))

  app.run(main)


if __name__ == "__main__":
  _cli()
