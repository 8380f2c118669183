"""Cached features + loss lab: the same loss as the full model, the lab loop, resumable caching."""
import dataclasses
import os
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import cache_features, loss_lab, objective, sharding, train
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """A tiny random model (2 layers) and its features entering block 1, 16 pairs per split."""
  out = str(tmp_path_factory.mktemp("features"))
  config = tiny_config("paper")
  config.model.num_layers = 2
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    model, _ = train.unpack(nnx.merge(*train.create_state(config)))
    cache_features.cache(config, model, 1, out, limit=16, batch_size=8)
  return config, model, out, mesh


def test_features_give_the_full_models_loss_and_gradients(cached):
  config, model, out, mesh = cached
  lab = loss_lab.lab_config(out, **{"seed": 123})  # another seed; its lower layers are zeros
  src = cache_features.FeatureSource(out, "train")
  rows = [src[i] for i in range(8)]
  feats = {k: np.stack([r[k] for r in rows]) for k in loss_lab.BATCH_FIELDS}
  tokens = dict(feats, tokens=np.stack([r["tokens"] for r in rows]))
  del tokens["features"]
  terms = objective.build_terms(config.loss)
  key = jax.random.key(7)
  with sharding.use_mesh(mesh):
    lab_model, _ = train.unpack(nnx.merge(*loss_lab.lab_state(lab, out, mesh)))
    trainable = train.trainable_filter(lab)

    def loss_and_grads(m, batch, start_layer):
      gdef, params, rest = nnx.split(m, trainable, ...)
      fn = lambda p: objective.objective(nnx.merge(gdef, p, rest), batch, key, terms,
                                         start_layer)[0]
      return jax.jit(jax.value_and_grad(fn))(params)

    full_loss, full_grads = loss_and_grads(model, tokens, 0)
    lab_loss, lab_grads = loss_and_grads(lab_model, feats, 1)
  assert lab.train.trainable_top_layers == 1
  np.testing.assert_allclose(lab_loss, full_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               lab_grads, full_grads)


def test_lab_run_trains_and_reports_metrics(cached, tmp_path):
  _, _, out, _ = cached
  config = loss_lab.lab_config(out, **{"train.steps": 6, "train.batch_size": 4})
  saved = str(tmp_path / "top.npz")
  result = loss_lab.run(config, out, eval_every=3, n_boot=50, save_to=saved)
  assert [h["step"] for h in result["history"]] == [3, 6]
  assert 0 <= result["pairwise_accuracy"] <= 1 and result["auroc_low"] <= result["auroc"]
  assert result["solutions"] == 32  # 16 pairs, every solution distinct in the synthetic data
  # the saved parameters reproduce the run's final held-out metrics; the pretrained top does not
  again = loss_lab.evaluate_saved(out, saved, "validation", batch_size=4, n_boot=50)
  assert again == {k: result[k] for k in again}
  start = loss_lab.evaluate_saved(out, out, "validation", batch_size=4, n_boot=50)
  assert start["auroc"] != result["auroc"]


def test_cache_resumes_and_refuses_other_settings(cached):
  config, model, out, mesh = cached
  shard = os.path.join(out, "validation", "00001")
  before = np.load(os.path.join(shard, "features.npy"))
  os.rename(shard, shard + ".gone")  # as if killed before this shard
  with sharding.use_mesh(mesh):
    cache_features.cache(config, model, 1, out, limit=16, batch_size=8)
    np.testing.assert_array_equal(np.load(os.path.join(shard, "features.npy")), before)
    with pytest.raises(ValueError, match="other settings"):
      cache_features.cache(config, model, 2, out, limit=16, batch_size=8)
    cfg = model.backbone.cfg  # how the backbone runs is not a setting of its states
    model.backbone.cfg = dataclasses.replace(cfg, remat="full", scan_layers=True)
    try:
      cache_features.cache(config, model, 1, out, limit=16, batch_size=8)
    finally:
      model.backbone.cfg = cfg


def test_feature_source_pickles_for_worker_processes(cached):
  _, _, out, _ = cached
  src = cache_features.FeatureSource(out, "train")
  want = src[3]  # opens a shard (memory maps + the lock that guards opening)
  back = pickle.loads(pickle.dumps(src))
  for k, v in back[3].items():
    np.testing.assert_array_equal(v, want[k])
