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

``--layout``: ``shared_prompt`` (default) packs the lines that share a prompt (the same ``prompt``
string, or the same chat before its last turn: best-of-N files) into rows ``[prompt | rest 1 |
rest 2 | ...]`` of at most ``--max_len`` tokens, so the prompt runs once per row; each rest
attends to the shared tokens and to itself only, at the positions it has alone
(``llama.positions_and_mask`` parts), and its reward is read at its last token: the rewards of
scoring each line alone. What is shared is the token prefix common to the row's whole
sequences (under the 'hf' convention a token across the prompt/response boundary may differ
between lines, so it goes to each rest). ``sequences``: one row per line.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from rmjax import sharding
from rmjax.data.pipeline import encode_sequence, fit, kept_prefix
from rmjax.data.readers import iter_jsonl
from rmjax.data.tokenizer import HFTokenizer, common_prefix, is_classifier_folder
from rmjax.indexing import ReadRows

LAYOUTS = ("shared_prompt", "sequences")


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


def prompt_key(record: dict) -> str | None:
  """Lines with equal keys share a prompt: its text, or the chat before the last turn (None for
  a ``text`` line, scored alone)."""
  if "messages" in record:
    return json.dumps(record["messages"][:-1], sort_keys=True)
  return record.get("prompt")


class Row(NamedTuple):
  """One row the model runs: ``[shared | rest 1 | rest 2 | ...]`` with parts 0, 1, 2, ...;
  ``reads``: ``(line, position of its last token)`` for each line it holds."""
  ids: list[int]
  parts: list[int]
  reads: list[tuple[int, int]]


def line_ids(prompt_ids: list[int], response_ids: list[int], max_len: int, tokenizer) -> list[int]:
  """The tokens a line is scored on: its sequence, cut to ``max_len`` as training cuts it."""
  keep = kept_prefix(tokenizer, prompt_ids)
  if not sum(fit(len(prompt_ids), len(response_ids), max_len, keep)):
    return prompt_ids + response_ids
  tokens, mask, _ = encode_sequence(prompt_ids, response_ids, max_len, tokenizer.pad_id, keep=keep)
  return tokens[mask.astype(bool)].tolist()


def pack_row(seqs: list[list[int]], lines: list[int]) -> Row:
  """The lines (sorted by length) in one row; the shared part is their common token prefix, at
  most the shortest minus its last token, so every line has a rest whose end the reward reads."""
  shared = min([len(seqs[lines[0]]) - 1] + [common_prefix(seqs[lines[0]], seqs[i])
                                            for i in lines[1:]])
  ids, parts, reads = list(seqs[lines[0]][:shared]), [0] * shared, []
  for k, i in enumerate(lines):
    ids += seqs[i][shared:]
    parts += [k + 1] * (len(seqs[i]) - shared)
    reads.append((i, len(ids) - 1))
  return Row(ids, parts, reads)


def pack_group(seqs: list[list[int]], lines: list[int], cap: int) -> list[Row]:
  """The lines of one prompt, shortest first, as many per row as fit in ``cap`` tokens."""
  rows, row, shared = [], [], 0
  for i in sorted(lines, key=lambda i: len(seqs[i])):
    if row:
      shared = min(shared, common_prefix(seqs[row[0]], seqs[i]))
      if shared + sum(len(seqs[j]) - shared for j in row + [i]) <= cap:
        row.append(i)
        continue
      rows.append(pack_row(seqs, row))
    row, shared = [i], len(seqs[i]) - 1
  return rows + [pack_row(seqs, row)]


def pack_rows(seqs: list[list[int]], keys: list, max_len: int, layout: str) -> list[Row]:
  """``sequences``: a row per line. ``shared_prompt``: the lines of each key (``prompt_key``)
  packed (``pack_group``) under the row length, a bucket up to ``max_len``, that leaves the
  fewest tokens to run once each row is padded to its bucket (the smaller length on a tie)."""
  if layout == "sequences":
    return [Row(s, [0] * len(s), [(i, len(s) - 1)]) for i, s in enumerate(seqs)]
  groups = {}
  for i, key in enumerate(keys):
    groups.setdefault(("line", i) if key is None else ("key", key), []).append(i)
  rows = []
  for lines in groups.values():
    cap = bucket_length(max(len(seqs[i]) for i in lines), max_len)
    caps = [cap << k for k in range(max_len.bit_length()) if cap << k < max_len] + [max_len]
    options = [pack_group(seqs, lines, c) for c in caps]
    rows += min(options, key=lambda rs: sum(bucket_length(len(r.ids), max_len) for r in rs))
  return rows


def row_shape(rows: list[Row], max_len: int) -> tuple[int, int]:
  """``(length, reads)`` a batch of ``rows`` runs at: the bucket of the longest row, and the most
  reads of a row rounded up to a power of two (few compiled shapes)."""
  return (bucket_length(max(len(row.ids) for row in rows), max_len),
          1 << (max(len(row.reads) for row in rows) - 1).bit_length())


def row_arrays(rows: list[Row], length: int, n_reads: int, pad_id: int) -> dict:
  """``{tokens, mask, parts}_BxL`` and ``reads_BxR`` (each row's read positions, the last one
  repeated up to ``n_reads``) of ``rows``, right-padded to ``length``."""
  batch = {k: np.zeros((len(rows), n), np.int32)
           for k, n in (("tokens", length), ("mask", length), ("parts", length),
                        ("reads", n_reads))}
  batch["tokens"][:] = pad_id
  for b, row in enumerate(rows):
    n = len(row.ids)
    batch["tokens"][b, :n], batch["mask"][b, :n], batch["parts"][b, :n] = row.ids, 1, row.parts
    ends = [end for _, end in row.reads]
    batch["reads"][b] = ends + ends[-1:] * (n_reads - len(ends))
  return batch


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


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens_BxL, mask_BxL, parts_BxL, reads_BxR):
  """Rewards at ``reads`` ([B, R]); the last block runs at those positions alone
  (``Llama.run_from``): the same rewards for less work. Compiled once per model structure and
  shape, across ``score_file`` calls."""
  model = nnx.merge(graphdef, state)
  return model(tokens_BxL, mask_BxL, ReadRows(reads_BxR, reads_BxR), parts_BxL=parts_BxL)[0]


def score_file(model, tokenizer, input_path: str, output_path: str, *, batch_size: int = 16,
               max_len: int = 2048, mesh=None, stats: dict | None = None,
               layout: str = "shared_prompt") -> int:
  """Scores every line of ``input_path`` into ``output_path``; returns the number of lines.
  ``stats``: ``{"mean", "std"}`` to write ``(r - mean) / std`` (``reward_stats``). ``layout``:
  ``shared_prompt`` or ``sequences`` (module doc); ``batch_size`` rows per forward pass.

  The output is written to ``<output>.tmp`` and renamed when complete, so a crash never leaves a
  partial file under the final name (nor destroys an earlier output)."""
  if layout not in LAYOUTS:
    raise ValueError(f"--layout={layout!r}: expected one of {LAYOUTS}")
  records, encoded = [], []
  for lineno, record in iter_jsonl(input_path):  # malformed JSON / UTF-8: path:line errors
    where = f"{input_path}:{lineno}"
    try:
      encoded.append(encode_record(check_record(record, where), tokenizer))
    except ValueError as e:
      raise ValueError(e if str(e).startswith(where) else f"{where}: {e}") from None
    records.append(record)
  seqs = [line_ids(p, r, max_len, tokenizer) for p, r in encoded]
  rows = pack_rows(seqs, [prompt_key(r) for r in records], max_len, layout)
  n_dev = mesh.size if mesh is not None else 1
  batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
  graphdef, state = nnx.split(model)
  rows.sort(key=lambda row: len(row.ids))
  rewards = np.zeros(len(encoded), np.float32)
  for start in tqdm(range(0, len(rows), batch_size), desc="score", unit="batch"):
    batch_rows = rows[start:start + batch_size]
    fill = batch_rows[-1:] * (batch_size - len(batch_rows))  # fixed batch shape: pad with a repeat
    batch = row_arrays(batch_rows + fill, *row_shape(batch_rows, max_len), tokenizer.pad_id)
    if mesh is not None:
      batch = sharding.host_to_global(batch, mesh)
    out_BxR = np.asarray(jax.device_get(forward(graphdef, state, batch["tokens"], batch["mask"],
                                                batch["parts"], batch["reads"])))
    for b, row in enumerate(batch_rows):
      for r, (i, _) in enumerate(row.reads):
        rewards[i] = out_BxR[b, r]
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
  batch_flag = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
  layout_flag = flags.DEFINE_enum(
      "layout", "shared_prompt", LAYOUTS, "shared_prompt: lines with one prompt share a row, the "
      "prompt once (same rewards); sequences: a row per line.")
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
                     stats=stats, layout=layout_flag.value)
    print(json.dumps({"scored": n, "output": output_flag.value}))

  app.run(main)


if __name__ == "__main__":
  _cli()
