"""Reward calibration: ``loss.center_rewards`` (TRL's centring term) against its closed form, in
the objective (weighted, logged, sparse = dense) and under gradient accumulation."""
import jax
import numpy as np
import pytest

from rmjax import losses, objective, sharding, train, train_state
from rmjax.eval.metrics import reward_stats
from tests.helpers import pair_batch, tiny_config


def test_center_rewards_loss_and_gradient_are_the_closed_form():
  rng = np.random.default_rng(0)
  r_c, r_r = rng.normal(size=(2, 6)).astype(np.float32) * 3
  value, (g_c, g_r) = jax.value_and_grad(losses.center_rewards_loss, argnums=(0, 1))(r_c, r_r)
  s = r_c.astype(np.float64) + r_r
  np.testing.assert_allclose(value, np.mean(s ** 2), rtol=1e-6)
  np.testing.assert_allclose(g_c, 2 * s / len(s), rtol=1e-5)  # d/dr_c mean((r_c + r_r)²)
  np.testing.assert_allclose(g_r, 2 * s / len(s), rtol=1e-5)


def config_with_center(weight, variant="bt"):
  config = tiny_config(variant)
  config.loss.center_rewards = weight
  return config


def test_center_term_is_off_by_default_and_weighted_when_set():
  assert config_with_center(0.0).loss.center_rewards == 0.0
  assert [n for n, _, _ in objective.build_terms(tiny_config("bt").loss).terms] == ["bt"]
  terms = objective.build_terms(config_with_center(0.25, "paper").loss)
  assert [(n, w) for n, w, _ in terms.terms] == [("bt", 1.0), ("contrastive", 0.5),
                                                 ("center", 0.25)]
  assert terms.sparse  # it reads the rewards only


@pytest.mark.parametrize("sparse", [True, False])
def test_objective_adds_the_weighted_center_term_and_logs_it(mesh1, sparse):
  config = config_with_center(0.25)
  config.loss.sparse_last_block = sparse
  terms = objective.build_terms(config.loss)
  graphdef, state = train_state.create_state(config)
  model, _ = train_state.merge(graphdef, state)
  batch = pair_batch(8, max_len=config.data.max_len)
  total, metrics = objective.objective(model, batch, jax.random.key(0), terms)
  out = objective.forward_pairs(model, batch)
  r_c, r_r = (np.asarray(x, np.float64) for x in (out.reward_chosen_B, out.reward_rejected_B))
  center = np.mean((r_c + r_r) ** 2)
  bt = np.mean(np.log1p(np.exp(-(r_c - r_r))))
  np.testing.assert_allclose(metrics["center_loss"], center, rtol=1e-5)
  np.testing.assert_allclose(total, bt + 0.25 * center, rtol=1e-5)


def test_accumulation_gives_one_big_batchs_center_loss_and_gradients(mesh1):
  """The centring term is a mean over pairs: equal micro-batches weigh the same, so two of
  them give the big batch's loss and update."""
  config = config_with_center(2.0)
  config.optim.warmup_steps = 0
  terms = objective.build_terms(config.loss)
  graphdef, state = train_state.create_state(config)
  batch = sharding.host_to_global(pair_batch(8, max_len=config.data.max_len), mesh1)
  step = lambda a: jax.jit(train.make_train_step(graphdef, terms, accum_steps=a, seed=0))(
      state, batch)
  m1, m2 = step(1)[1], step(2)[1]
  np.testing.assert_allclose(m2["center_loss"], m1["center_loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)


def test_reward_stats_are_the_population_mean_and_std():
  rewards = np.array([1.0, 2.0, 4.0, -3.0])
  stats = reward_stats(rewards)
  assert stats == {"mean": pytest.approx(1.0), "std": pytest.approx(np.sqrt(6.5)), "n": 4}
  with pytest.raises(ValueError, match="not finite"):
    reward_stats([1.0, np.nan])
