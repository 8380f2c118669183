"""Evaluation metrics on host numpy arrays (shared by training-time eval and the eval tools)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def pairwise_accuracy(reward_chosen, reward_rejected) -> float:
  """Share of pairs ranked correctly; a tie counts half."""
  diff = np.asarray(reward_chosen, np.float64) - np.asarray(reward_rejected, np.float64)
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def auroc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U; ties half)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUROC needs both classes; got {n_pos} positive, {n_neg} negative")
  ranks = rankdata(scores)  # average ranks: a tie contributes one half
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def preference_metrics(reward_chosen, reward_rejected) -> dict[str, float]:
  """Pairwise accuracy, and AUROC of reward vs correctness (chosen = correct, rejected = not)."""
  scores = np.concatenate([reward_chosen, reward_rejected])
  labels = np.concatenate([np.ones(len(reward_chosen)), np.zeros(len(reward_rejected))])
  return {"pairwise_accuracy": pairwise_accuracy(reward_chosen, reward_rejected),
          "auroc": auroc(scores, labels),
          "reward_margin": float(np.mean(np.asarray(reward_chosen) - reward_rejected))}
