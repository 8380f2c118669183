"""Loss lab: train the top of a reward model on cached backbone features (``rmjax.cache_features``).

Only the blocks from the cached layer up, the final norm and the head are trained, with the very
same ``train_step``, training and evaluation loops (``rmjax.train``: ``loop``, ``batch_outputs``;
no checkpoints) and loss terms (``rmjax.objective``) as full training, and the same metrics
(``rmjax.eval.metrics``) — a loss that helps here is a loss that helps there, at a fraction of
the cost. ``scripts/loss_lab.py`` sweeps settings and seeds with it.

# B: batch of pairs, N: held-out solutions
"""
from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rmjax import objective, sharding, train
from rmjax.cache_features import FeatureSource, top_param_paths
from rmjax.config_tools import flatten, override
from rmjax.eval.metrics import auroc_ci, pairwise_accuracy, unique_solutions
from rmjax.train import make_eval_step, make_train_step
from rmjax.train_state import abstract_state, merge, trainable_filter

BATCH_FIELDS = ("features", "tokens", "mask", "response", "margin")


def lab_config(features_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The config the features were cached with, set up to train on them; ``overrides`` are
  dotted paths (``{"loss.beta": 0.1, "optim.lr": "1e-4"}``), a string parsed as
  ``--config.optim.lr=1e-4`` is (``config_tools.override``)."""
  with open(os.path.join(features_dir, "meta.json")) as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(meta["config"])
  config.model = ml_collections.ConfigDict({**meta["model"], "init_from": ""})
  config.train.trainable_top_layers = meta["model"]["num_layers"] - meta["layer"]
  config.train.accum_steps = 1
  return override(config, overrides)


def run_record(config, features_dir: str, **settings) -> dict:
  """What a ``run``'s result depends on, JSON-ready (the features folder, the whole config and
  ``settings`` such as ``eval_every``): sweeps store it with each result and resume only on a match
  (``check_resumable``)."""
  return json.loads(json.dumps({"features": os.path.realpath(features_dir),
                                "config": json.loads(config.to_json()), **settings}))


def check_resumable(stored: dict, record: dict, what: str) -> None:
  """A ValueError unless the stored result ``what`` was run as ``record`` says."""
  if stored.get("run") == record:
    return
  if "run" not in stored:
    raise ValueError(f"{what}: stored without its settings, so it cannot be resumed; use another "
                     "--out or delete it")
  old, new = flatten(stored["run"]), flatten(record)
  diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  raise ValueError(f"{what}: stored with other settings ({'; '.join(diff[:5])}); use another "
                   "--out or delete it")


def load_top_params(state, path: str):
  """Puts saved top parameters into the fresh ``state``: a features folder's
  ``top_params.npz`` (the backbone's own weights) or a run's ``run(save_to=...)`` file."""
  if os.path.isdir(path):
    path = os.path.join(path, "top_params.npz")
  saved = np.load(path)
  flat = dict(nnx.to_flat_state(state))
  for name in saved.files:
    path = ("model", *(int(p) if p.isdigit() else p for p in name.split("/")))
    var = flat[path]
    var.set_value(jax.device_put(saved[name].astype(var.dtype), var[...].sharding))
  return nnx.from_flat_state(flat)


def lab_state(config, params: str, mesh):
  """``create_state`` without its random initialisation (set-up time: docs/loss_lab.md): the
  lab runs only the blocks from the cached layer up, the final norm and the head, all loaded from
  ``params`` (a features folder or a run's saved top); every other parameter is zeros, never read.
  Call under ``mesh``."""
  graphdef, abstract = abstract_state(config, mesh)
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), abstract)
  return graphdef, load_top_params(state, params)


def lab_batch(rows: dict) -> dict:
  """The fields a lab step reads, features in float32 (cached in the backbone's dtype)."""
  return {k: rows[k].astype(np.float32) if k == "features" else rows[k] for k in BATCH_FIELDS}


def pair_rewards(eval_step, state, data: dict, batch_size: int):
  """``(reward_chosen_N, reward_rejected_N)`` of every pair of ``data`` (``source.arrays()``):
  ``train.batch_outputs`` over its ``train.padded_batches``."""
  return train.batch_outputs(eval_step, state, ((lab_batch(b), n) for b, n in
                                                train.padded_batches(data, batch_size)),
                             jax.tree.leaves(state)[0].sharding.mesh)


def evaluate(eval_step, state, source: FeatureSource, batch_size: int, *, n_boot: int = 1000
             ) -> dict[str, float]:
  """Pairwise accuracy over held-out pairs, and AUROC (with a by-problem bootstrap CI) over the
  distinct solutions in them (a solution in several pairs counts once)."""
  data = source.arrays()
  n = len(source)
  chosen, rejected = pair_rewards(eval_step, state, data, batch_size)
  rewards = np.stack([chosen, rejected], 1).reshape(-1)
  labels = np.tile([1, 0], n)
  groups = np.repeat(data["problem_id"], 2)
  first = unique_solutions(data["tokens"], groups)
  ci = auroc_ci(rewards[first], labels[first], groups[first], n_boot=n_boot, seed=0)
  return {"pairwise_accuracy": pairwise_accuracy(chosen, rejected), "auroc": ci["auroc"],
          "auroc_low": ci["low"], "auroc_high": ci["high"], "solutions": int(len(first))}


def evaluate_saved(features_dir: str, params: str, split: str, *, batch_size: int = 8,
                   n_boot: int = 1000) -> dict[str, float]:
  """``evaluate`` for a run's saved top parameters (``run(save_to=...)``) on a split of cached
  features (e.g. a test split cached later, in its own folder, from the same backbone and layer)."""
  config = lab_config(features_dir)
  source = FeatureSource(features_dir, split)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.mesh.rules):
    graphdef, state = lab_state(config, params, mesh)
    eval_step = jax.jit(make_eval_step(graphdef, source.meta["layer"]))
    return evaluate(eval_step, state, source, batch_size, n_boot=n_boot)


def run(config, features_dir: str, *, eval_split: str = "validation", eval_every: int = 0,
        n_boot: int = 1000, progress: bool = False, save_to: str = "") -> dict:
  """Trains ``config.train.steps`` steps on the cached ``train`` split; returns the final held-out
  metrics and the curve ``history`` (every ``eval_every`` steps, 0 = only at the end).
  ``save_to``: an ``.npz`` for the trained parameters (``cache_features.top_param_paths`` keys)."""
  train_src, eval_src = FeatureSource(features_dir, "train"), FeatureSource(features_dir, eval_split)
  layer = train_src.meta["layer"]
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.mesh.rules):
    graphdef, state = lab_state(config, features_dir, mesh)
    terms = objective.build_terms(config.loss)
    step_fn = jax.jit(make_train_step(graphdef, terms, accum_steps=1, seed=config.seed,
                                      trainable=trainable_filter(config), start_layer=layer),
                      donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, layer))
    batches = iter(grain.MapDataset.source(train_src).shuffle(seed=config.seed).repeat()
                   .map(lab_batch).batch(config.train.batch_size, drop_remainder=True))
    history = []
    for step, state, metrics, _ in train.loop(
        step_fn, state, (sharding.host_to_global(b, mesh, config.mesh.rules) for b in batches),
        start=0, steps=config.train.steps, every={"eval": eval_every or config.train.steps},
        max_nonfinite=config.optim.get("max_consecutive_nonfinite")):  # absent in old caches
      m = evaluate(eval_step, state, eval_src, config.train.batch_size, n_boot=n_boot)
      history.append({"step": step, "train_loss": float(metrics["loss"]), **m})
      if progress:
        print(json.dumps(history[-1]), flush=True)
    if save_to:
      model, _ = merge(graphdef, state)
      params = {"/".join(map(str, p)): np.asarray(jax.device_get(v[...]))
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
      np.savez(save_to, **{p: params[p] for p in top_param_paths(params, layer)})
  return {**history[-1], "history": history}
