"""Loss lab speed-up, measured side by side: the same top-k training step on cached features vs
through the full (frozen) backbone, on the same batch, with the loss of both printed.

  python scripts/bench_loss_lab.py --features=runs/features_gsm8k_l28 [--steps=3]

The full-backbone side builds the model the features came from (the cached config's
``model.init_from``, or its random init). Per-epoch time = step time x train pairs / batch.
Analytic bound: a step through the backbone costs ~(K + 3(L-K-1) + 3s) block-forwards against
3(L-K-1) + 3s on features (a trained block's backward costs ~2 forwards; frozen blocks need no
backward; s = the last block's share of a dense block's matmul FLOPs, < 1 with
``loss.sparse_last_block``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time



def last_block_share(model: dict, terms, seq_len: int) -> float:
  """Matmul FLOPs of the last block with ``loss.sparse_last_block`` over the dense block's:
  keys and values at every position, the rest at the rows the terms read (attention scores and
  norms left out)."""
  from rmjax import losses
  d, h = model["dim"], model["head_dim"] or model["dim"] // model["num_heads"]
  kv = 2 * d * model["num_kv_heads"] * h
  rest = 2 * d * model["num_heads"] * h + 3 * d * model["mlp_dim"]
  if not terms.sparse:
    return 1.0
  rows = 1 + sum(t.num_samples * (1 + (t.num_goal_samples if t.goal == "avg" else 1))
                 for _, _, t in terms.terms if isinstance(t, losses.ContrastiveTerm))
  return (kv + rest * min(rows, seq_len) / seq_len) / (kv + rest)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--features", required=True)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after a warm-up)")
  ap.add_argument("--batch_size", type=int, default=8)
  args = ap.parse_args(argv)

  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax
  import ml_collections
  import numpy as np

  from rmjax import loss_lab, objective, sharding, train, train_state
  from rmjax.cache_features import FeatureSource

  src = FeatureSource(args.features, "train")
  meta, layer = src.meta, src.meta["layer"]
  lab = loss_lab.lab_config(args.features, **{"train.batch_size": args.batch_size})
  full = ml_collections.ConfigDict(meta["config"])
  full.train.trainable_top_layers = lab.train.trainable_top_layers
  rows = [src[i] for i in range(args.batch_size)]
  feats = {k: np.stack([r[k] for r in rows]) for k in loss_lab.BATCH_FIELDS}
  feats["features"] = feats["features"].astype(np.float32)
  tokens = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "mask", "response", "margin")}
  terms = objective.build_terms(lab.loss)

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  sides = {}
  with sharding.use_mesh(mesh, lab.mesh.rules):
    for name, config, batch, start in (("features", lab, feats, layer), ("full", full, tokens, 0)):
      if name == "features":
        graphdef, state = loss_lab.lab_state(config, args.features, mesh)
      else:
        graphdef, state = train_state.create_state(config, mesh)
      model, _ = train_state.merge(graphdef, state)
      loss = jax.jit(lambda b, m=model, s=start: objective.objective(
          m, b, jax.random.key(0), terms, s)[0])(batch)
      step = jax.jit(train.make_train_step(graphdef, terms, accum_steps=1, seed=0,
                                           trainable=train_state.trainable_filter(config),
                                           start_layer=start), donate_argnums=0)
      state, _ = step(state, batch)  # compile + warm-up
      jax.block_until_ready(state)
      sides[name] = {"loss": float(loss), "step": step, "state": state, "batch": batch, "t": []}
    for _ in range(args.steps):  # alternate, so both sides see the same machine load
      for side in sides.values():
        t0 = time.perf_counter()
        side["state"], _ = side["step"](side["state"], side["batch"])
        jax.block_until_ready(side["state"])
        side["t"].append(time.perf_counter() - t0)
  n_batches = len(src) // args.batch_size
  report = {"layers": meta["model"]["num_layers"], "trainable_top_layers":
            lab.train.trainable_top_layers, "batch_pairs": args.batch_size,
            "seq_len": meta["max_len"], "train_pairs": len(src)}
  for name, side in sides.items():
    report[f"{name}_step_s"] = round(statistics.median(side["t"]), 3)
    report[f"{name}_epoch_s"] = round(statistics.median(side["t"]) * n_batches, 1)
    report[f"{name}_loss"] = side["loss"]
  report["speedup"] = round(report["full_step_s"] / report["features_step_s"], 2)
  report["last_block_share"] = round(last_block_share(meta["model"], terms, meta["max_len"]), 3)
  k, top = layer, report["trainable_top_layers"]
  trained = 3 * (top - 1 + report["last_block_share"])
  report["analytic_bound"] = round((k + trained) / trained, 2)
  report["loss_abs_diff"] = abs(report["full_loss"] - report["features_loss"])
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
