"""Reward-model losses: pure functions of arrays (no model, no config, randomness via ``key``).

# B: batch of pairs, L: sequence length, D: model dim, S: sampled states per sequence,
# G: future states averaged into one goal (goal="avg")

A *loss term* has the signature ``term(out: PairOutputs, key) -> loss | (loss, metrics)``; the
trainer sums ``weight * loss`` over the terms named in the config (see ``rmjax.objective``), so a
new term is a function of these arrays and nothing else.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rmjax.indexing import first_token_index, gather_rows, last_token_index

GOALS = ("random", "avg", "final")
PAPER_REDUCTIONS = ("mean_log", "log_mean")


class PairOutputs(NamedTuple):
  """One forward pass over a batch of (chosen, rejected) pairs."""
  reward_chosen_B: jax.Array
  reward_rejected_B: jax.Array
  h_chosen_BxLxD: jax.Array  # last-layer hidden states, fp32 (L = the computed rows, see objective)
  h_rejected_BxLxD: jax.Array
  mask_chosen_BxL: jax.Array  # 1 = real token (prompt or response), 0 = pad
  mask_rejected_BxL: jax.Array
  response_chosen_BxL: jax.Array  # 1 = response token (where states may be sampled)
  response_rejected_BxL: jax.Array
  margin_B: jax.Array  # per-pair Bradley-Terry margin (zeros when unused)
  # 1 = where negatives may be drawn: rejected response tokens from the first token where the
  # rejected sequence differs from the chosen one (``diverged``); before it, a causal model's
  # rejected states equal the chosen ones
  negatives_BxL: jax.Array
  chosen_id_Bx2: jax.Array  # the chosen sequence's identity (``sequence_id``)


# --- Bradley-Terry ---

def bradley_terry_loss(reward_chosen_B, reward_rejected_B, margin_B=None) -> jax.Array:
  """Mean of ``-log σ(r_c - r_r - margin)``."""
  diff_B = reward_chosen_B - reward_rejected_B
  if margin_B is not None:
    diff_B = diff_B - margin_B
  return jnp.mean(jax.nn.softplus(-diff_B))


def center_rewards_loss(reward_chosen_B, reward_rejected_B) -> jax.Array:
  """``mean((r_c + r_r)²)``: pulls each pair's rewards towards a zero sum, so rewards stay centred
  (TRL's ``center_rewards_coefficient``, EasyDeL's; BT alone fixes only their differences)."""
  return jnp.mean(jnp.square(reward_chosen_B + reward_rejected_B))


def pair_metrics(reward_chosen_B, reward_rejected_B) -> dict[str, jax.Array]:
  """Pairwise accuracy (ties count half) and mean reward margin."""
  diff_B = reward_chosen_B - reward_rejected_B
  acc_B = jnp.where(diff_B > 0, 1.0, jnp.where(diff_B == 0, 0.5, 0.0))
  return {"pairwise_accuracy": jnp.mean(acc_B), "reward_margin": jnp.mean(diff_B)}


# --- which states may be compared ---

def diverged(tokens_a_BxL, mask_a_BxL, tokens_b_BxL, mask_b_BxL) -> jax.Array:
  """1 at the real tokens of ``b`` from the first one where ``b`` differs from ``a`` on: tokens
  compared by their index among the real ones, so right and left padding alike. A ``b`` that is
  ``a`` or a prefix of it is 0 everywhere; a longer ``b`` diverges where ``a`` ends."""
  l = tokens_a_BxL.shape[1]
  real_b_BxL = mask_b_BxL.astype(bool)
  index_BxL = jnp.arange(l)[None, :] - first_token_index(mask_b_BxL)[:, None]  # among b's real
  in_a_BxL = index_BxL < jnp.sum(mask_a_BxL, axis=1, keepdims=True)
  where_a_BxL = jnp.clip(first_token_index(mask_a_BxL)[:, None] + index_BxL, 0, l - 1)
  same_BxL = in_a_BxL & (jnp.take_along_axis(tokens_a_BxL, where_a_BxL, axis=1) == tokens_b_BxL)
  differs_BxL = real_b_BxL & ~same_BxL
  return (jnp.cumsum(differs_BxL, axis=1) > 0) & real_b_BxL


def sequence_id(tokens_BxL, mask_BxL) -> jax.Array:
  """A 64-bit hash of each sequence's real tokens ([B, 2] uint32): equal for copies of a
  sequence whatever their padding, different otherwise (up to hash collisions, ~B²/2⁶⁵)."""
  u32 = lambda x: jnp.asarray(x, jnp.uint32)
  index_BxL = u32(jnp.arange(tokens_BxL.shape[1])[None, :] - first_token_index(mask_BxL)[:, None])
  ids = []
  for mult, salt in ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F)):
    x_BxL = (u32(tokens_BxL) + u32(salt)) * u32(mult) ^ (index_BxL * u32(salt) + u32(mult))
    x_BxL = (x_BxL ^ (x_BxL >> 15)) * u32(0x2C1B3C6D)  # mix, so a sum of terms is a hash
    ids.append(jnp.sum(jnp.where(mask_BxL.astype(bool), x_BxL ^ (x_BxL >> 13), u32(0)),
                       axis=1, dtype=jnp.uint32))
  return jnp.stack(ids, axis=1)


# --- state sampling for the contrastive term ---

def _uniform_index(key, allowed_XxL, num: int) -> jax.Array:
  """``num`` positions drawn uniformly from the allowed ones of each row: shape (num, *X)."""
  logits = jnp.where(allowed_XxL, 0.0, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1, shape=(num,) + allowed_XxL.shape[:-1])


class StateIndices(NamedTuple):
  """Sampled positions: sources and goals in the chosen sequence, negatives in the rejected."""
  src_BxS: jax.Array
  goal_BxSxG: jax.Array  # G = 1 unless goal="avg"
  neg_BxS: jax.Array
  valid_BxS: jax.Array  # the pair's ``valid_pairs`` for each sample


def _source_ok(response_chosen_BxL, last_chosen_B, goal: str):
  """Where a source may be: a chosen response token with a goal strictly after it."""
  pos_1xL = jnp.arange(response_chosen_BxL.shape[1])[None, :]
  resp_BxL = response_chosen_BxL.astype(bool)
  if goal == "final":
    end_B = last_chosen_B
  else:
    end_B = jnp.max(jnp.where(resp_BxL, pos_1xL, -1), axis=1)  # last response position
  return resp_BxL & (pos_1xL < end_B[:, None])


def valid_pairs(response_chosen_BxL, negatives_BxL, last_chosen_B, goal: str) -> jax.Array:
  """Pairs that give contrastive samples: room for source < goal, and at least one negative."""
  return (jnp.any(_source_ok(response_chosen_BxL, last_chosen_B, goal), axis=1)
          & jnp.any(negatives_BxL.astype(bool), axis=1))


def sample_state_indices(key, response_chosen_BxL, negatives_BxL, last_chosen_B, *,
                         num_samples: int, goal: str, num_goal_samples: int = 4
                         ) -> StateIndices:
  """Positions of source, goal and negative states.

  Sources and goals come from the chosen response with source < goal strictly; negatives from
  the allowed rejected positions ``negatives`` (the rejected response from its first token that
  differs from the chosen sequence: ``diverged``). ``valid`` is ``valid_pairs``.
  """
  if goal not in GOALS:
    raise ValueError(f"goal={goal!r}: expected one of {GOALS}")
  k_src, k_goal, k_neg = jax.random.split(key, 3)
  b, l = response_chosen_BxL.shape
  pos_L = jnp.arange(l)
  src_ok_BxL = _source_ok(response_chosen_BxL, last_chosen_B, goal)
  src_BxS = _uniform_index(k_src, src_ok_BxL, num_samples).T
  if goal == "final":
    goal_BxSxG = jnp.broadcast_to(last_chosen_B[:, None, None], (b, num_samples, 1))
  else:
    goal_ok_BxSxL = (response_chosen_BxL.astype(bool)[:, None, :]
                     & (pos_L[None, None, :] > src_BxS[..., None]))
    g = num_goal_samples if goal == "avg" else 1
    goal_BxSxG = jnp.moveaxis(_uniform_index(k_goal, goal_ok_BxSxL, g), 0, -1)
  neg_BxS = _uniform_index(k_neg, negatives_BxL.astype(bool), num_samples).T
  valid_B = valid_pairs(response_chosen_BxL, negatives_BxL, last_chosen_B, goal)
  return StateIndices(src_BxS, goal_BxSxG, neg_BxS,
                      jnp.broadcast_to(valid_B[:, None], src_BxS.shape))


def gather_states(h_chosen_BxLxD, h_rejected_BxLxD, src_BxS, goal_BxSxG, neg_BxS):
  """Hidden states at sampled positions; a multi-state goal is their mean."""
  b, s, g = goal_BxSxG.shape
  h_goal_BxSxD = gather_rows(h_chosen_BxLxD, goal_BxSxG.reshape(b, s * g)).reshape(b, s, g, -1)
  return (gather_rows(h_chosen_BxLxD, src_BxS), h_goal_BxSxD.mean(axis=2),
          gather_rows(h_rejected_BxLxD, neg_BxS))


# --- contrastive losses ---

def cosine(a_XxD, b_XxD, eps: float = 1e-8) -> jax.Array:
  """Cosine similarity along the last axis (as ``torch.cosine_similarity``)."""
  norms = jnp.linalg.norm(a_XxD, axis=-1) * jnp.linalg.norm(b_XxD, axis=-1)
  return jnp.sum(a_XxD * b_XxD, axis=-1) / jnp.maximum(norms, eps)


def _masked_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def contrastive_paper_loss(h_src_BxSxD, h_goal_BxSxD, h_neg_BxSxD, valid_BxS, *,
                           temperature: float = 1.0, reduction: str = "mean_log") -> jax.Array:
  """The paper's binary contrastive loss on cosine similarities.

  ``mean_log`` (default): mean over valid samples of ``-log σ(cos⁺/τ) - log(1 - σ(cos⁻/τ))``.
  ``log_mean``: the official implementation's reduction, per sequence ``-log mean_s σ(cos⁺/τ) -
  log(1 - mean_s σ(cos⁻/τ))`` over its valid samples (it trains one sequence per micro-batch),
  then the mean over sequences with a valid sample (kept to reproduce its numbers).
  Either is 0 when no sample is valid.
  """
  pos_BxS = cosine(h_src_BxSxD, h_goal_BxSxD) / temperature
  neg_BxS = cosine(h_neg_BxSxD, h_goal_BxSxD) / temperature
  w_BxS = valid_BxS.astype(pos_BxS.dtype)
  if reduction == "mean_log":
    return _masked_mean(jax.nn.softplus(-pos_BxS) + jax.nn.softplus(neg_BxS), w_BxS)
  if reduction == "log_mean":
    n_B = jnp.sum(w_BxS, axis=1)
    seq_B = (n_B > 0).astype(w_BxS.dtype)
    per_seq = lambda x_BxS: jnp.sum(x_BxS * w_BxS, axis=1) / jnp.maximum(n_B, 1.0)
    # a sequence without valid samples: log(1) - log1p(0) = 0 (the means of nothing: log(0))
    pos_B = jnp.where(n_B > 0, per_seq(jax.nn.sigmoid(pos_BxS)), 1.0)
    neg_B = jnp.where(n_B > 0, per_seq(jax.nn.sigmoid(neg_BxS)), 0.0)
    return _masked_mean(-jnp.log(pos_B) - jnp.log1p(-neg_B), seq_B)
  raise ValueError(f"reduction={reduction!r}: expected one of {PAPER_REDUCTIONS}")


def contrastive_infonce_loss(h_src_BxSxD, h_goal_BxSxD, h_neg_BxSxD, valid_BxS, *,
                             temperature: float = 0.1, same_BxB=None) -> jax.Array:
  """InfoNCE with in-batch negatives over the whole (global) batch.

  For source state (i, s) the positive is its own goal g[i, s]; the negatives are the goals of
  every sequence j that is another trajectory (``same_BxB[i, j]`` False; by default every j != i)
  and the rejected states of pair i. Other goals of i's trajectory (its other samples, and every
  sample of a copy of it elsewhere in the batch) are excluded: they are futures of the same
  trajectory, not negatives.
  Under jit on a sharded batch the B x B similarity is global (XLA gathers across devices).
  """
  b, s, _ = h_src_BxSxD.shape
  if same_BxB is None:
    same_BxB = jnp.eye(b, dtype=bool)
  normalise = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  src, goal, neg = normalise(h_src_BxSxD), normalise(h_goal_BxSxD), normalise(h_neg_BxSxD)
  sim_goal_BxSxBxS = jnp.einsum("isd,jtd->isjt", src, goal) / temperature
  sim_neg_BxSxS = jnp.einsum("isd,itd->ist", src, neg) / temperature
  eye_B = jnp.eye(b, dtype=bool)
  other_seq_BxSxBxS = ~same_BxB[:, None, :, None] & valid_BxS[None, None, :, :]
  own_BxSxBxS = eye_B[:, None, :, None] & jnp.eye(s, dtype=bool)[None, :, None, :]
  allowed = jnp.concatenate([(other_seq_BxSxBxS | own_BxSxBxS).reshape(b, s, b * s),
                             jnp.broadcast_to(valid_BxS[:, None, :], (b, s, s))], axis=-1)
  logits = jnp.concatenate([sim_goal_BxSxBxS.reshape(b, s, b * s), sim_neg_BxSxS], axis=-1)
  lse_BxS = jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  pos_BxS = jnp.einsum("isd,isd->is", src, goal) / temperature
  return _masked_mean(lse_BxS - pos_BxS, valid_BxS.astype(pos_BxS.dtype))


# --- loss terms (the trainer's interface) ---

def bt_term(out: PairOutputs, key=None) -> jax.Array:
  del key
  return bradley_terry_loss(out.reward_chosen_B, out.reward_rejected_B, out.margin_B)


def center_term(out: PairOutputs, key=None) -> jax.Array:
  del key
  return center_rewards_loss(out.reward_chosen_B, out.reward_rejected_B)


@dataclasses.dataclass(frozen=True)
class ContrastiveTerm:
  """Goal-conditioned contrastive term, ``term(out, key)``: samples states, then the ``paper``
  or ``infonce`` loss. ``sample`` and ``from_states`` are its two halves, which lets the
  objective sample first and compute the last block only at the sampled positions."""
  mode: str = "paper"
  goal: str = "random"
  num_samples: int = 16
  num_goal_samples: int = 4
  temperature: float = 1.0
  reduction: str = "mean_log"

  def __post_init__(self):
    if self.mode not in ("paper", "infonce"):
      raise ValueError(f"contrastive mode={self.mode!r}: expected 'paper' or 'infonce'")
    if self.goal not in GOALS:
      raise ValueError(f"goal={self.goal!r}: expected one of {GOALS}")

  def sample(self, key, response_chosen_BxL, negatives_BxL, mask_chosen_BxL) -> StateIndices:
    return sample_state_indices(
        key, response_chosen_BxL, negatives_BxL, last_token_index(mask_chosen_BxL),
        num_samples=self.num_samples, goal=self.goal, num_goal_samples=self.num_goal_samples)

  def num_valid(self, response_chosen_BxL, negatives_BxL, mask_chosen_BxL) -> jax.Array:
    """How many pairs give samples: what the loss averages over (times ``num_samples``)."""
    return jnp.sum(valid_pairs(response_chosen_BxL, negatives_BxL,
                               last_token_index(mask_chosen_BxL), self.goal))

  def from_states(self, h_chosen_BxLxD, h_rejected_BxLxD, idx: StateIndices, chosen_id_Bx2):
    h_src, h_goal, h_neg = gather_states(h_chosen_BxLxD, h_rejected_BxLxD, idx.src_BxS,
                                         idx.goal_BxSxG, idx.neg_BxS)
    if self.mode == "paper":
      loss = contrastive_paper_loss(h_src, h_goal, h_neg, idx.valid_BxS,
                                    temperature=self.temperature, reduction=self.reduction)
    else:
      same_BxB = jnp.all(chosen_id_Bx2[:, None, :] == chosen_id_Bx2[None, :, :], axis=-1)
      loss = contrastive_infonce_loss(h_src, h_goal, h_neg, idx.valid_BxS,
                                      temperature=self.temperature, same_BxB=same_BxB)
    w_BxS = idx.valid_BxS.astype(jnp.float32)
    return loss, {"cos_pos": _masked_mean(cosine(h_src, h_goal), w_BxS),
                  "cos_neg": _masked_mean(cosine(h_neg, h_goal), w_BxS)}

  def __call__(self, out: PairOutputs, key):
    idx = self.sample(key, out.response_chosen_BxL, out.negatives_BxL, out.mask_chosen_BxL)
    return self.from_states(out.h_chosen_BxLxD, out.h_rejected_BxLxD, idx, out.chosen_id_Bx2)

