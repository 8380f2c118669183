"""Evaluation metrics on host numpy arrays (shared by training-time eval and the eval tools)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def finite_scores(scores, name: str = "scores") -> np.ndarray:
  """``scores`` as float64; a ValueError when any is NaN or infinite (no silent metric)."""
  scores = np.asarray(scores, np.float64)
  bad = np.flatnonzero(~np.isfinite(scores))
  if len(bad):
    raise ValueError(f"{name}: {len(bad)} of {scores.size} are not finite (first: index "
                     f"{bad[0]}, {scores.flat[bad[0]]})")
  return scores


def unique_solutions(tokens, groups=None) -> np.ndarray:
  """Ascending indices of the first row of each distinct solution. ``tokens``: ``NxL`` rows, or
  pairs ``Bx2xL`` (row 2i chosen, 2i + 1 rejected); rows with equal tokens (and equal ``groups``,
  e.g. problem ids, when given) are one solution, e.g. one that appears in several pairs."""
  tokens = np.asarray(tokens)
  rows_NxL = tokens.reshape(-1, tokens.shape[-1]).astype(np.int64)
  if groups is not None:
    group_N = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1, 1)
    if len(group_N) != len(rows_NxL):
      raise ValueError(f"unique_solutions: {len(rows_NxL)} rows, {len(group_N)} groups")
    rows_NxL = np.concatenate([group_N, rows_NxL], axis=1)
  return np.sort(np.unique(rows_NxL, axis=0, return_index=True)[1])


def pairwise_accuracy(reward_chosen, reward_rejected) -> float:
  """Share of pairs ranked correctly; a tie counts half."""
  diff = (finite_scores(reward_chosen, "reward_chosen")
          - finite_scores(reward_rejected, "reward_rejected"))
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def auroc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U; ties half)."""
  scores, labels = finite_scores(scores), np.asarray(labels).astype(bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUROC needs both classes; got {n_pos} positive, {n_neg} negative")
  ranks = rankdata(scores)  # average ranks: a tie contributes one half
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def preference_metrics(reward_chosen, reward_rejected, solutions=None) -> dict[str, float]:
  """Pairwise accuracy, and AUROC of reward vs correctness (chosen = correct, rejected = not) over
  the rows ``solutions`` (pair i's chosen is row 2i, its rejected 2i + 1; all rows when None), e.g.
  ``unique_solutions(tokens_Bx2xL)`` so that a solution in several pairs counts once."""
  scores = np.stack([reward_chosen, reward_rejected], 1).reshape(-1)
  labels = np.tile([True, False], len(reward_chosen))
  if solutions is not None:
    scores, labels = scores[solutions], labels[solutions]
  return {"pairwise_accuracy": pairwise_accuracy(reward_chosen, reward_rejected),
          "auroc": auroc(scores, labels),
          "reward_margin": float(np.mean(np.asarray(reward_chosen) - reward_rejected))}


def reward_stats(rewards) -> dict:
  """Mean and (population, ddof 0) standard deviation of ``rewards``, and how many: what
  ``(r - mean) / std`` normalisation reads (``<workdir>/reward_stats.json``)."""
  rewards = finite_scores(rewards, "rewards")
  if not len(rewards):
    raise ValueError("reward_stats: no rewards")
  return {"mean": float(np.mean(rewards)), "std": float(np.std(rewards)), "n": int(len(rewards))}


def auroc_ci(scores, labels, groups, *, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> dict[str, float]:
  """AUROC with a percentile bootstrap interval that resamples whole *groups* (problems).

  Solutions of one problem are correlated, so each draw picks ``G = len(unique(groups))`` groups
  with replacement (``numpy.random.default_rng(seed).integers(0, G, G)``, one call per draw, groups
  numbered in sorted order) and keeps every row of a picked group once per pick. Draws holding a
  single class are skipped (``n_skipped``). Returns the point estimate on all rows, ``low``,
  ``high``.
  """
  scores, labels = finite_scores(scores), np.asarray(labels).astype(bool)
  if not len(scores) == len(labels) == len(groups):
    raise ValueError(f"auroc_ci: {len(scores)} scores, {len(labels)} labels, {len(groups)} groups")
  point = auroc(scores, labels)
  _, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
  _, level_of_row = np.unique(scores, return_inverse=True)  # tied scores share a level
  n_groups, n_levels = int(group_of_row.max()) + 1, int(level_of_row.max()) + 1
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(n_boot):
    # a row drawn k times weighs k: the Mann-Whitney statistic of the resample, without copying
    weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of_row]
    pos_W = np.bincount(level_of_row, weight * labels, minlength=n_levels)
    neg_W = np.bincount(level_of_row, weight * ~labels, minlength=n_levels)
    if pos_W.sum() == 0 or neg_W.sum() == 0:
      continue
    below_W = np.cumsum(neg_W) - neg_W
    values.append(np.sum(pos_W * (below_W + 0.5 * neg_W)) / (pos_W.sum() * neg_W.sum()))
  if not values:
    raise ValueError(f"auroc_ci: all {n_boot} bootstrap draws held a single class")
  alpha = (1.0 - level) / 2
  low, high = np.quantile(values, [alpha, 1.0 - alpha])
  return {"auroc": point, "low": float(low), "high": float(high), "level": level,
          "n_boot": n_boot, "n_skipped": n_boot - len(values), "n_groups": n_groups}


def mean_sd(values, digits: int = 3) -> str:
  """``"mean ± sd"``, sd the *sample* standard deviation (ddof 1, e.g. over seeds); one value:
  only the mean (no spread to estimate)."""
  values = finite_scores(values, "mean_sd")
  if len(values) < 2:
    return f"{np.mean(values):.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
  """Rows of dicts (e.g. one per dataset) as a markdown table; floats rounded to ``digits``.
  Columns: every key of any row, in order of first appearance; a row without one leaves it blank."""
  if not rows:
    raise ValueError("markdown_table: no rows")
  columns = columns or list(dict.fromkeys(k for r in rows for k in r))
  cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"
