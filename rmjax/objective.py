"""From a batch of pairs to the training objective: one forward pass, then the weighted terms.

# B: batch of pairs, L: sequence length, D: model dim

The terms come from ``config.loss``: ``bt_weight`` x Bradley-Terry, ``beta`` x the goal-conditioned
contrastive term, and any user terms ``"package.module:function=weight"`` (comma-separated in
``loss.custom``), each called as ``fn(out: PairOutputs, key)``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import losses
from rmjax.indexing import ReadRows, gather_rows, last_token_index

Term = tuple[str, float, Callable]


@dataclasses.dataclass(frozen=True)
class Objective:
  """The ``(name, weight, fn)`` terms; ``sparse``: run the last block only at the rows they
  read (``loss.sparse_last_block``, and every term is built-in: BT, contrastive)."""
  terms: tuple[Term, ...]
  sparse: bool = False


def load_function(spec: str) -> Callable:
  """``package.module:function`` -> the function, with an error that names what is missing."""
  module_name, sep, fn_name = spec.partition(":")
  if not sep or not module_name or not fn_name:
    raise ValueError(f"loss term {spec!r}: expected 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"loss term {spec!r}: cannot import {module_name!r}: {e}") from None
  if not callable(fn := getattr(module, fn_name, None)):
    raise ValueError(f"loss term {spec!r}: {module_name} has no function {fn_name!r}")
  return fn


def build_terms(loss_cfg) -> Objective:
  """``(name, weight, fn)`` for every term with a non-zero weight, and whether they are sparse."""
  terms = []
  if loss_cfg.bt_weight:
    terms.append(("bt", float(loss_cfg.bt_weight), losses.bt_term))
  if loss_cfg.beta:
    c = loss_cfg.contrastive
    terms.append(("contrastive", float(loss_cfg.beta), losses.ContrastiveTerm(
        mode=c.mode, goal=c.goal, num_samples=c.num_samples, num_goal_samples=c.num_goal_samples,
        temperature=c.temperature, reduction=c.reduction)))
  if center := loss_cfg.get("center_rewards", 0.0):  # absent from configs saved before it
    terms.append(("center", float(center), losses.center_term))
  for item in filter(None, (s.strip() for s in loss_cfg.custom.split(","))):
    spec, sep, weight = item.rpartition("=")
    if not sep:
      raise ValueError(f"loss.custom item {item!r}: expected 'package.module:function=weight'")
    terms.append((spec.rpartition(":")[2], float(weight), load_function(spec)))
  if not terms:
    raise ValueError("config.loss: every term has weight 0; nothing to train")
  sparse = bool(loss_cfg.get("sparse_last_block", True)) and all(
      fn in (losses.bt_term, losses.center_term) or isinstance(fn, losses.ContrastiveTerm)
      for _, _, fn in terms)
  return Objective(tuple(terms), sparse)


def forward_pairs(model, batch, start_layer: int = 0, states_Bx2xP=None,
                  identity=None) -> losses.PairOutputs:
  """Runs chosen and rejected sequences through the model in one pass of 2B sequences.

  A batch from the loss lab also carries ``features`` [B, 2, L, D] (the cached hidden states
  entering block ``start_layer``); the rest of the model runs on them (``tokens`` then only say
  which states are negatives and which sequences are copies: ``pair_identity``, or ``identity``
  when the caller has it). ``states``: compute (and return as ``h``) only the states at these
  positions of each sequence (``ReadRows``), and the reward. A batch with ``shared_tokens``
  (``data.layout='shared_prompt'``) runs one row per pair instead, one with ``packed_tokens``
  (``'packed'``) rows of several pairs: ``forward_shared``, ``forward_packed``; the outputs are
  the same.
  """
  b, _, l = batch["mask"].shape
  rows_forward = (forward_packed if "packed_tokens" in batch
                  else forward_shared if "shared_tokens" in batch else None)
  if rows_forward is not None:
    if "features" in batch or start_layer:
      raise ValueError("data.layout='shared_prompt' and 'packed' run the model from tokens; "
                       "cached features (the loss lab) are per sequence: use "
                       "data.layout='pairs'")
    reward_Bx2, h_chosen, h_rejected = rows_forward(model, batch, states_Bx2xP)
  else:
    mask_2BxL = batch["mask"].reshape(2 * b, l)
    rows = None if states_Bx2xP is None else ReadRows.at(
        states_Bx2xP.reshape(2 * b, states_Bx2xP.shape[-1]), mask_2BxL)
    if "features" in batch:
      reward_2B, h_2BxLxD = model.from_features(
          batch["features"].reshape(2 * b, l, -1), mask_2BxL, start_layer, rows)
    else:
      reward_2B, h_2BxLxD = model(batch["tokens"].reshape(2 * b, l), mask_2BxL, rows)
    reward_Bx2 = reward_2B.reshape(b, 2)
    h_Bx2xLxD = h_2BxLxD.reshape(b, 2, *h_2BxLxD.shape[1:])
    h_chosen, h_rejected = h_Bx2xLxD[:, 0], h_Bx2xLxD[:, 1]
  negatives_BxL, chosen_id_Bx2 = pair_identity(batch) if identity is None else identity
  return losses.PairOutputs(
      reward_chosen_B=reward_Bx2[:, 0], reward_rejected_B=reward_Bx2[:, 1],
      h_chosen_BxLxD=h_chosen, h_rejected_BxLxD=h_rejected,
      mask_chosen_BxL=batch["mask"][:, 0], mask_rejected_BxL=batch["mask"][:, 1],
      response_chosen_BxL=batch["response"][:, 0], response_rejected_BxL=batch["response"][:, 1],
      margin_B=batch["margin"], negatives_BxL=negatives_BxL, chosen_id_Bx2=chosen_id_Bx2)


def last_tokens(batch) -> jax.Array:
  """[B, 2]: the index of each sequence's last real token, where its reward is read."""
  b, _, l = batch["mask"].shape
  return last_token_index(batch["mask"].reshape(2 * b, l)).reshape(b, 2)


def forward_shared(model, batch, states_Bx2xP=None):
  """``(reward_Bx2, h_chosen, h_rejected)`` from one row per pair, ``[shared | chosen rest |
  rejected rest]`` (``rmjax.data.pipeline.share_prompt``), in the per-sequence coordinates of
  ``tokens``/``mask`` (``shared_index`` maps them into the row), so the losses sample and read
  the same states as with one row per sequence. ``states``: as in ``forward_pairs``."""
  b = batch["mask"].shape[0]
  index_Bx2xL = batch["shared_index"]
  reward_rows_Bx2 = jnp.take_along_axis(index_Bx2xL, last_tokens(batch)[..., None], axis=2)[..., 0]
  run = functools.partial(model, batch["shared_tokens"], batch["shared_mask"],
                          parts_BxL=batch["shared_parts"])
  if states_Bx2xP is None:
    reward_Bx2, h_BxLxD = run(ReadRows(None, reward_rows_Bx2))
    return reward_Bx2, gather_rows(h_BxLxD, index_Bx2xL[:, 0]), gather_rows(h_BxLxD,
                                                                           index_Bx2xL[:, 1])
  p = states_Bx2xP.shape[-1]
  where_Bx2xP = jnp.take_along_axis(index_Bx2xL, states_Bx2xP, axis=2)
  reward_Bx2, h_BxQxD = run(ReadRows(where_Bx2xP.reshape(b, 2 * p), reward_rows_Bx2))
  return reward_Bx2, h_BxQxD[:, :p], h_BxQxD[:, p:]


def _in_groups(x_GxNx, index_GxM) -> jax.Array:
  """``x[g, index[g, m]]``: a gather within each group (the leading axis, which the batch
  sharding splits), so that it stays on the device holding the group."""
  return jax.vmap(lambda x, i: x[i])(x_GxNx, index_GxM)


def forward_packed(model, batch, states_Bx2xP=None):
  """``(reward_Bx2, h_chosen, h_rejected)`` from packed rows (``rmjax.data.packing``), in the
  per-sequence coordinates as ``forward_shared``. The rows run as ``[G * R, S]``; row ``r``
  reads its K slots' rewards (R = 2K reads) and sampled states, and the pairs take theirs back
  from their slot (``packed_slot``); every gather is within a group."""
  g, r, s = batch["packed_tokens"].shape
  k = batch["packed_pairs"].shape[-1]
  b, _, l = batch["mask"].shape
  in_groups = lambda x: x.reshape(g, b // g, *x.shape[1:])
  slot_pairs_GxRK = batch["packed_pairs"].reshape(g, r * k)
  empty_GxRK = slot_pairs_GxRK < 0

  def per_slot(where_Bx2xN):  # the pairs' group coordinates -> each row's slots' positions
    where_GxRKx2xN = _in_groups(in_groups(where_Bx2xN), jnp.maximum(slot_pairs_GxRK, 0))
    where_GxRKx2xN = jnp.where(empty_GxRK[:, :, None, None], 0, where_GxRKx2xN % s)
    return where_GxRKx2xN.reshape(g * r, k * 2 * where_Bx2xN.shape[-1])

  index_Bx2xL = batch["packed_index"]
  reward_rows = per_slot(jnp.take_along_axis(index_Bx2xL, last_tokens(batch)[..., None], axis=2))
  states = None if states_Bx2xP is None else per_slot(
      jnp.take_along_axis(index_Bx2xL, states_Bx2xP, axis=2))
  reward_GRx2K, h = model(batch["packed_tokens"].reshape(g * r, s),
                          batch["packed_mask"].reshape(g * r, s), ReadRows(states, reward_rows),
                          parts_BxL=batch["packed_parts"].reshape(g * r, s))
  slot_GxBg, d = in_groups(batch["packed_slot"]), h.shape[-1]
  reward_Bx2 = _in_groups(reward_GRx2K.reshape(g, r * k, 2), slot_GxBg).reshape(b, 2)
  if states_Bx2xP is None:  # every token's state, from its place in its group's rows
    h_GxNxD = _in_groups(h.reshape(g, r * s, d), in_groups(index_Bx2xL).reshape(g, -1))
    h_Bx2xNxD = h_GxNxD.reshape(b, 2, l, d)
  else:  # the sampled states, from their pair's slot
    p = states_Bx2xP.shape[-1]
    h_Bx2xNxD = _in_groups(h.reshape(g, r * k, 2, p, d), slot_GxBg).reshape(b, 2, p, d)
  return reward_Bx2, h_Bx2xNxD[:, 0], h_Bx2xNxD[:, 1]


def pair_identity(batch) -> tuple[jax.Array, jax.Array]:
  """From the tokens: where negatives may be drawn (the rejected response from its first token
  that differs from the chosen sequence), and the chosen sequence's id (copies share it)."""
  tokens, mask = batch["tokens"], batch["mask"]
  diverged_BxL = losses.diverged(tokens[:, 0], mask[:, 0], tokens[:, 1], mask[:, 1])
  negatives_BxL = batch["response"][:, 1].astype(bool) & diverged_BxL
  return negatives_BxL, losses.sequence_id(tokens[:, 0], mask[:, 0])


def sampled_rows(batch, key, terms: tuple[Term, ...], negatives_BxL):
  """The sparse path: every contrastive term samples its states before the forward pass.

  Returns the rows to compute, [B, 2, P] (chosen: each term's sources then goals; rejected: its
  negatives; padded with row 0), and the terms re-pointed at those rows of the compact ``h``.
  Each term samples with the key the dense path gives it, so both see the same states.
  ``negatives``: ``pair_identity``'s.
  """
  b = batch["mask"].shape[0]
  rows_c, rows_r, calls = [], [], []
  for i, (name, weight, fn) in enumerate(terms):
    if isinstance(fn, losses.ContrastiveTerm):
      idx = fn.sample(jax.random.fold_in(key, i), batch["response"][:, 0], negatives_BxL,
                      batch["mask"][:, 0])
      s, g = idx.goal_BxSxG.shape[1:]
      start_c, start_r = sum(r.shape[1] for r in rows_c), sum(r.shape[1] for r in rows_r)
      rows_c += [idx.src_BxS, idx.goal_BxSxG.reshape(b, s * g)]
      rows_r.append(idx.neg_BxS)
      compact = idx._replace(src_BxS=_count(start_c, (b, s)),
                             goal_BxSxG=_count(start_c + s, (b, s, g)),
                             neg_BxS=_count(start_r, (b, s)))
      fn = functools.partial(_on_rows, fn, compact)
    calls.append((name, weight, fn))
  rows = [jnp.concatenate(r, axis=1) if r else jnp.zeros((b, 0), jnp.int32)
          for r in (rows_c, rows_r)]
  p = max(r.shape[1] for r in rows)
  rows = [jnp.pad(r.astype(jnp.int32), ((0, 0), (0, p - r.shape[1]))) for r in rows]
  return jnp.stack(rows, axis=1), calls


def _count(start: int, shape) -> jax.Array:
  """``start, start+1, ...`` laid out over ``shape[1:]``, the same for every row."""
  return jnp.broadcast_to(start + jnp.arange(np.prod(shape[1:])).reshape(shape[1:]), shape)


def _on_rows(term: losses.ContrastiveTerm, idx: losses.StateIndices, out, key):
  del key  # sampled already
  return term.from_states(out.h_chosen_BxLxD, out.h_rejected_BxLxD, idx, out.chosen_id_Bx2)


def sample_counts(batch, terms: Objective) -> dict[str, jax.Array]:
  """For each contrastive term, how many pairs of ``batch`` its mean is over (``num_valid``):
  gradient accumulation weighs each micro-batch's mean by it, as one big batch would."""
  counts, negatives_BxL = {}, None
  for name, _, fn in terms.terms:
    if isinstance(fn, losses.ContrastiveTerm):
      if negatives_BxL is None:
        negatives_BxL, _ = pair_identity(batch)
      counts[name] = fn.num_valid(batch["response"][:, 0], negatives_BxL, batch["mask"][:, 0])
  return counts


def objective(model, batch, key, terms: Objective, start_layer: int = 0, scales=None):
  """Total loss and a flat metrics dict (``<term>_loss``, ``<term>/<metric>``, ...).

  With sparse ``terms`` (``build_terms``) the last block runs only at the last token and the
  sampled states: same loss and gradients, for a fraction of that block's cost. ``scales``:
  ``{term name: factor}`` applied to those terms' losses (gradient accumulation's weights).
  """
  scales = scales or {}
  calls = terms.terms
  if terms.sparse:
    identity = pair_identity(batch)
    states_Bx2xP, calls = sampled_rows(batch, key, calls, identity[0])
    out = forward_pairs(model, batch, start_layer, states_Bx2xP, identity)
  else:
    out = forward_pairs(model, batch, start_layer)
  total = jnp.zeros((), jnp.float32)
  metrics = losses.pair_metrics(out.reward_chosen_B, out.reward_rejected_B)
  for i, (name, weight, fn) in enumerate(calls):
    result = fn(out, jax.random.fold_in(key, i))
    value, extra = result if isinstance(result, tuple) else (result, {})
    value = value * scales.get(name, 1.0)
    total = total + weight * value
    metrics[f"{name}_loss"] = value
    metrics.update({f"{name}/{k}": v for k, v in extra.items()})
  metrics["loss"] = total
  return total, metrics
