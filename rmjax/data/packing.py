"""Packed rows (``data.layout='packed'``): the shared-prompt units of several pairs in one row.

# B: pairs, G: groups, R: rows per group, S: row length, K: pair slots per row, L: seq length

A unit is a pair's shared-prompt row (``pipeline.share_prompt``: ``[common prefix | chosen rest |
rejected rest]``). A batch's pairs are split into groups (``pair_groups``) and each group's units
are packed first-fit decreasing into rows of at most ``pack_len`` tokens (of the longest unit,
when longer): of the row buckets, the length that needs the fewest token slots (``row_length``).
Every group of a batch gets the same R rows and K slots a row (the most any group needs, over all
processes, rounded up to ``sizes``), and rows are cut to the smallest length in ``row_lengths``
holding the fullest. Fields added; the pair fields stay as they are, so the
losses, metrics and accumulation read the same pairs:
  packed_tokens int32 [G, R, S]  the units one after the other, right-padded
  packed_mask   int32 [G, R, S]  0 = pad, else the unit's segment id 1, 2, ... in its row
  packed_parts  int32 [G, R, S]  0 = common prefix, 1 = chosen rest, 2 = rejected rest
  packed_pairs  int32 [G, R, K]  the pair (index within its group) in each slot, -1: none
  packed_slot   int32 [B]        the pair's slot in its group, ``row * K + slot``
  packed_index  int32 [B, 2, L]  each token of ``tokens`` in its group's rows, ``row * S +
                                 position`` (pads: the unit's first token, so reads stay local)
Segment ids keep attention within a unit, and positions restart in each
(``llama.positions_and_mask``): every state equals its state in a row of its own.

Groups follow the sharding: group ``g * A + a`` holds the pairs of batch shard ``g`` (a
contiguous block of the process's batch) whose index is ``a`` mod A = ``train.accum_steps``,
the pairs micro-batch ``a`` takes (``train.make_train_step`` takes pairs a, a+A, ...). Sharding
the leading axis of the pair and packed fields alike then puts a group's rows on the device that
holds its pairs, in the batch and in each micro-batch, and ``objective.forward_packed`` gathers
within groups. A packed batch is therefore built for one ``accum_steps``.
"""
from __future__ import annotations

import numpy as np

PACKED_FIELDS = ("packed_tokens", "packed_mask", "packed_parts", "packed_pairs")  # [G, R, ...]
PAIR_FIELDS = ("packed_slot", "packed_index")  # [B], [B, 2, L]


def sizes(limit: int) -> list[int]:
  """Row and slot counts a batch is rounded up to (one compiled shape each): 1..8, then steps
  of at most a quarter (10, 12, 14, 16, 20, ...), ending at ``limit``."""
  out, n = [], 1
  while n < limit:
    out.append(n)
    n += max(1, 2 ** (n.bit_length() - 3))
  return out + [limit]


def pair_groups(n_pairs: int, shards: int, accum_steps: int) -> np.ndarray:
  """The group of each of a process's ``n_pairs`` pairs (module doc): ``shards`` batch shards
  of this process, each cut into ``accum_steps`` micro-batch groups."""
  if shards < 1 or accum_steps < 1 or n_pairs % (shards * accum_steps):
    raise ValueError(f"data.layout='packed': the {n_pairs} pairs of a process's batch do not "
                     f"split into {shards} batch shards x train.accum_steps={accum_steps} equal "
                     "groups; choose train.batch_size accordingly")
  i = np.arange(n_pairs)
  return (i // (n_pairs // shards)) * accum_steps + i % accum_steps


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Items (by index) into bins of ``capacity``: longest first, each into the first bin with
  room; ties in input order, so the packing is a function of the lengths alone."""
  bins, room = [], []
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    j = next((j for j, r in enumerate(room) if r >= lengths[i]), len(bins))
    if j == len(bins):
      bins.append([])
      room.append(capacity)
    bins[j].append(int(i))
    room[j] -= int(lengths[i])
  return bins


def row_length(units_GxN: list[np.ndarray], pack_len: int, row_lengths) -> int:
  """The row capacity for a batch's groups of units: of the ``row_lengths`` from the longest
  unit up to ``pack_len``, the one whose packing has the fewest token slots (rows of the group
  that needs most, rounded as ``sizes``, times the length), the shortest of equals (less
  attention per token); rows longer than ``pack_len`` only to hold a longer unit."""
  longest = max(int(u.max()) for u in units_GxN)
  lengths = sorted({*row_lengths, pack_len})
  top = next((x for x in lengths if x >= max(pack_len, longest)), longest)
  limit = sizes(len(units_GxN[0]))

  def slots(capacity):
    most = max(len(first_fit_decreasing(u, capacity)) for u in units_GxN)
    return next(x for x in limit if x >= most) * capacity

  return min((x for x in {*lengths, top} if longest <= x <= top), key=lambda x: (slots(x), x))


def pack(batch: dict, *, pad_id: int, pack_len: int, row_lengths, shards: int = 1,
         accum_steps: int = 1, agree=lambda counts: counts) -> dict:
  """A batch with shared-prompt rows (``share_prompt``, ``shared_*`` fields) -> the same pairs
  with packed rows instead (module doc). Rows are ``row_length`` long, cut to the smallest of
  ``row_lengths`` that holds the fullest. ``agree``: an int array -> its maxima over processes
  (``pipeline.process_max``), so that all processes' batches have one shape."""
  units_N = batch["shared_mask"].astype(bool).sum(-1)
  n = len(units_N)
  group_N = pair_groups(n, shards, accum_steps)
  n_groups = shards * accum_steps
  per_group = n // n_groups
  members = [np.flatnonzero(group_N == g) for g in range(n_groups)]  # pair order within group
  capacity = int(agree(np.asarray([row_length([units_N[m] for m in members], pack_len,
                                              row_lengths)]))[0])
  rows = [first_fit_decreasing(units_N[m], capacity) for m in members]
  fill = max(int(units_N[members[g]][r].sum()) for g in range(n_groups) for r in rows[g])
  most_rows = max(map(len, rows))
  most_slots = max(len(r) for g in rows for r in g)
  most_rows, most_slots, fill = (int(x) for x in agree(np.asarray([most_rows, most_slots, fill])))
  r_rows = next(x for x in sizes(per_group) if x >= most_rows)
  k_slots = next(x for x in sizes(per_group) if x >= most_slots)
  s = next(x for x in sorted({*row_lengths, capacity}) if x >= fill)
  tokens = np.full((n_groups, r_rows, s), pad_id, np.int32)
  mask, parts = np.zeros_like(tokens), np.zeros_like(tokens)
  slots = np.full((n_groups, r_rows, k_slots), -1, np.int32)
  slot_N, start_N = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for g, group_rows in enumerate(rows):
    for r, row in enumerate(group_rows):
      at = 0
      for k, j in enumerate(row):  # j: index within the group
        i, u = members[g][j], units_N[members[g][j]]
        tokens[g, r, at:at + u] = batch["shared_tokens"][i, :u]
        parts[g, r, at:at + u] = batch["shared_parts"][i, :u]
        mask[g, r, at:at + u] = k + 1
        slots[g, r, k], slot_N[i], start_N[i] = j, r * k_slots + k, r * s + at
        at += u
  out = {k: v for k, v in batch.items() if not k.startswith("shared_")}
  return {**out, "packed_tokens": tokens, "packed_mask": mask, "packed_parts": parts,
          "packed_pairs": slots, "packed_slot": slot_N,
          "packed_index": (start_N[:, None, None] + batch["shared_index"]).astype(np.int32)}


def largest_shapes(n_pairs: int, groups: int, max_len: int, pack_len: int) -> dict:
  """The largest shape of each packed field for ``n_pairs`` pairs in ``groups`` groups (a row
  and a slot per pair, rows of the longest unit, ``2 * max_len``, or ``pack_len``): what a
  compile for the worst batch uses (``rmjax.memory.abstract_batch``)."""
  per_group, s = n_pairs // groups, max(2 * max_len, pack_len)
  return {"packed_tokens": (groups, per_group, s), "packed_mask": (groups, per_group, s),
          "packed_parts": (groups, per_group, s), "packed_pairs": (groups, per_group, per_group),
          "packed_slot": (n_pairs,), "packed_index": (n_pairs, 2, max_len)}
