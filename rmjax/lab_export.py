"""A loss-lab run as a usable reward model: the cached-from backbone's blocks below the cached
layer, joined to the lab's trained top (blocks from the layer up, final norm, head).

  python -m rmjax.lab_export --features=runs/feat --params=runs/lab/bt_s0.npz --out=runs/bt_s0 \
      [--hf_out=runs/bt_s0_hf] [--backbone=RUN_DIR|config]

``--params`` is a lab run's saved top (``loss_lab.run(save_to=...)``, e.g. ``scripts/
experiment_gsm8k.py``'s ``<name>.npz``). ``--out`` becomes an rmjax run folder (``config.json``,
``checkpoints/0/``, ``lab_export.json``, and ``reward_stats.json`` from the lab's evaluation
of the cached validation split): ``rmjax.score --model=OUT``, ``rmjax.evaluate``,
``rmjax.checkpoint.load_trained`` and ``rmjax.convert export-hf`` read it like a trained run.
``--hf_out`` also writes a Hugging Face sequence-classifier folder (``rmjax.convert.export``).

The backbone is the one ``meta.json`` of the features folder names (``meta["backbone"]``: the
config's model, or a trained run); ``--backbone`` overrides it for caches made before it was
recorded. Either way its weights must hash to the cache's ``weights_sha256``: the lower blocks
are exactly those that made the features.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rmjax import sharding, train_state
from rmjax.cache_features import FeatureSource, top_param_paths, weights_sha256
from rmjax.checkpoint import load_trained, write_json
from rmjax.data.tokenizer import resolve_convention
from rmjax.eval.metrics import reward_stats, unique_solutions
from rmjax.loss_lab import lab_config, lab_state, pair_rewards
from rmjax.train import make_eval_step

STEP = 0  # the exported run's only checkpoint


def load_backbone(features_dir: str, mesh, backbone: str = ""):
  """The ``RewardModel`` the features in ``features_dir`` were cached from, checked against the
  cache's ``weights_sha256``. ``backbone``: ``"config"`` or a run folder, instead of the
  features' ``meta["backbone"]``. Call under ``sharding.use_mesh(mesh)``."""
  meta_path = os.path.join(features_dir, "meta.json")
  with open(meta_path) as f:
    meta = json.load(f)
  source = ({"config": True} if backbone == "config" else
            {"checkpoint": os.path.abspath(backbone)} if backbone else meta.get("backbone"))
  if source is None:
    raise ValueError(
        f"{meta_path}: no 'backbone' entry (cached before rmjax recorded where the backbone came "
        "from). Run rmjax.cache_features again with the same flags (it keeps the cached shards "
        "and completes meta.json), or pass --backbone=RUN_DIR (the --checkpoint it was cached "
        "with) or --backbone=config (the features' config: model.init_from or random init)")
  if "checkpoint" in source:
    _, model = load_trained(source["checkpoint"], mesh)
    where = f"the run {source['checkpoint']}"
  else:
    config = ml_collections.ConfigDict(meta["config"])
    model, _ = train_state.merge(*train_state.create_state(config, mesh))
    where = (f"model.init_from={config.model.init_from}" if config.model.get("init_from")
             else f"the random init of seed {config.seed}")
  flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  if weights_sha256(flat) != meta["weights_sha256"]:
    raise ValueError(f"{meta_path}: the backbone from {where} is not the one these features were "
                     "cached from (its weights differ); pass --backbone with the right one")
  return model


def put_top(model, params_path: str, layer: int) -> None:
  """Replaces ``model``'s top (``top_param_paths`` for ``layer``) by the saved lab parameters."""
  saved = np.load(params_path)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  by_name = {"/".join(map(str, p)): p for p in flat}
  want = set(top_param_paths(list(by_name), layer))
  missing, extra = sorted(want - set(saved.files)), sorted(set(saved.files) - want)
  if missing or extra:
    raise ValueError(f"{params_path}: not a lab top for features entering block {layer} "
                     f"(missing {missing[:3]}, unexpected {extra[:3]}); use the --features the "
                     "lab run trained on")
  for name in saved.files:
    var = flat[by_name[name]]
    if saved[name].shape != var.shape:
      raise ValueError(f"{params_path}: {name} has shape {saved[name].shape}, the backbone's "
                       f"{var.shape}")
    var.set_value(jax.device_put(saved[name].astype(var.dtype), var[...].sharding))
  nnx.update(model, nnx.from_flat_state(flat))


def validation_stats(features_dir: str, params_path: str, mesh, batch_size: int = 8) -> dict:
  """``reward_stats.json`` as ``rmjax.train`` writes it, from the lab's own evaluation: the
  rewards of the distinct cached validation solutions under the saved top."""
  config, source = lab_config(features_dir), FeatureSource(features_dir, "validation")
  graphdef, state = lab_state(config, params_path, mesh)
  data = source.arrays()
  chosen, rejected = pair_rewards(jax.jit(make_eval_step(graphdef, source.meta["layer"])), state,
                                  data, batch_size)
  first = unique_solutions(data["tokens"], np.repeat(data["problem_id"], 2))
  stats = reward_stats(np.stack([chosen, rejected], 1).reshape(-1)[first])
  return {"mean": stats["mean"], "std": stats["std"], "split": "validation", "n": stats["n"],
          "step": STEP}


def export_lab_run(features_dir: str, params_path: str, out: str, *, hf_out: str = "",
                   backbone: str = "", mesh=None) -> dict:
  """Writes the run folder ``out`` (and the HF folder ``hf_out``); returns ``lab_export.json``."""
  mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  if os.path.exists(os.path.join(out, "checkpoints")):
    raise FileExistsError(f"{out}: holds a run already; use another --out")
  config = lab_config(features_dir)
  with open(os.path.join(features_dir, "meta.json")) as f:
    meta = json.load(f)
  layer, cached = meta["layer"], meta["config"]
  # the run tokenises as the cache did; with model.init_from gone from the run's config (the
  # architecture is written out), its convention must be too
  config.data.convention = resolve_convention(cached["data"].get("convention", ""),
                                              cached["model"].get("init_from", ""))
  with sharding.use_mesh(mesh, config.mesh.rules):
    model = load_backbone(features_dir, mesh, backbone)
    put_top(model, params_path, layer)
    optimizer = nnx.Optimizer(
        model, train_state.make_optimizer(config.optim, config.train.steps),
        wrt=train_state.trainable_filter(config, model.backbone.cfg.num_layers))
    state = nnx.state({"model": model, "optimizer": optimizer})
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")))
    manager.save(STEP, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    write_json(os.path.join(out, "config.json"), json.loads(config.to_json_best_effort()),
               indent=2)
    record = {"features": os.path.realpath(features_dir), "params": os.path.realpath(params_path),
              "layer": layer, "hf_out": hf_out}
    write_json(os.path.join(out, "lab_export.json"), record, indent=2)
    stats = None
    if "validation" in FeatureSource.splits(features_dir):
      stats = validation_stats(features_dir, params_path, mesh)
      write_json(os.path.join(out, "reward_stats.json"), stats, indent=2)
    if hf_out:
      from rmjax.convert.export import export_reward_model
      from rmjax.data.sources import make_tokenizer
      tokenizer = make_tokenizer(config)
      export_reward_model(model, hf_out, tokenizer=tokenizer if hasattr(tokenizer, "hf") else None,
                          pad_token_id=tokenizer.pad_id, reward_stats=stats)
  return record


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m rmjax.lab_export",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--features", required=True, help="the features folder the lab trained on")
  ap.add_argument("--params", required=True, help="the lab run's saved top (.npz)")
  ap.add_argument("--out", required=True, help="rmjax run folder to write")
  ap.add_argument("--hf_out", default="", help="also a Hugging Face folder")
  ap.add_argument("--backbone", default="", help="'config' or a run folder, for caches without "
                  "meta['backbone']")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  print(json.dumps(export_lab_run(args.features, args.params, args.out, hf_out=args.hf_out,
                                  backbone=args.backbone)))


if __name__ == "__main__":
  main()
