"""Losses and state sampling against naive numpy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax import losses


def np_cos(a, b):
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def random_states(seed, b=3, s=4, d=5):
  rng = np.random.default_rng(seed)
  src, goal, neg = (rng.normal(size=(b, s, d)).astype(np.float32) for _ in range(3))
  valid = rng.random((b, s)) < 0.8
  valid[0] = True
  return src, goal, neg, valid


def test_bradley_terry_matches_numpy():
  rng = np.random.default_rng(0)
  rc, rr, m = (rng.normal(size=7).astype(np.float32) for _ in range(3))
  want = np.mean([-log_sigmoid(c - r - mm) for c, r, mm in zip(rc, rr, m)])
  np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr, m), want, rtol=1e-6)
  want0 = np.mean([-log_sigmoid(c - r) for c, r in zip(rc, rr)])
  np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr), want0, rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_paper_loss_mean_log_matches_numpy(tau):
  src, goal, neg, valid = random_states(1)
  terms = [-log_sigmoid(np_cos(src[b, s], goal[b, s]) / tau)
           - np.log(1 - 1 / (1 + np.exp(-np_cos(neg[b, s], goal[b, s]) / tau)))
           for b in range(src.shape[0]) for s in range(src.shape[1]) if valid[b, s]]
  got = losses.contrastive_paper_loss(src, goal, neg, valid, temperature=tau)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("reduction", losses.PAPER_REDUCTIONS)
def test_paper_loss_is_zero_with_finite_grads_when_no_sample_is_valid(reduction):
  src, goal, neg, _ = random_states(4)
  loss_fn = lambda src: losses.contrastive_paper_loss(src, goal, neg, np.zeros((3, 4), bool),
                                                      reduction=reduction)
  loss, grad = jax.value_and_grad(loss_fn)(src)
  assert float(loss) == 0.0 and np.isfinite(grad).all()


def random_masks(seed, b=6, l=24):
  """Prompt, response and padding with random lengths; some pairs are degenerate."""
  rng = np.random.default_rng(seed)
  resp_c, resp_r, mask_c = (np.zeros((b, l), np.int32) for _ in range(3))
  for i in range(b):
    p = rng.integers(1, 8)
    n_c = [1, 0][i] if i < 2 else rng.integers(2, l - p)  # pair 0: 1 token, 1: empty rejected
    n_r = 0 if i == 1 else rng.integers(1, l - p)
    resp_c[i, p:p + n_c] = 1
    mask_c[i, :p + n_c] = 1
    resp_r[i, p:p + n_r] = 1
  return resp_c, resp_r, mask_c


@pytest.mark.parametrize("goal", losses.GOALS)
def test_sampling_stays_in_response_and_goal_is_strictly_later(goal):
  resp_c, resp_r, mask_c = random_masks(4)
  last = np.array([np.nonzero(m)[0].max() for m in mask_c])
  src, goal_idx, neg, valid = jax.device_get(losses.sample_state_indices(
      jax.random.key(0), resp_c, resp_r, last, num_samples=64, goal=goal, num_goal_samples=3))
  assert goal_idx.shape == (6, 64, 3 if goal == "avg" else 1)
  assert not valid[0].any() and not valid[1].any()  # no t < t' possible / no negatives
  for b in range(2, 6):
    assert valid[b].all()
    assert resp_c[b, src[b]].all(), "source outside the chosen response"
    assert resp_c[b, goal_idx[b]].all(), "goal outside the chosen response"
    assert (goal_idx[b] > src[b][:, None]).all(), "goal not strictly after source"
    assert resp_r[b, neg[b]].all(), "negative outside the rejected response"
    if goal == "final":
      assert (goal_idx[b] == last[b]).all()


def test_sampling_covers_allowed_positions_uniformly():
  l = 10
  resp = np.zeros((1, l), np.int32)
  resp[0, 3:9] = 1  # response 3..8; sources 3..7
  src, goal, neg, _ = jax.device_get(losses.sample_state_indices(
      jax.random.key(1), resp, resp, np.array([8]), num_samples=5000, goal="random"))
  counts = np.bincount(src[0], minlength=l)
  assert set(np.nonzero(counts)[0]) == {3, 4, 5, 6, 7}
  np.testing.assert_allclose(counts[3:8] / 5000, 0.2, atol=0.03)
  # goal given source 7 can only be 8; given 3 it is uniform over 4..8
  assert (goal[0, src[0] == 7, 0] == 8).all()
  g3 = np.bincount(goal[0, src[0] == 3, 0], minlength=l)[4:9]
  np.testing.assert_allclose(g3 / g3.sum(), 0.2, atol=0.06)


def test_avg_goal_is_mean_of_sampled_states():
  rng = np.random.default_rng(5)
  h_c, h_r = rng.normal(size=(2, 2, 9, 4)).astype(np.float32)
  src = np.array([[0, 2], [1, 3]])
  goal = np.array([[[3, 5], [4, 8]], [[2, 2], [6, 7]]])
  neg = np.array([[1, 1], [0, 5]])
  h_src, h_goal, h_neg = losses.gather_states(h_c, h_r, src, goal, neg)
  np.testing.assert_allclose(h_src[1, 1], h_c[1, 3])
  np.testing.assert_allclose(h_goal[0, 1], (h_c[0, 4] + h_c[0, 8]) / 2, rtol=1e-6)
  np.testing.assert_allclose(h_neg[1, 1], h_r[1, 5])


def test_degenerate_pairs_give_no_samples_and_finite_gradients():
  """Pair 0 has a 1-token chosen response (no source before a goal), pair 1 no rejected
  response: they give no sample, no gradient reaches them, and the term is the numpy mean over
  the other pairs' samples."""
  resp_c, resp_r, mask_c = random_masks(6)
  h = jnp.asarray(np.random.default_rng(6).normal(size=(6, 24, 8)), jnp.float32)
  ids = jnp.stack([jnp.arange(6, dtype=jnp.uint32)] * 2, axis=1)
  term = losses.ContrastiveTerm(goal="avg", temperature=0.5)
  out = lambda h: losses.PairOutputs(jnp.zeros(6), jnp.zeros(6), h, h + 1, mask_c, mask_c,
                                     resp_c, resp_r, jnp.zeros(6), resp_r, ids)
  loss, grad = jax.value_and_grad(lambda h: term(out(h), jax.random.key(0))[0])(h)
  idx = jax.device_get(term.sample(jax.random.key(0), resp_c, resp_r, mask_c))
  assert not idx.valid_BxS[:2].any() and idx.valid_BxS[2:].all()
  assert np.isfinite(grad).all() and not np.asarray(grad[:2]).any()
  hn = np.asarray(h)
  want = [-log_sigmoid(np_cos(hn[b, idx.src_BxS[b, s]], goal) / 0.5)
          - np.log(1 - 1 / (1 + np.exp(-np_cos(hn[b, idx.neg_BxS[b, s]] + 1, goal) / 0.5)))
          for b in range(2, 6) for s in range(term.num_samples)
          for goal in [hn[b, idx.goal_BxSxG[b, s]].mean(0)]]
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
