"""The contrastive term against independent references: which rejected states are negatives
(shared prefixes), the official per-sequence ``log_mean``, copies of one trajectory in InfoNCE,
and gradient accumulation weighted by valid samples."""
import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import losses, objective, sharding, train, train_state
from tests.helpers import pair_batch, tiny_config


def sig(x):
  return 1 / (1 + np.exp(-x))


def np_cos(a, b):
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def pad(ids, length, side):
  fill = [0] * (length - len(ids))
  row, real = (ids + fill, [1] * len(ids) + fill) if side == "right" else (
      fill + ids, fill + [1] * len(ids))
  return np.array(row, np.int32), np.array(real, np.int32)


def naive_diverged(ids_a, ids_b, length, side):
  """1 at b's real tokens from the first index where b differs from a (by content index)."""
  k = next((i for i, t in enumerate(ids_b) if i >= len(ids_a) or ids_a[i] != t), len(ids_b))
  marks = [int(i >= k) for i in range(len(ids_b))]
  return pad(marks, length, side)[0]


def shared_prefix_rows(rng, n, length):
  """Pairs of token lists sharing a random prefix: some equal, some a prefix of the other."""
  pairs = []
  for i in range(n):
    a = list(rng.integers(1, 9, size=rng.integers(2, length)))
    kind = i % 4
    if kind == 0:
      b = list(a)  # identical: no negatives
    elif kind == 1:
      b = a[:rng.integers(1, len(a) + 1)]  # a prefix of a
    else:
      k = rng.integers(0, len(a))
      b = a[:k] + list(rng.integers(9, 12, size=rng.integers(1, length - k)))
    pairs.append((a, b))
  return pairs


@pytest.mark.parametrize("side_a, side_b", [("right", "right"), ("left", "left"),
                                            ("right", "left")])
def test_diverged_matches_a_naive_loop(side_a, side_b):
  length = 12
  pairs = shared_prefix_rows(np.random.default_rng(0), 16, length)
  (tok_a, mask_a), (tok_b, mask_b) = (
      [np.stack(x) for x in zip(*[pad(p[j], length, side) for p in pairs])]
      for j, side in ((0, side_a), (1, side_b)))
  want = np.stack([naive_diverged(a, b, length, side_b) for a, b in pairs])
  got = np.asarray(losses.diverged(tok_a, mask_a, tok_b, mask_b)).astype(np.int32)
  np.testing.assert_array_equal(got, want)


def test_sequence_id_is_equal_exactly_for_copies():
  length = 10
  seqs = [[3, 4, 5], [3, 4, 5, 6], [4, 3, 5], [3, 4, 6], [3, 4, 5]]
  rows = [pad(s, length, side) for s, side in zip(seqs, ["right", "left", "right", "left", "left"])]
  ids = np.asarray(losses.sequence_id(*[np.stack(x) for x in zip(*rows)]))
  same = (ids[:, None] == ids[None, :]).all(-1)
  want = np.array([[a == b for b in seqs] for a in seqs])
  np.testing.assert_array_equal(same, want)


def test_negatives_come_from_where_the_rejected_response_diverges(mesh1):
  """On synthetic pairs whose responses share their opening, no negative is sampled before the
  first differing token, where the rejected states equal the chosen ones."""
  config = tiny_config("paper")
  batch = pair_batch(16, max_len=config.data.max_len, padding_side="left")
  tokens, mask, resp = batch["tokens"], batch["mask"], batch["response"]
  content = [[t[m == 1].tolist() for t, m in zip(tokens[i], mask[i])] for i in range(16)]
  first = [next(k for k, (x, y) in enumerate(zip(c + [-1], r + [-2])) if x != y)
           for c, r in content]
  start = [int(np.argmax(resp[i, 1] == 1)) - int(np.argmax(mask[i, 1] == 1)) for i in range(16)]
  shared = [i for i in range(16) if first[i] > start[i] + 1]
  assert len(shared) >= 2, "the synthetic pairs should include shared response openings"
  model, _ = train_state.merge(*train_state.create_state(config))
  out = objective.forward_pairs(model, batch)
  h_c, h_r = np.asarray(out.h_chosen_BxLxD), np.asarray(out.h_rejected_BxLxD)
  for i in shared:  # the premise: before the divergence the states are the same
    pc, pr = int(np.argmax(mask[i, 0])), int(np.argmax(mask[i, 1]))
    n = first[i]
    np.testing.assert_allclose(h_r[i, pr:pr + n], h_c[i, pc:pc + n], rtol=1e-4, atol=1e-4)
  term = losses.ContrastiveTerm(num_samples=256)
  idx = jax.device_get(term.sample(jax.random.key(0), out.response_chosen_BxL, out.negatives_BxL,
                                   out.mask_chosen_BxL))
  for i in range(16):
    content_index = idx.neg_BxS[i] - int(np.argmax(mask[i, 1]))
    assert (content_index >= first[i]).all(), f"pair {i}: negative in the shared prefix"
    assert resp[i, 1, idx.neg_BxS[i]].all()
  for i in shared:  # and the sampler still reaches every allowed position
    allowed = np.nonzero(resp[i, 1] & (np.arange(resp.shape[-1]) - np.argmax(mask[i, 1])
                                       >= first[i]))[0]
    assert set(idx.neg_BxS[i]) == set(allowed)


def test_log_mean_is_the_official_per_sequence_reduction():
  # the closed form: B=2, S=1, cos⁺ = +1 and -1, cos⁻ = 0
  e = np.eye(3, dtype=np.float32)
  src = np.stack([e[0], e[0]])[:, None]
  goal = np.stack([e[0], -e[0]])[:, None]
  neg = np.stack([e[1], e[2]])[:, None]
  got = losses.contrastive_paper_loss(src, goal, neg, np.ones((2, 1), bool), reduction="log_mean")
  want = np.mean([-np.log(sig(1.0)) - np.log(1 - sig(0.0)), -np.log(sig(-1.0)) - np.log(0.5)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert abs(want - 1.5064) < 1e-4  # the batch-wide log-mean would give 1.3863
  # random states, invalid samples and a sequence with none: one sequence at a time
  rng = np.random.default_rng(7)
  src, goal, neg = (rng.normal(size=(4, 5, 6)).astype(np.float32) for _ in range(3))
  valid = rng.random((4, 5)) < 0.7
  valid[0], valid[2] = True, False
  per_seq = []
  for i in range(4):
    ks = [s for s in range(5) if valid[i, s]]
    if ks:
      pos = np.mean([sig(np_cos(src[i, s], goal[i, s]) / 0.5) for s in ks])
      ngs = np.mean([sig(np_cos(neg[i, s], goal[i, s]) / 0.5) for s in ks])
      per_seq.append(-np.log(pos) - np.log(1 - ngs))
  got = losses.contrastive_paper_loss(src, goal, neg, valid, temperature=0.5,
                                      reduction="log_mean")
  np.testing.assert_allclose(got, np.mean(per_seq), rtol=1e-5)


@pytest.mark.parametrize("traj, tau", [
    ([0, 1, 2, 3, 4], 1.0),  # every chosen response distinct: the default (same_BxB=None)
    ([0, 1, 0, 2, 1], 0.2),  # pairs 0 and 2, 1 and 4 hold the same chosen response
])
def test_infonce_never_takes_a_copy_of_the_trajectory_as_a_negative(traj, tau):
  rng = np.random.default_rng(8)
  b, s = len(traj), 3
  src, goal, neg = (rng.normal(size=(b, s, 4)).astype(np.float32) for _ in range(3))
  valid = np.ones((b, s), bool)
  valid[3, 1] = False
  terms = []
  for i in range(b):
    for k in range(s):
      if not valid[i, k]:
        continue
      pos = np_cos(src[i, k], goal[i, k]) / tau
      cands = [pos] + [np_cos(src[i, k], goal[j, t]) / tau for j in range(b) if traj[j] != traj[i]
                       for t in range(s) if valid[j, t]]
      cands += [np_cos(src[i, k], neg[i, t]) / tau for t in range(s) if valid[i, t]]
      terms.append(np.log(np.sum(np.exp(cands))) - pos)
  same = np.equal.outer(traj, traj)
  distinct = len(set(traj)) == b
  got = losses.contrastive_infonce_loss(src, goal, neg, valid, temperature=tau,
                                        same_BxB=None if distinct else same)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  # and the objective gives copies one id: pair 1 repeats pair 0
  batch = pair_batch(4, max_len=48)
  batch = {k: np.concatenate([v[:1], v[:1], v[1:3]]) for k, v in batch.items()}
  ids = np.asarray(objective.pair_identity(jax.tree.map(np.asarray, batch))[1])
  np.testing.assert_array_equal((ids[:, None] == ids[None]).all(-1), np.equal.outer(
      [0, 0, 1, 2], [0, 0, 1, 2]))


def handmade_batch(valid_rows, b=8, l=12, seed=0):
  """Responses of 2 tokens: the only source is the first, the only goal the second, and the only
  negative the rejected second token (its first equals the chosen one), so every key samples the
  same states. A pair not in ``valid_rows`` has rejected == chosen: no negatives."""
  rng = np.random.default_rng(seed)
  tokens, mask, resp = (np.zeros((b, 2, l), np.int32) for _ in range(3))
  for i in range(b):
    p = int(rng.integers(2, l - 2))
    chosen = list(rng.integers(1, 200, size=p + 2))
    rejected = chosen[:p + 1] + [int(rng.integers(200, 256))] if i in valid_rows else chosen
    for r, ids in enumerate((chosen, rejected)):
      tokens[i, r, :len(ids)], mask[i, r, :len(ids)], resp[i, r, p:p + 2] = ids, 1, 1
  return {"tokens": tokens, "mask": mask, "response": resp,
          "margin": np.zeros(b, np.float32), "truncated": np.zeros((b, 2), np.int32)}


@pytest.mark.parametrize("mode, reduction", [  # ~35 s each on 2 cores: one in the default suite
    ("paper", "mean_log"), pytest.param("paper", "log_mean", marks=pytest.mark.slow),
    pytest.param("infonce", "mean_log", marks=pytest.mark.slow)])
def test_accumulation_weighs_micro_batches_by_their_valid_samples(mesh1, mode, reduction):
  """Micro-batch 0 (rows 0, 2, 4, 6) has 3 valid pairs, micro-batch 1 has 1. The paper loss
  equals one big batch's (same samples); InfoNCE's negatives are per micro-batch, so its reference
  is the micro-batches' losses weighted by their valid pairs (3/4, 1/4), not equally."""
  config = tiny_config(mode)
  config.optim.warmup_steps = 0
  config.loss.contrastive.reduction = reduction
  accum = 2
  valid_rows = {0, 2, 4, 1}
  batch = handmade_batch(valid_rows)
  graphdef, state = train_state.create_state(config)
  terms = objective.build_terms(config.loss)
  step = lambda a: jax.jit(train.make_train_step(graphdef, terms, accum_steps=a, seed=0))(
      state, sharding.host_to_global(batch, mesh1))[1]
  got = step(accum)
  if mode == "paper":
    want = step(1)
    np.testing.assert_allclose(got["contrastive_loss"], want["contrastive_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    return
  model, _ = train_state.merge(graphdef, state)
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  key = jax.random.fold_in(jax.random.key(0), 0)
  share = [sum(r in valid_rows for r in range(a, 8, accum)) / len(valid_rows)
           for a in range(accum)]

  def reference(params):
    total = 0.0
    for a in range(accum):
      micro = {k: v[a::accum] for k, v in batch.items()}
      _, m = objective.objective(nnx.merge(model_def, params, rest), micro,
                                 jax.random.fold_in(key, a), terms)
      total = total + m["bt_loss"] / accum + config.loss.beta * share[a] * m["contrastive_loss"]
    return total

  loss, grads = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], float(jax.numpy.sqrt(sum(
      (g ** 2).sum() for g in jax.tree.leaves(grads)))), rtol=1e-4)


def test_length_report_counts_the_shared_part_of_rejected_responses():
  from rmjax.data.pipeline import length_report
  from rmjax.data.tokenizer import ByteTokenizer
  pairs = [("Q:", "abcX", "abcY"), ("Q:", "ab", "ab"), ("Q:", "xy", "zzzz"), ("P", "ab", "abcd")]
  src = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
  report = length_report(src, ByteTokenizer(), 64)
  # shared characters (bytes) of each rejected response: 3, 2, 0, 2 of 4, 2, 4, 4
  assert report["shared_response"] == pytest.approx(7 / 14)
  assert report["pairs_without_negatives"] == 1
