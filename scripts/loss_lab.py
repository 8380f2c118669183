"""Sweep reward-model losses on cached features: a table of held-out accuracy / AUROC + a PNG.

  python scripts/loss_lab.py --features=runs/features_gsm8k_l28 --sweep loss.beta=0,0.5 \
      --seeds=0,1,2 --steps=150 [--loss=my_pkg.losses:my_term] [--set optim.lr=1e-4] \
      [--eval_split=validation] [--out=runs/lab]

``--sweep path=v1,v2,...`` (repeatable) runs every combination, each with every seed. Shorthands:
``beta`` = ``loss.beta``, ``goal`` = ``loss.contrastive.goal``, ``temperature``, ``samples``
(``num_samples``), ``mode``, ``center`` (``loss.center_rewards``).
``--loss=package.module:function`` replaces the built-in contrastive term by your function
(called as ``fn(out: PairOutputs, key)``, see README), weighted by ``beta`` (the features'
config's ``loss.beta`` unless set). Prints one row per run (accuracy; AUROC with a
95% bootstrap interval resampled by problem) and one summary row per setting (mean ± sample sd,
ddof 1, over seeds); writes ``results.json`` (after every run, each result with its settings: a
rerun with the same ``--out`` skips finished runs, and refuses runs stored with other settings),
``results.md`` and ``curves.png`` (held-out accuracy and AUROC against steps, mean over seeds)
to ``--out``. ``--save_tops`` also keeps each run's trained top as ``<out>/<setting>_s<seed>.npz``,
which ``python -m rmjax.lab_export`` turns into a reward model (docs/loss_lab.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

SHORT = {"beta": "loss.beta", "goal": "loss.contrastive.goal", "mode": "loss.contrastive.mode",
         "temperature": "loss.contrastive.temperature",
         "samples": "loss.contrastive.num_samples", "lr": "optim.lr",
         "center": "loss.center_rewards"}


def parse_assignments(items, multi: bool) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"expected path=value, got {item!r}")
    out[SHORT.get(key, key)] = value.split(",") if multi else value
  return out


def plot(results, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, runs in results.items():
    steps = [h["step"] for h in runs[0]["history"]]
    for ax, metric in zip(axes, ("pairwise_accuracy", "auroc")):
      curve = np.mean([[h[metric] for h in r["history"]] for r in runs], axis=0)
      ax.plot(steps, curve, marker="o", label=name)
      ax.set_xlabel("step")
      ax.set_ylabel(f"held-out {metric}")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--features", required=True, help="folder written by rmjax.cache_features")
  ap.add_argument("--loss", default="", help="package.module:function replacing the contrastive "
                  "term (weight: beta)")
  ap.add_argument("--sweep", action="append", default=[], help="path=v1,v2,... (repeatable)")
  ap.add_argument("--set", action="append", default=[], help="path=value fixed for every run")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--eval_every", type=int, default=50)
  ap.add_argument("--eval_split", default="validation")
  ap.add_argument("--n_boot", type=int, default=1000)
  ap.add_argument("--out", default="")
  ap.add_argument("--save_tops", action="store_true", help="keep each run's trained top in --out "
                  "as <setting>_s<seed>.npz (for rmjax.lab_export)")
  args = ap.parse_args(argv)
  if args.save_tops and not args.out:
    raise SystemExit("--save_tops needs --out")

  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  from rmjax import loss_lab
  from rmjax.checkpoint import write_json
  from rmjax.eval.metrics import markdown_table, mean_sd

  fixed = parse_assignments(args.set, multi=False)
  fixed.update({"train.steps": args.steps, "train.batch_size": args.batch_size})
  sweep = parse_assignments(args.sweep, multi=True) or {"loss.beta": [None]}
  # resumable: runs already in --out's results.json are kept, not re-run
  results_path = os.path.join(args.out, "results.json") if args.out else ""
  done = {}
  if results_path and os.path.exists(results_path):
    with open(results_path) as f:
      done = json.load(f)["results"]
  results, rows = {}, []
  for values in itertools.product(*sweep.values()):
    setting = {k: v for k, v in zip(sweep, values) if v is not None}
    name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "config"
    results[name] = []
    for seed in (int(s) for s in args.seeds.split(",")):
      config = loss_lab.lab_config(args.features, **fixed, **setting, seed=seed)
      if args.loss:  # replaces the contrastive term, with its weight
        config.loss.custom, config.loss.beta = f"{args.loss}={config.loss.beta}", 0.0
      record = loss_lab.run_record(config, args.features, eval_split=args.eval_split,
                                   eval_every=args.eval_every, n_boot=args.n_boot)
      result = next((r for r in done.get(name, []) if r["seed"] == seed), None)
      if result is not None:
        loss_lab.check_resumable(result, record, f"{results_path}: {name}, seed {seed}")
      else:
        t0 = time.perf_counter()
        save_to = ""
        if args.save_tops:  # a run resumed from results.json keeps whatever it saved then
          os.makedirs(args.out, exist_ok=True)
          save_to = os.path.join(args.out, name.replace(", ", "_").replace("/", "-")
                                 + f"_s{seed}.npz")
        result = loss_lab.run(config, args.features, eval_split=args.eval_split,
                              eval_every=args.eval_every, n_boot=args.n_boot, save_to=save_to)
        result.update(setting=name, seed=seed, seconds=time.perf_counter() - t0, run=record)
      results[name].append(result)
      if results_path:
        os.makedirs(args.out, exist_ok=True)
        write_json(results_path, {"args": vars(args), "results": {**done, **results}})
      rows.append({"setting": name, "seed": seed, "accuracy": result["pairwise_accuracy"],
                   "AUROC": result["auroc"],
                   "95% CI": f"[{result['auroc_low']:.3f}, {result['auroc_high']:.3f}]",
                   "s": round(result["seconds"])})
      print(json.dumps({k: rows[-1][k] for k in rows[-1]}), flush=True)
  summary = [{"setting": name, "seeds": len(runs),
              "accuracy": mean_sd([r["pairwise_accuracy"] for r in runs]),
              "AUROC": mean_sd([r["auroc"] for r in runs])}
             for name, runs in results.items()]
  table = (markdown_table(rows) + "\n\n" + markdown_table(summary)
           + "\nmean ± sample standard deviation (ddof 1) over seeds\n")
  print(table)
  if args.out:
    with open(os.path.join(args.out, "results.md"), "w") as f:
      f.write(table + "\n")
    plot(results, os.path.join(args.out, "curves.png"))


if __name__ == "__main__":
  main()
