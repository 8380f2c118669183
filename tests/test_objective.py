"""Loss terms from the config: weights, user-defined terms, helpful errors."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import losses, objective, sharding, train_state
from rmjax.indexing import ReadRows
from tests.helpers import assert_tree_close, pair_batch, tiny_config


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
  ids = np.stack([np.arange(b, dtype=np.uint32)] * 2, axis=1)  # every pair its own trajectory
  return losses.PairOutputs(r[0], r[1], h[0], h[1], mask, mask, resp, resp, np.zeros(b, np.float32),
                            resp, ids)


def test_terms_are_weighted_and_summed(monkeypatch):
  config = tiny_config("paper")
  config.loss.beta = 0.3
  config.loss.custom = "tests.test_objective:hinge=2.0"
  terms = objective.build_terms(config.loss)
  assert [(n, w) for n, w, _ in terms.terms] == [("bt", 1.0), ("contrastive", 0.3), ("hinge", 2.0)]
  out = fake_outputs()
  monkeypatch.setattr(objective, "forward_pairs", lambda model, batch, start_layer: out)
  assert not terms.sparse  # a user term reads every state
  key = jax.random.key(0)
  total, metrics = objective.objective(None, None, key, terms)
  bt = losses.bradley_terry_loss(out.reward_chosen_B, out.reward_rejected_B)
  con, _ = terms.terms[1][2](out, jax.random.fold_in(key, 1))
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


@pytest.mark.parametrize("variant, goal, padding, remat", [
    ("paper", "avg", "left", "full"), ("infonce", "random", "right", "none"),
    ("bt", None, "left", "none"),
    pytest.param("paper", "final", "right", "none", marks=pytest.mark.slow)])
def test_sparse_last_block_gives_the_dense_loss_and_gradients(variant, goal, padding, remat):
  """Running the last block only at the sampled rows changes nothing but the cost."""
  config = tiny_config(variant)
  config.model.remat = remat
  if goal:
    config.loss.contrastive.goal = goal
  sparse = objective.build_terms(config.loss)
  assert sparse.sparse
  dense = dataclasses.replace(sparse, sparse=False)
  batch = pair_batch(8, max_len=config.data.max_len, padding_side=padding)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    graphdef, state = train_state.create_state(config)
    model, _ = train_state.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_grads(terms):
      fn = lambda p: objective.objective(nnx.merge(model_def, p, rest), batch,
                                         jax.random.key(5), terms)
      return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (loss_d, metrics_d), grads_d = loss_and_grads(dense)
    (loss_s, metrics_s), grads_s = loss_and_grads(sparse)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  for k in metrics_d:
    np.testing.assert_allclose(metrics_s[k], metrics_d[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert_tree_close(grads_s, grads_d, rtol=1e-4)  # float32 rounding, not a wrong row


@pytest.mark.slow  # ~30 s on 2 cores; tests/test_loss_lab.py checks features vs the full model
def test_rows_and_features_give_the_same_states():
  """``model(t, m, ReadRows)`` equals the dense states at ``rows``, from tokens or features."""
  config = tiny_config("paper")
  batch = pair_batch(4, max_len=config.data.max_len, padding_side="left")
  tokens, mask = batch["tokens"].reshape(8, -1), batch["mask"].reshape(8, -1)
  rows = np.random.default_rng(0).integers(0, tokens.shape[1], size=(8, 5))
  with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    model, _ = train_state.merge(*train_state.create_state(config))
    reward, h = model(tokens, mask)
    want = np.take_along_axis(np.asarray(h), rows[..., None], axis=1)
    read = ReadRows.at(rows, mask)
    outputs = [model(tokens, mask, read)] + [
        model.from_features(model.backbone.features(tokens, mask, k), mask, k, read)
        for k in range(config.model.num_layers + 1)]
  for r, got in outputs:  # relative to the norms: entries near 0 are rounding noise
    assert_tree_close((r[:, 0], got), (reward, want), rtol=1e-5)
