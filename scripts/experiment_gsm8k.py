"""SmolLM2-135M-Instruct reward models on GSM8K model solutions: BT vs BT + contrastive.

  # 1. features of the frozen backbone entering block 29 of 30 (top block + head trainable);
  #    --layer=28 for the top 2 blocks
  python -m rmjax.cache_features --config=configs/gsm8k_smollm2.py --layer=29 \
      --splits=train,validation --limit=train=640,validation=0 --out=runs/features_gsm8k_l29
  # 1b. (error localisation) the same for gsm8k_perturbed's validation pairs
  python -m rmjax.cache_features --config=configs/gsm8k_smollm2.py:perturbed --layer=29 \
      --splits=validation --limit=240 --out=runs/features_perturbed_l29
  # 2. every variant x seed on them (resumable: finished runs are kept in results.json, each with
  #    its settings; a rerun with other settings into the same --out is refused)
  python scripts/experiment_gsm8k.py --features=runs/features_gsm8k_l29 --out=runs/exp_l29 \
      --perturbed=runs/features_perturbed_l29
  # 3. once, at the end: the test problems (cached in their own folder; nothing is tuned on them)
  python -m rmjax.cache_features --config=configs/gsm8k_smollm2.py --layer=29 --splits=test \
      --out=runs/features_gsm8k_l29_test
  python scripts/experiment_gsm8k.py ... --test=runs/features_gsm8k_l29_test

Variants: ``bt`` (beta 0), ``paper`` (paper contrastive, random future goal), ``paper_avg`` and
``paper_final`` (goal strategies), ``infonce`` (in-batch negatives, tau 0.1). Every run has the same
steps, batch, learning rate and data order per seed. Held-out = the validation problems (no
problem of the training pairs); nothing is tuned on them. Summaries are mean ± sample sd (ddof 1)
over seeds. ``--test`` evaluates the finished runs on the test problems too (pairwise accuracy,
AUROC; voting for seed 0). Writes ``results.json``, ``results.md`` (see docs/results.md) and each
run's trained parameters (``<variant>_s<seed>.npz``). For seed 0 of each variant it also runs
goal-filtered majority voting over the held-out problems' solutions (``rmjax.eval.voting``; goal =
mean final-token state of the training pairs' correct solutions): voting accuracy, tokens saved at
equal accuracy, and the paper's rule (drop once Q_t < 0 after 5 tokens), and with ``--perturbed``
error localisation: the hit rate of the largest drop of Q_t (and of the prefix reward) in the
changed calculation's line, against a random position and against the pretrained top block's own
Q_t (no reward-model training).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np

VARIANTS = {
    "bt": {"loss.beta": 0.0},
    "paper": {"loss.beta": 0.5, "loss.contrastive.mode": "paper", "loss.contrastive.goal": "random"},
    "paper_avg": {"loss.beta": 0.5, "loss.contrastive.mode": "paper",
                  "loss.contrastive.goal": "avg"},
    "paper_final": {"loss.beta": 0.5, "loss.contrastive.mode": "paper",
                    "loss.contrastive.goal": "final"},
    "infonce": {"loss.beta": 0.5, "loss.contrastive.mode": "infonce",
                "loss.contrastive.temperature": 0.1},
}


ANSWER = re.compile(r"A:\s*(.+?)\s*$")


def final_answer(text: str):
  """GSM8K model solutions end with ``A: <answer>``; None when a solution has no such line."""
  for line in reversed(text.strip().splitlines()):
    if m := ANSWER.search(line):
      return m.group(1).replace(",", "").rstrip(".")
  return None


class TrainedTop:
  """A run's trained top (``<variant>_s<seed>.npz``) on cached features: last-layer states of
  cached sequences, and the goal state = mean final-token state of the training pairs' correct
  (chosen) solutions."""

  def __init__(self, features: str, params: str):
    import jax

    from rmjax import loss_lab, sharding, train_state
    from rmjax.cache_features import FeatureSource
    from rmjax.data.sources import make_tokenizer
    from rmjax.eval import goal as goal_lib

    self.config = loss_lab.lab_config(features)
    layer = FeatureSource(features, "train").meta["layer"]
    self.tokenizer = make_tokenizer(self.config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(mesh, self.config.mesh.rules):
      model, _ = train_state.merge(*loss_lab.lab_state(self.config, params, mesh))
    self.head = lambda h: np.asarray(model.head(h))[..., 0]
    self._hidden = jax.jit(lambda x, m: model.from_features(x, m, layer)[1])
    h, rows, _, _ = self.sequences(features, "train", chosen_only=True)
    self.goal = goal_lib.goal_state(goal_lib.final_token_states(h, rows["mask"]))

  def sequences(self, features: str, split: str, chosen_only: bool = False,
                rejected_only: bool = False):
    """Distinct cached sequences of a split (pair order): ``(h, rows, is_chosen, problem)``;
    ``rejected_only`` keeps every rejected sequence, in pair order."""
    from rmjax.cache_features import FeatureSource
    data = FeatureSource(features, split).arrays()
    n, l = data["mask"].shape[0], data["mask"].shape[2]
    rows = {k: data[k].reshape(n * 2, l, *data[k].shape[3:]) for k in
            ("features", "tokens", "mask", "response")}
    label = np.tile([True, False], n)
    problem = np.repeat(data["problem_id"], 2)
    if rejected_only:
      keep = np.arange(1, 2 * n, 2)
    else:
      _, keep = np.unique(rows["tokens"], axis=0, return_index=True)
      keep = np.sort(keep[label[keep]] if chosen_only else keep)
    h = np.concatenate([np.asarray(self._hidden(rows["features"][idx].astype(np.float32),
                                                rows["mask"][idx]))
                        for idx in (keep[j:j + 16] for j in range(0, len(keep), 16))])
    return h, {k: v[keep] for k, v in rows.items()}, label[keep], problem[keep]

  def q_values(self, h, mask):
    from rmjax.eval import goal as goal_lib
    return np.asarray(goal_lib.q_values(h, self.goal, mask))


def voting_analysis(top: TrainedTop, features: str, thresholds, split: str = "validation"
                    ) -> dict:
  """Goal-filtered majority voting with the run's Q_t = cos(h_t, goal) over the held-out
  solutions."""
  from rmjax.eval import voting
  h, rows, label, problem = top.sequences(features, split)
  q = top.q_values(h, rows["mask"])
  solutions = []
  # a neutral order within each problem: the vote breaks ties by order, and pair rows put the
  # correct solution first
  for i in np.random.default_rng(0).permutation(len(label)):
    resp = rows["response"][i].astype(bool)
    solutions.append({"problem_id": int(problem[i]), "is_correct": bool(label[i]), "q": q[i][resp],
                      "answer": final_answer(top.tokenizer.decode(rows["tokens"][i][resp]))})
  curve = voting.voting_curve(solutions, thresholds, min_tokens=5)
  return {"unfiltered_accuracy": curve["unfiltered_accuracy"],
          "tokens_saved_at_equal_accuracy": voting.tokens_saved_at_accuracy(curve),
          "paper_threshold_0": next(r for r in curve["curve"] if r["threshold"] == 0.0),
          "curve": curve["curve"], "problems": curve["curve"][0]["n_problems"],
          "answers_found": float(np.mean([s["answer"] is not None for s in solutions]))}


def localization_analysis(top: TrainedTop, perturbed: str, k: int = 3) -> dict:
  """Where Q_t (and the prefix reward) of each perturbed validation solution drops, against the
  changed calculation's position (``gsm8k_perturbed``'s ``error_char``): hit rates per window
  (``step``: the error to the end of its line; ``within_k``) and the random-position baseline."""
  from rmjax import loss_lab
  from rmjax.data import sources
  from rmjax.eval import localize
  from rmjax.evaluate import error_windows
  h, rows, _, _ = top.sequences(perturbed, "validation", rejected_only=True)
  q = top.q_values(h, rows["mask"])
  resp = rows["response"].astype(bool)
  q_traces = [qi[m] for qi, m in zip(q, resp)]
  r_traces = [top.head(hi[m]) for hi, m in zip(h, resp)]
  source = sources.make_source(loss_lab.lab_config(perturbed), "validation")
  examples = [source[i] for i in range(len(q_traces))]
  windows, keep = error_windows(examples, top.tokenizer, [len(t) for t in q_traces], k)
  kept = lambda traces: [t for t, ok in zip(traces, keep) if ok]
  return {"n_truncated_left_out": int(np.sum(~keep)),
          "q_largest_drop": localize.localization_metrics(kept(q_traces), windows),
          "prefix_reward_largest_drop": localize.localization_metrics(kept(r_traces), windows)}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--features", default="runs/features_gsm8k_l29")
  ap.add_argument("--out", default="runs/exp_l29")
  ap.add_argument("--variants", default="bt,paper,infonce")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--eval_every", type=int, default=20)
  ap.add_argument("--perturbed", default="", help="cached gsm8k_perturbed features (same layer) "
                  "for error localisation")
  ap.add_argument("--test", default="", help="cached features of the test split (same backbone "
                  "and layer): every finished run is also evaluated there, once, after training")
  args = ap.parse_args(argv)

  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  from rmjax import loss_lab
  from rmjax.checkpoint import write_json
  from rmjax.eval.metrics import markdown_table, mean_sd

  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}

  fixed = {"train.steps": args.steps, "train.batch_size": args.batch_size, "optim.lr": args.lr,
           "optim.warmup_steps": max(1, args.steps // 10)}
  for variant in args.variants.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      name = f"{variant}_s{seed}"
      config = loss_lab.lab_config(args.features, **fixed, **VARIANTS[variant], seed=seed)
      record = loss_lab.run_record(config, args.features, eval_every=args.eval_every)
      if name in results:
        loss_lab.check_resumable(results[name], record, f"{results_path}: {name}")
        continue
      t0 = time.perf_counter()
      result = loss_lab.run(config, args.features, eval_every=args.eval_every,
                            save_to=os.path.join(args.out, f"{name}.npz"))
      results[name] = dict(result, variant=variant, seed=seed, seconds=time.perf_counter() - t0,
                           run=record)
      print(json.dumps({k: v for k, v in results[name].items() if k != "history"}), flush=True)
      write_json(results_path, results)

  thresholds = [float(t) for t in np.round(np.arange(-0.2, 0.61, 0.05), 2)]
  for name, result in results.items():
    if result["variant"] not in VARIANTS:
      continue
    saved = os.path.join(args.out, f"{name}.npz")
    test = args.test and "test" not in result
    # seed 0: voting, localisation and test voting, all on one trained top (the goal always
    # comes from the training solutions)
    analyses = result["seed"] == 0 and (
        "voting" not in result or (args.perturbed and "localization" not in result) or test)
    top = TrainedTop(args.features, saved) if analyses else None
    if top and "voting" not in result:
      result["voting"] = voting_analysis(top, args.features, thresholds)
      print(json.dumps({name: {k: v for k, v in result["voting"].items() if k != "curve"}}))
    if top and args.perturbed and "localization" not in result:
      result["localization"] = localization_analysis(top, args.perturbed)
      print(json.dumps({name: result["localization"]}))
    if test:
      result["test"] = loss_lab.evaluate_saved(args.test, saved, "test",
                                               batch_size=args.batch_size)
      if top:
        result["test"]["voting"] = voting_analysis(top, args.test, thresholds, split="test")
      print(json.dumps({name: {k: v for k, v in result["test"].items() if k != "voting"}}))
    write_json(results_path, results)

  if args.perturbed and "pretrained" not in results:
    # control: Q_t of the pretrained top block itself (no reward-model training); the goal is
    # still the mean final-token state of the correct training solutions
    top = TrainedTop(args.features, os.path.join(args.features, "top_params.npz"))
    results["pretrained"] = {"variant": "pretrained", "seed": None,
                             "localization": localization_analysis(top, args.perturbed)}
    print(json.dumps(results["pretrained"]))
    write_json(results_path, results)

  rows = []
  for variant in VARIANTS:
    runs = [r for r in results.values() if r["variant"] == variant]
    if not runs:
      continue
    acc, auc = [r["pairwise_accuracy"] for r in runs], [r["auroc"] for r in runs]
    first = min(runs, key=lambda r: r["seed"])
    rows.append({"variant": variant, "seeds": len(runs),
                 "pairwise acc": mean_sd(acc), "AUROC": mean_sd(auc),
                 f"AUROC 95% CI (seed {first['seed']})":
                     f"[{first['auroc_low']:.3f}, {first['auroc_high']:.3f}]",
                 "solutions": first["solutions"]})
    if vote := first.get("voting"):  # seed 0 only
      rows[-1].update({
          "voting acc (seed 0)": f"{vote['unfiltered_accuracy']:.3f}",
          "tokens saved at equal acc": f"{vote['tokens_saved_at_equal_accuracy']:.3f}",
          "acc / saved at Q<0 (m=5)": f"{vote['paper_threshold_0']['accuracy']:.3f} / "
                                      f"{vote['paper_threshold_0']['tokens_saved']:.3f}"})
    if tests := [r["test"] for r in runs if "test" in r]:
      acc, auc = [t["pairwise_accuracy"] for t in tests], [t["auroc"] for t in tests]
      rows[-1]["test: pairwise acc"], rows[-1]["test: AUROC"] = mean_sd(acc), mean_sd(auc)
      if "voting" in (t0 := first.get("test", {})):
        rows[-1]["test: CI (seed 0), voting acc, tokens saved"] = (
            f"[{t0['auroc_low']:.3f}, {t0['auroc_high']:.3f}], "
            f"{t0['voting']['unfiltered_accuracy']:.3f}, "
            f"{t0['voting']['tokens_saved_at_equal_accuracy']:.3f}")
    if loc := first.get("localization"):
      q, r = loc["q_largest_drop"], loc["prefix_reward_largest_drop"]
      rows[-1]["error step hit: Q_t / prefix reward / random"] = (
          f"{q['hit_rate_step']:.3f} / {r['hit_rate_step']:.3f} / "
          f"{q['random_hit_rate_step']:.3f}")
  table = markdown_table(rows) + "\nmean ± sample standard deviation (ddof 1) over seeds\n"
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
