"""Tokenise-and-pad for preference pairs, and the grain pipelines that batch them.

A batch is a dict of numpy arrays, pair-major so that sharding the leading axis keeps a pair's
chosen (index 0) and rejected (index 1) sequences on the same device:
  tokens   int32 [B, 2, L]
  mask     int32 [B, 2, L]  1 = real token (prompt or response)
  response int32 [B, 2, L]  1 = response token (contrastive states are sampled only here)
  margin   f32   [B]        Bradley-Terry margin (0 unless the source gives one)
"""
from __future__ import annotations

import grain
import jax
import numpy as np

FIELDS = ("tokens", "mask", "response", "margin")


def encode_sequence(prompt_ids: list[int], response_ids: list[int], max_len: int, pad_id: int,
                    padding_side: str = "right") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One padded row: (tokens_L, mask_L, response_L). An over-long prompt loses its left end."""
  if not response_ids:
    raise ValueError("empty response")
  if len(response_ids) > max_len:
    raise ValueError(f"response of {len(response_ids)} tokens exceeds max_len={max_len}")
  prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_len):]
  ids = prompt_ids + response_ids
  resp = [0] * len(prompt_ids) + [1] * len(response_ids)
  pad = max_len - len(ids)
  if padding_side == "right":
    ids, resp, real = ids + [pad_id] * pad, resp + [0] * pad, [1] * len(ids) + [0] * pad
  elif padding_side == "left":
    ids, resp, real = [pad_id] * pad + ids, [0] * pad + resp, [0] * pad + [1] * len(ids)
  else:
    raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
  return (np.asarray(ids, np.int32), np.asarray(real, np.int32), np.asarray(resp, np.int32))


def encode_pair(example: dict, tokenizer, max_len: int, padding_side: str = "right") -> dict:
  """``{prompt, chosen, rejected[, margin]}`` -> the batch fields of one pair."""
  prompt_ids = tokenizer.encode(example["prompt"])
  rows = []
  for side in ("chosen", "rejected"):
    try:
      rows.append(encode_sequence(prompt_ids, tokenizer.encode(example[side]), max_len,
                                  tokenizer.pad_id, padding_side))
    except ValueError as e:
      raise ValueError(f"example {example.get('id', '?')}: field {side!r}: {e}") from None
  tokens, mask, response = (np.stack(x) for x in zip(*rows))
  return {"tokens": tokens, "mask": mask, "response": response,
          "margin": np.float32(example.get("margin", 0.0))}


def train_dataset(source, tokenizer, *, global_batch_size: int, max_len: int, seed: int,
                  padding_side: str = "right") -> grain.MapDataset:
  """Infinite, reshuffled each epoch, this process's share of every global batch.

  Process p takes the p-th contiguous block of each global batch, the rows its devices hold in
  the global array, so the global batch (and its row order) does not depend on the process count.
  """
  n_proc = jax.process_count()
  if global_batch_size % n_proc:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by {n_proc} processes")
  return (grain.MapDataset.source(source)
          .shuffle(seed=seed)
          .repeat()
          .map(lambda ex: encode_pair(ex, tokenizer, max_len, padding_side))
          .batch(global_batch_size // n_proc, drop_remainder=True)
          [jax.process_index()::n_proc])


def eval_batches(source, tokenizer, *, global_batch_size: int, max_len: int,
                 padding_side: str = "right"):
  """One pass over ``source`` in fixed-shape batches (so eval compiles once).

  Yields ``(local_batch, n_real)``: this process's rows of each global batch, and how many rows
  of the global batch are real (the last one is filled up by repeating the final example).
  """
  n, n_proc = len(source), jax.process_count()
  per_proc = global_batch_size // n_proc
  for start in range(0, n, global_batch_size):
    first = start + jax.process_index() * per_proc
    pairs = [encode_pair(source[min(i, n - 1)], tokenizer, max_len, padding_side)
             for i in range(first, first + per_proc)]
    yield {k: np.stack([p[k] for p in pairs]) for k in FIELDS}, min(global_batch_size, n - start)
