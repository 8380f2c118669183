"""Loss terms from the config: weights, user-defined terms, helpful errors."""
import jax
import numpy as np
import pytest

from rmjax import losses, objective
from tests.helpers import tiny_config


def hinge(out: losses.PairOutputs, key):
  """A user term (the README's example shape): margin hinge on the rewards."""
  del key
  return jax.numpy.mean(jax.nn.relu(1.0 - (out.reward_chosen_B - out.reward_rejected_B)))


def fake_outputs(seed=0, b=4, l=12, d=6):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, l), np.int32)
  resp = np.zeros((b, l), np.int32)
  resp[:, 4:] = 1
  h = rng.normal(size=(2, b, l, d)).astype(np.float32)
  r = rng.normal(size=(2, b)).astype(np.float32)
  return losses.PairOutputs(r[0], r[1], h[0], h[1], mask, mask, resp, resp, np.zeros(b, np.float32))


def test_terms_are_weighted_and_summed(monkeypatch):
  config = tiny_config("paper")
  config.loss.beta = 0.3
  config.loss.custom = "tests.test_objective:hinge=2.0"
  terms = objective.build_terms(config.loss)
  assert [(n, w) for n, w, _ in terms] == [("bt", 1.0), ("contrastive", 0.3), ("hinge", 2.0)]
  out = fake_outputs()
  monkeypatch.setattr(objective, "forward_pairs", lambda model, batch, start_layer: out)
  key = jax.random.key(0)
  total, metrics = objective.objective(None, None, key, terms)
  bt = losses.bradley_terry_loss(out.reward_chosen_B, out.reward_rejected_B)
  con, _ = terms[1][2](out, jax.random.fold_in(key, 1))
  np.testing.assert_allclose(total, bt + 0.3 * con + 2.0 * hinge(out, None), rtol=1e-6)
  np.testing.assert_allclose(metrics["hinge_loss"], hinge(out, None), rtol=1e-6)
  assert {"bt_loss", "contrastive_loss", "contrastive/cos_pos", "pairwise_accuracy"} <= set(metrics)


@pytest.mark.parametrize("custom, message", [
    ("tests.test_objective:hinge", "expected 'package.module:function=weight'"),
    ("no_such_module:f=1", "cannot import 'no_such_module'"),
    ("tests.test_objective:nope=1", "has no function 'nope'"),
    ("tests.test_objective=1", "expected 'package.module:function'"),
])
def test_bad_custom_terms_say_what_is_wrong(custom, message):
  config = tiny_config("paper")
  config.loss.custom = custom
  with pytest.raises(ValueError, match=message):
    objective.build_terms(config.loss)


def test_all_zero_weights_is_an_error():
  config = tiny_config("bt")
  config.loss.bt_weight = 0.0
  with pytest.raises(ValueError, match="nothing to train"):
    objective.build_terms(config.loss)
