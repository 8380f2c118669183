"""Cached features + loss lab: the same loss as the full model, the lab loop, resumable caching."""
import dataclasses
import importlib.util
import json
import os
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import cache_features, loss_lab, objective, sharding, train_state
from tests.helpers import assert_tree_close, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """A tiny random model (2 layers) and its features entering block 1, 16 pairs per split."""
  out = str(tmp_path_factory.mktemp("features"))
  config = tiny_config("paper")
  config.model.num_layers = 2
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    model, _ = train_state.merge(*train_state.create_state(config))
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
    lab_model, _ = train_state.unpack(nnx.merge(*loss_lab.lab_state(lab, out, mesh)))
    trainable = train_state.trainable_filter(lab)

    def loss_and_grads(m, batch, start_layer):
      gdef, params, rest = nnx.split(m, trainable, ...)
      fn = lambda p: objective.objective(nnx.merge(gdef, p, rest), batch, key, terms,
                                         start_layer)[0]
      return jax.jit(jax.value_and_grad(fn))(params)

    full_loss, full_grads = loss_and_grads(model, tokens, 0)
    lab_loss, lab_grads = loss_and_grads(lab_model, feats, 1)
  assert lab.train.trainable_top_layers == 1
  np.testing.assert_allclose(lab_loss, full_loss, rtol=1e-5)
  assert_tree_close(lab_grads, full_grads, rtol=1e-4)  # float32 rounding, not a dropped term


def test_lab_run_fits_its_training_pairs_and_reports_metrics(cached, tmp_path, monkeypatch):
  """16 training pairs, all in each step's batch: the run must lower their loss and rank them
  better than the pretrained top (deterministic: fixed features, seed and batch order). Its loop
  and evaluation make no implicit transfer, as the trainer's (set-up may: test_train)."""
  _, _, out, _ = cached
  config = loss_lab.lab_config(out, **{"train.steps": 9, "train.batch_size": 16,
                                       "optim.lr": 1e-2, "optim.warmup_steps": 0})
  saved = str(tmp_path / "top.npz")

  def allowed(f):
    def run(*args, **kwargs):
      with jax.transfer_guard("allow"):
        return f(*args, **kwargs)
    return run
  for name in ("lab_state", "make_train_step", "make_eval_step"):
    monkeypatch.setattr(loss_lab, name, allowed(getattr(loss_lab, name)))
  with jax.transfer_guard("disallow"):
    result = loss_lab.run(config, out, eval_every=3, n_boot=50, save_to=saved)
  monkeypatch.undo()
  history = result["history"]
  assert [h["step"] for h in history] == [3, 6, 9]
  losses = [h["train_loss"] for h in history]  # the whole train split's loss at each step
  assert losses[0] > losses[1] > losses[2] and losses[2] < 0.9 * losses[0], losses
  assert 0 <= result["pairwise_accuracy"] <= 1 and result["auroc_low"] <= result["auroc"]
  assert result["solutions"] == 32  # 16 pairs, every solution distinct in the synthetic data
  # the saved parameters reproduce the run's final held-out metrics
  again = loss_lab.evaluate_saved(out, saved, "validation", batch_size=4, n_boot=50)
  assert again == {k: result[k] for k in again}
  # on the pairs it trained on, the saved top ranks far better than the pretrained one
  fitted = loss_lab.evaluate_saved(out, saved, "train", batch_size=4, n_boot=50)
  start = loss_lab.evaluate_saved(out, out, "train", batch_size=4, n_boot=50)
  assert fitted["pairwise_accuracy"] >= start["pairwise_accuracy"] + 0.25, (fitted, start)
  assert fitted["auroc"] >= start["auroc"] + 0.2, (fitted, start)


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


def _meta_dir(tmp_path):
  """A features folder's meta.json alone (all ``lab_config`` reads), from the tiny config."""
  config = tiny_config("paper")
  meta = {"config": config.to_dict(), "layer": 1,
          "model": dict(config.model.to_dict(), num_layers=2, head_dim=8)}
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  return str(tmp_path)


def test_lab_config_parses_command_line_values(tmp_path):
  features = _meta_dir(tmp_path)
  config = loss_lab.lab_config(features, **{
      "loss.sparse_last_block": "False", "optim.lr": "1e-4", "train.steps": "7",
      "mesh.dcn_shape": "(1, 1, 1)", "loss.contrastive.goal": "avg", "loss.custom": "",
      "seed": 3})
  assert config.loss.sparse_last_block is False
  assert config.optim.lr == 1e-4 and config.train.steps == 7 and config.seed == 3
  assert tuple(config.mesh.dcn_shape) == (1, 1, 1)  # a None field takes the parsed value
  assert config.loss.contrastive.goal == "avg" and config.loss.custom == ""
  for field, value in (("train.steps", "2.5"), ("loss.sparse_last_block", "maybe"),
                       ("train.steps", 2.5)):
    with pytest.raises(ValueError, match=f"config field '{field}'"):
      loss_lab.lab_config(features, **{field: value})
  for field in ("train.nope", "train.steps.x"):
    with pytest.raises(ValueError, match=f"unknown config field '{field}'"):
      loss_lab.lab_config(features, **{field: "1"})


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_loss_lab_script_resumes_only_runs_with_the_same_settings(tmp_path, monkeypatch):
  features = _meta_dir(tmp_path)
  meta = json.loads((tmp_path / "meta.json").read_text())
  meta["config"]["loss"]["beta"] = 0.25  # the custom term's weight when none is set
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  trained, saved = [], []

  def fake_run(config, features_dir, **kwargs):  # the script's bookkeeping, not the training
    trained.append(config)
    saved.append(kwargs["save_to"])
    point = {"step": 2, "pairwise_accuracy": 0.5, "auroc": 0.5}
    return {**point, "auroc_low": 0.4, "auroc_high": 0.6, "solutions": 4, "history": [point]}

  monkeypatch.setattr(loss_lab, "run", fake_run)
  args = [f"--features={features}", "--loss=rmjax.losses:bt_term", "--seeds=0", "--steps=2",
          f"--out={tmp_path / 'lab'}"]
  script = _script("loss_lab")
  script.main(args)
  assert len(trained) == 1 and trained[0].loss.beta == 0.0 and saved == [""]
  assert trained[0].loss.custom == "rmjax.losses:bt_term=0.25"
  script.main(args)  # same settings: resumed, not run again
  assert len(trained) == 1
  for changed, diff in (("--steps=3", "config.train.steps: 2 -> 3"),
                        ("--set=optim.lr=0.5", "config.optim.lr: "), ("--n_boot=10", "n_boot: ")):
    with pytest.raises(ValueError, match=f"stored with other settings \\({diff}"):
      script.main(args + [changed])
  assert len(trained) == 1
  sweep = [f"--features={features}", "--sweep=beta=0,0.5", "--sweep=lr=1e-4", "--seeds=1",
           "--steps=2", f"--out={tmp_path / 'tops'}", "--save_tops"]
  script.main(sweep)  # each run's top kept for rmjax.lab_export
  assert saved[1:] == [str(tmp_path / "tops" / f"beta={b}_lr=1e-4_s1.npz") for b in ("0", "0.5")]


@pytest.mark.slow  # over a minute on 2 cores: -m slow
def test_exported_lab_run_scores_as_the_lab_evaluates(cached, tmp_path):
  """Cached backbone's lower block + the lab's trained top, as a run folder and an HF folder: the
  full models, from tokens, give the lab's held-out rewards (from features) and accuracy."""
  from rmjax import convert, lab_export
  from rmjax.checkpoint import load_trained
  from rmjax.eval.metrics import pairwise_accuracy, unique_solutions
  _, model, out, mesh = cached
  config = loss_lab.lab_config(out, **{"train.steps": 3, "train.batch_size": 16,
                                       "optim.lr": 1e-2, "optim.warmup_steps": 0})
  saved, run_dir, hf_dir = (str(tmp_path / n) for n in ("top.npz", "run", "hf"))
  result = loss_lab.run(config, out, n_boot=20, save_to=saved)
  data = cache_features.FeatureSource(out, "validation").arrays()
  n, _, l = data["tokens"].shape
  with sharding.use_mesh(mesh):
    graphdef, state = loss_lab.lab_state(loss_lab.lab_config(out), saved, mesh)
    lab_c, lab_r = loss_lab.pair_rewards(jax.jit(loss_lab.make_eval_step(graphdef, 1)), state,
                                         data, 4)
    lab_export.export_lab_run(out, saved, run_dir, hf_out=hf_dir, mesh=mesh)
    tokens, mask = data["tokens"].reshape(2 * n, l), data["mask"].reshape(2 * n, l)
    _, run_model = load_trained(run_dir, mesh)
    hf_model = convert.load_reward_model(hf_dir, convert.pretrained_config(hf_dir), mesh)
    before = np.asarray(model(tokens, mask)[0])  # the backbone's own top
    exported = {"run": np.asarray(run_model(tokens, mask)[0]),
                "hf": np.asarray(hf_model(tokens, mask)[0])}
  lab = np.stack([lab_c, lab_r], axis=1).reshape(-1)
  assert pairwise_accuracy(lab_c, lab_r) == result["pairwise_accuracy"]
  scale = np.abs(lab).max()
  assert np.abs(before - lab).max() > 1e-2 * scale  # the lab's top, not the backbone's, is read
  for name, rewards in exported.items():
    assert np.abs(rewards - lab).max() <= 1e-4 * scale, name
    assert pairwise_accuracy(rewards[0::2], rewards[1::2]) == result["pairwise_accuracy"], name
  with open(os.path.join(run_dir, "config.json")) as f:
    assert json.load(f)["data"]["convention"] == "rmjax"  # as the cache tokenised (bytes)
  with open(os.path.join(run_dir, "reward_stats.json")) as f:
    stats = json.load(f)
  first = unique_solutions(data["tokens"], np.repeat(data["problem_id"], 2))
  assert stats["n"] == len(first) and stats["split"] == "validation"
  assert abs(stats["mean"] - lab[first].mean()) <= 1e-6 * scale
  assert stats["std"] == pytest.approx(lab[first].std(), rel=1e-5)
  with pytest.raises(FileExistsError, match="another --out"):
    lab_export.export_lab_run(out, saved, run_dir, mesh=mesh)


def test_export_needs_the_cached_from_backbone(cached, tmp_path):
  from rmjax import lab_export
  _, _, out, mesh = cached
  meta = json.loads(open(os.path.join(out, "meta.json")).read())
  assert meta["backbone"] == {"config": True}
  old = dict(meta)
  del old["backbone"]  # a cache made before the backbone was recorded
  (tmp_path / "meta.json").write_text(json.dumps(old))
  with sharding.use_mesh(mesh):
    with pytest.raises(ValueError, match="no 'backbone' entry.*--backbone=config"):
      lab_export.load_backbone(str(tmp_path), mesh)
    assert lab_export.load_backbone(str(tmp_path), mesh, "config") is not None  # hash matches
    (tmp_path / "meta.json").write_text(json.dumps(
        dict(meta, config=dict(meta["config"], seed=meta["config"]["seed"] + 1))))
    with pytest.raises(ValueError, match="random init of seed .* not the one these features"):
      lab_export.load_backbone(str(tmp_path), mesh)


def test_loading_a_lab_output_as_a_run_says_to_export_it(tmp_path, mesh1):
  from rmjax.checkpoint import load_trained
  lab_out = tmp_path / "exp"
  lab_out.mkdir()
  np.savez(lab_out / "bt_s0.npz", x=np.zeros(1))
  for path in (lab_out / "bt_s0.npz", lab_out):
    with pytest.raises(FileNotFoundError, match=r"not an rmjax run.*rmjax\.lab_export --features="
                       r"FEATURES_DIR --params=.*bt_s0\.npz"):
      load_trained(str(path), mesh1)
  with pytest.raises(FileNotFoundError, match="no checkpoints in it.*Hugging Face"):
    load_trained(str(tmp_path / "exp" / ".."), mesh1)
