"""Tokenise-and-pad for preference pairs, and the grain pipelines that batch them.

A batch is a dict of numpy arrays, pair-major so that sharding the leading axis keeps a pair's
chosen (index 0) and rejected (index 1) sequences on the same device:
  tokens    int32 [B, 2, L]
  mask      int32 [B, 2, L]  1 = real token (prompt or response)
  response  int32 [B, 2, L]  1 = response token (contrastive states are sampled only here)
  margin    f32   [B]        Bradley-Terry margin (0 unless the source gives one)
  truncated int32 [B, 2]     tokens cut to fit max_len (0 for most rows)

Truncation: an over-long pair loses the left end of its prompt, after the tokenizer's prefix (BOS),
which is kept; a response longer than max_len on its own keeps its first tokens and its final one
(the EOS the reward reads), as the official code forces EOS. Every cut is counted in
``truncated`` and by ``length_report``.

Layouts (``layout``): ``pairs`` (the fields above: the model runs two rows per pair) or
``shared_prompt``, which adds one row per pair holding the two sequences' common prefix once
(the prompt, and any response tokens both sides begin with) then the rest of each:
  shared_tokens int32 [B, S]     [shared | chosen rest | rejected rest | pad]  (right-padded)
  shared_mask   int32 [B, S]     1 = real token (the segment id, ``llama.positions_and_mask``)
  shared_parts  int32 [B, S]     0 = shared, 1 = chosen rest, 2 = rejected rest
  shared_index  int32 [B, 2, L]  the row position of each token of ``tokens`` (0 on pads)
The model runs on the row (the rejected rest never sees the chosen one; both continue the
shared positions), and the losses read its states through ``shared_index`` in the pair fields'
coordinates, which stay as they are: same loss, metrics and gradients, fewer tokens. A row
holds at most ``2 * max_len`` tokens.

``packed`` (``rmjax.data.packing``) packs the shared-prompt rows of several pairs into rows of
``pack_len`` tokens (default ``2 * max_len``), with segment ids that keep the pairs apart: fields
``packed_*`` instead of ``shared_*``, the pair fields as they are.

Length bucketing (``buckets``): each training batch is trimmed to the smallest bucket length that
holds its longest row (over all processes' shares of the global batch, which must agree on a
shape), so the train step compiles once per bucket (a handful of shapes), and
``sort_window`` batches at a time are sorted by length (of the rows the model runs: a pair's longer
sequence, or its shared row) before being cut into batches (whose order is then shuffled), so a
batch holds rows of similar length and little padding. Both layouts train on the same pairs in
each window; with ``sort_window=1`` in the same batches.
"""
from __future__ import annotations

import functools
import json

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from rmjax.data import packing

FIELDS = ("tokens", "mask", "response", "margin", "truncated")
SHARED_FIELDS = ("shared_tokens", "shared_mask", "shared_parts")  # [B, S]; + shared_index
LAYOUTS = ("pairs", "shared_prompt", "packed")


def fit(n_prompt: int, n_response: int, max_len: int, keep: int = 0) -> tuple[int, int]:
  """Tokens to cut ``(from the prompt's left end after its first keep, from the response's
  middle)``; ``keep`` leading prompt tokens (the tokenizer's prefix) are never cut."""
  keep = min(keep, n_prompt, max_len - 1)
  response_cut = max(0, n_response - (max_len - keep))
  prompt_cut = min(n_prompt - keep, max(0, n_prompt + n_response - response_cut - max_len))
  return prompt_cut, response_cut


def kept_prefix(tokenizer, prompt_ids: list[int]) -> int:
  """How many leading prompt tokens a cut keeps: the tokenizer's prefix (BOS), when present."""
  prefix = list(getattr(tokenizer, "prefix_ids", ()))
  return len(prefix) if prompt_ids[:len(prefix)] == prefix else 0


def encode_sequence(prompt_ids: list[int], response_ids: list[int], max_len: int, pad_id: int,
                    padding_side: str = "right", keep: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One padded row: (tokens_L, mask_L, response_L), cut to max_len as the module says;
  ``keep``: leading prompt tokens never cut (``kept_prefix``)."""
  if not response_ids:
    raise ValueError("empty response")
  keep = min(keep, len(prompt_ids), max_len - 1)
  prompt_cut, response_cut = fit(len(prompt_ids), len(response_ids), max_len, keep)
  if response_cut:
    response_ids = response_ids[:max_len - keep - 1] + response_ids[-1:]
  prompt_ids = prompt_ids[:keep] + prompt_ids[keep + prompt_cut:]
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


def encode_texts(example: dict, side: str, tokenizer) -> tuple[list[int], list[int]]:
  """(prompt_ids, response_ids) of one side: chat messages if the example has them, else text."""
  messages = example.get(f"{side}_messages")
  if messages:
    return tokenizer.encode_messages(json.loads(messages))
  return tokenizer.encode_prompt_response(example["prompt"], example[side])


def encode_pair(example: dict, tokenizer, max_len: int, padding_side: str = "right") -> dict:
  """``{prompt, chosen, rejected[, margin, *_messages]}`` -> the batch fields of one pair."""
  rows, truncated = [], []
  for side in ("chosen", "rejected"):
    try:
      prompt_ids, response_ids = encode_texts(example, side, tokenizer)
      keep = kept_prefix(tokenizer, prompt_ids)
      rows.append(encode_sequence(prompt_ids, response_ids, max_len, tokenizer.pad_id,
                                  padding_side, keep))
    except ValueError as e:
      raise ValueError(f"example {example.get('id', '?')}: field {side!r}: {e}") from None
    truncated.append(sum(fit(len(prompt_ids), len(response_ids), max_len, keep)))
  tokens, mask, response = (np.stack(x) for x in zip(*rows))
  return {"tokens": tokens, "mask": mask, "response": response,
          "margin": np.float32(example.get("margin", 0.0)),
          "truncated": np.asarray(truncated, np.int32)}


def share_prompt(pair: dict, pad_id: int) -> dict:
  """One encoded pair (``encode_pair``) plus its shared-prompt row, ``2 * max_len`` long (see
  the module doc): the common prefix of the two sequences' real tokens is written once."""
  real_L = pair["mask"].astype(bool)
  seqs = [pair["tokens"][s][real_L[s]] for s in (0, 1)]
  n = min(map(len, seqs))
  differ = np.flatnonzero(seqs[0][:n] != seqs[1][:n])
  common = int(differ[0]) if differ.size else n
  row = np.concatenate([seqs[0], seqs[1][common:]])
  parts = np.repeat([0, 1, 2], [common, len(seqs[0]) - common, len(seqs[1]) - common])
  index = np.zeros(real_L.shape, np.int32)
  for s, shift in ((0, 0), (1, len(seqs[0]) - common)):  # token k of side s >= common: shifted
    k = np.arange(len(seqs[s]))
    index[s, real_L[s]] = np.where(k < common, k, k + shift)
  pad = 2 * real_L.shape[1] - len(row)
  return {**pair, "shared_tokens": np.pad(row, (0, pad), constant_values=pad_id).astype(np.int32),
          "shared_mask": np.pad(np.ones(len(row), np.int32), (0, pad)),
          "shared_parts": np.pad(parts, (0, pad)).astype(np.int32), "shared_index": index}


def model_lengths(batch: dict) -> np.ndarray:
  """Per pair, the longest row the model runs for it: its shared row, or its longer sequence."""
  if "shared_mask" in batch:
    return batch["shared_mask"].astype(bool).sum(-1)
  return batch["mask"].sum(-1).max(-1)


def trim(batch: dict, length: int, padding_side: str) -> dict:
  """The batch with its sequence axis cut to ``length`` (only padding is removed); the shared
  rows (``share_prompt``) keep theirs (``trim_shared``)."""
  cut = slice(None, length) if padding_side == "right" else slice(-length, None)
  return {k: v[..., cut] if v.ndim == 3 else v for k, v in batch.items()}


def trim_shared(batch: dict, length: int) -> dict:
  """The shared rows cut to ``length`` (right-padded: only padding is removed)."""
  return {k: v[:, :length] if k in SHARED_FIELDS else v for k, v in batch.items()}


def process_max(value):
  """The largest ``value`` (an int, or elementwise an int array) over all processes; every
  process must call it at the same point."""
  if jax.process_count() == 1:
    return value
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
  return int(np.max(gathered)) if np.ndim(value) == 0 else np.max(gathered, axis=0)


class BucketTrim:
  """A batch -> trimmed to the smallest bucket holding the longest row of every process's batch,
  so that all processes' shares of a global batch have one shape. Shared rows (``share_prompt``)
  are trimmed to the smallest bucket or sum of two buckets (``max_len`` included) that holds
  them: a row holds up to two sequences, and the sums keep its padding as fine as theirs."""

  def __init__(self, buckets, max_len: int, padding_side: str):
    self.buckets = sorted({b for b in buckets if b < max_len} | {max_len})
    self.shared_buckets = sorted({a + b for a in [0, *self.buckets] for b in self.buckets})
    self.padding_side = padding_side

  def __call__(self, batch: dict) -> dict:
    longest = process_max(int(batch["mask"].sum(-1).max()))
    batch = trim(batch, next(b for b in self.buckets if b >= longest), self.padding_side)
    if "shared_mask" in batch:
      longest = process_max(int(model_lengths(batch).max()))
      batch = trim_shared(batch, next(b for b in self.shared_buckets if b >= longest))
    return batch


class Batcher(grain.experimental.FlatMapTransform):
  """A window of ``window * batch_size`` encoded pairs -> ``window`` batches (see module doc)."""

  def __init__(self, *, batch_size: int, window: int, seed: int):
    self.max_fan_out, self.batch_size, self.window = window, batch_size, window
    self.seed = seed

  def flat_map(self, indexed_window):
    index, rows = indexed_window
    if self.window > 1:
      lengths_N = model_lengths(rows)
      order = np.argsort(lengths_N, kind="stable")
      rows = {k: v[order] for k, v in rows.items()}
    batches = [{k: v[i:i + self.batch_size] for k, v in rows.items()}
               for i in range(0, self.window * self.batch_size, self.batch_size)]
    if self.window > 1:
      rng = np.random.default_rng([self.seed, index])
      batches = [batches[i] for i in rng.permutation(self.window)]
    return batches


def train_dataset(source, tokenizer, *, global_batch_size: int, max_len: int, seed: int,
                  padding_side: str = "right", buckets=(), sort_window: int = 1,
                  layout: str = "pairs", pack_len: int = 0, pack_shards: int = 1,
                  accum_steps: int = 1, num_threads: int = 0, num_workers: int = 0,
                  shard_options: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
  """Infinite, reshuffled each epoch, this process's share of every global batch.

  ``shard_options`` (default ``ShardByJaxProcess``) picks this process's share: window
  ``shard_index, shard_index + shard_count, ...`` of the shuffled stream cut into windows of
  ``sort_window`` local batches. With ``sort_window=1`` a process holds a contiguous block of each
  global batch, the rows its devices hold, so the global batch and its row order do not depend on
  the process count. ``num_threads`` read and
  tokenise windows in parallel threads, ``num_workers`` > 0 adds that many worker processes
  (grain ``mp_prefetch``, a few seconds to start); neither changes the batches or their order,
  and the iterator state restores exactly. ``layout``: ``pairs``, ``shared_prompt`` or
  ``packed`` (module doc); shared rows are always trimmed to a bucket (``BucketTrim``; ``max_len``
  or twice it without ``buckets``). ``packed``: rows of ``pack_len`` tokens (0: ``2 * max_len``)
  packed within groups of the pairs each of this process's ``pack_shards`` batch shards holds in
  each of ``accum_steps`` micro-batches (``rmjax.data.packing``), in this thread (after
  ``BucketTrim``), so the iterator state is the same as for the other layouts.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"data.layout={layout!r}: expected one of {LAYOUTS}")
  shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if global_batch_size % shard.shard_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by {shard.shard_count} "
                     "processes")
  batch_size = global_batch_size // shard.shard_count
  if layout == "packed":
    packing.pair_groups(batch_size, pack_shards, accum_steps)  # an error now, not mid-run
  batcher = Batcher(batch_size=batch_size, window=sort_window, seed=seed)
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat()
        .map(lambda ex: encode_pair(ex, tokenizer, max_len, padding_side)))
  if layout != "pairs":
    ds = ds.map(lambda pair: share_prompt(pair, tokenizer.pad_id))
  ds = (ds.batch(batch_size * sort_window, drop_remainder=True)
        [shard.shard_index::shard.shard_count]
        .map_with_index(lambda i, rows: (i, rows))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=max(1, num_threads))))
  if num_workers:  # workers tokenise whole windows, which come back in order
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  ds = grain.experimental.FlatMapIterDataset(ds, batcher)
  # in this (the training loop's) thread: all processes agree on each batch's length
  trim_to = BucketTrim(buckets, max_len, padding_side)
  if buckets or layout != "pairs":
    ds = ds.map(trim_to)
  if layout == "packed":
    pack_len = pack_len or 2 * max_len
    ds = ds.map(functools.partial(
        packing.pack, pad_id=tokenizer.pad_id, pack_len=pack_len,
        row_lengths=sorted({*trim_to.shared_buckets, pack_len}),
        shards=pack_shards, accum_steps=accum_steps, agree=process_max))
  return ds


def length_report(source, tokenizer, max_len: int, limit: int | None = None) -> dict:
  """Token lengths of (the first ``limit``) pairs' rows, what ``max_len`` would cut, and how much
  of the rejected responses the chosen sequences share token for token (``shared_response``:
  before their first differing token, where no contrastive negative is drawn)."""
  n = len(source) if limit is None else min(limit, len(source))
  lengths, cuts, shared, rejected, no_negatives = [], [], 0, 0, 0
  for i in range(n):
    ids = {}
    for side in ("chosen", "rejected"):
      prompt_ids, response_ids = encode_texts(source[i], side, tokenizer)
      ids[side] = (prompt_ids + response_ids, len(prompt_ids))
      lengths.append(len(prompt_ids) + len(response_ids))
      cuts.append(sum(fit(len(prompt_ids), len(response_ids), max_len,
                          kept_prefix(tokenizer, prompt_ids))))
    (chosen, _), (other, n_prompt) = ids["chosen"], ids["rejected"]
    first = next((k for k, (a, b) in enumerate(zip(chosen, other)) if a != b),
                 min(len(chosen), len(other)))
    shared += min(max(first - n_prompt, 0), len(other) - n_prompt)
    rejected += len(other) - n_prompt
    no_negatives += first >= len(other)
  lengths, cuts = np.asarray(lengths), np.asarray(cuts)
  return {"pairs": n, "rows_truncated": int((cuts > 0).sum()), "tokens_cut": int(cuts.sum()),
          "mean_length": float(lengths.mean()),
          **{f"p{q}_length": float(np.percentile(lengths, q)) for q in (50, 90, 99, 100)},
          "shared_response": shared / max(rejected, 1), "pairs_without_negatives": no_negatives}


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
