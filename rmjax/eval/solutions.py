"""Labelled single solutions (``rmjax.evaluate --solutions``): the labels and problems of a JSONL
file, checked line by line, and the metrics of their rewards.

Each line is one solution, scored alone: ``{"prompt", "response", "label", "problem_id"?}``,
``{"text", "label", ...}`` or ``{"messages", "label", ...}``; ``label`` is ``true``/``false`` (or
1/0): whether the solution is correct. Lines without ``problem_id`` are each their own problem.

# N: solutions
"""
from __future__ import annotations

import json

import numpy as np

from rmjax.data.readers import iter_jsonl
from rmjax.eval.metrics import auroc_ci, finite_scores


def read_labels(path: str) -> tuple[np.ndarray, list[str]]:
  """``(label_N, problem_N)``: correctness and problem of every line (problems as JSON text, so
  ``1`` and ``"1"`` differ; a line without one: ``line <n>``). Errors name ``path:line``."""
  labels, problems = [], []
  for lineno, record in iter_jsonl(path):
    where = f"{path}:{lineno}"
    if "label" not in record:
      raise ValueError(f"{where}: field 'label' missing (true/false or 1/0: is the solution "
                       "correct?)")
    label = record["label"]
    if not (isinstance(label, bool) or (type(label) is int and label in (0, 1))):
      raise ValueError(f"{where}: label={json.dumps(label)}: expected true/false or 1/0")
    problem = record.get("problem_id")
    if problem is not None and (isinstance(problem, bool) or not isinstance(problem, (str, int))):
      raise ValueError(f"{where}: problem_id={json.dumps(problem)}: expected a string or an "
                       "integer")
    labels.append(bool(label))
    problems.append(f"line {lineno}" if problem is None else json.dumps(problem))
  labels = np.asarray(labels, bool)
  if not len(labels):
    raise ValueError(f"{path}: no solutions")
  if labels.all() or not labels.any():
    raise ValueError(f"{path}: all {len(labels)} solutions are labelled {bool(labels[0])}; AUROC "
                     "needs correct and incorrect ones")
  return labels, problems


def solution_metrics(rewards_N, labels_N, problems_N, *, threshold: float = 0.0,
                     n_boot: int = 1000, seed: int = 0) -> dict:
  """AUROC of reward vs label with a percentile bootstrap interval resampling whole problems
  (``auroc_ci``), and accuracy at ``threshold``: a solution is predicted correct when its reward
  is above it."""
  rewards_N, labels_N = finite_scores(rewards_N, "rewards"), np.asarray(labels_N, bool)
  ci = auroc_ci(rewards_N, labels_N, problems_N, n_boot=n_boot, seed=seed)
  return {"n_solutions": int(len(rewards_N)), "n_correct": int(labels_N.sum()),
          "n_problems": ci["n_groups"], "auroc": ci["auroc"], "auroc_ci": ci,
          "threshold": float(threshold),
          "accuracy": float(np.mean((rewards_N > threshold) == labels_N)),
          "reward_mean": float(np.mean(rewards_N)), "reward_std": float(np.std(rewards_N))}
