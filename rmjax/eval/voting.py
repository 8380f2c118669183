"""Goal-filtered majority voting (the paper's use of Q_t to stop hopeless generations early).

A *solution* is a mapping ``{"problem_id", "q", "answer", "is_correct"}``: ``q`` holds ``Q_t`` for
each of its T response tokens, ``answer`` its final answer (``None`` when none was found).

Rules, per threshold τ and ``min_tokens`` m (paper: τ = 0, m = 5):
* A solution is *discarded* at the first token ``t >= m`` with ``Q_t < τ``; tokens ``0..t`` were
  generated (Q_t needs token t), the ``T - t - 1`` after it are *saved*.
* The kept solutions of a problem vote on their final answers; ``None`` answers do not vote. The
  most frequent answer wins; a tie goes to the answer that appears first in input order. The
  problem counts as solved when the winning answer's first solution ``is_correct``; a problem
  with no vote counts as unsolved.
* When every solution of a problem is discarded, the vote falls back to all its solutions, which
  then had to be generated in full: that problem saves no tokens.
Accuracy is over problems; ``tokens_saved`` is saved tokens / all response tokens.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from rmjax.eval.localize import first_below


def majority_vote(answers, is_correct) -> tuple[object, bool]:
  """``(winning answer, its correctness)``; ``(None, False)`` when no answer votes."""
  counts, first = {}, {}
  for i, a in enumerate(answers):
    if a is not None:
      counts[a] = counts.get(a, 0) + 1
      first.setdefault(a, i)
  if not counts:
    return None, False
  winner = max(counts, key=lambda a: (counts[a], -first[a]))
  return winner, bool(is_correct[first[winner]])


def group_by_problem(solutions) -> list[list[dict]]:
  """Solutions grouped by ``problem_id``, problems and solutions in input order."""
  groups = defaultdict(list)
  for s in solutions:
    missing = {"problem_id", "q", "answer", "is_correct"} - set(s)
    if missing:
      raise ValueError(f"solution of problem {s.get('problem_id', '?')}: missing {sorted(missing)}")
    groups[s["problem_id"]].append(s)
  return list(groups.values())


def filtered_vote(solutions, threshold: float, min_tokens: int = 5) -> dict[str, float]:
  """Accuracy and token savings of majority voting after goal filtering at one threshold."""
  solved = saved = total = kept = fallbacks = 0
  problems = group_by_problem(solutions)
  for group in problems:
    stops = [first_below(s["q"], threshold, min_tokens) for s in group]
    voters = [s for s, stop in zip(group, stops) if stop < 0]
    lengths = [len(s["q"]) for s in group]
    total += sum(lengths)
    kept += len(voters)
    if voters:
      saved += sum(n - stop - 1 for n, stop in zip(lengths, stops) if stop >= 0)
    else:
      voters, fallbacks = group, fallbacks + 1
    solved += majority_vote([s["answer"] for s in voters], [s["is_correct"] for s in voters])[1]
  n_solutions = sum(len(g) for g in problems)
  return {"threshold": float(threshold), "min_tokens": min_tokens,
          "accuracy": solved / len(problems), "tokens_saved": saved / max(total, 1),
          "kept_share": kept / n_solutions, "fallback_problems": fallbacks,
          "n_problems": len(problems)}


def voting_curve(solutions, thresholds, min_tokens: int = 5) -> dict:
  """``filtered_vote`` at each threshold, plus plain majority voting (nothing discarded)."""
  solutions = list(solutions)
  return {"unfiltered_accuracy": filtered_vote(solutions, -np.inf, min_tokens)["accuracy"],
          "curve": [filtered_vote(solutions, t, min_tokens) for t in thresholds]}


def tokens_saved_at_accuracy(curve: dict, tolerance: float = 0.0) -> float:
  """Most tokens saved by a threshold whose accuracy is within ``tolerance`` of unfiltered."""
  target = curve["unfiltered_accuracy"] - tolerance
  return max([r["tokens_saved"] for r in curve["curve"] if r["accuracy"] >= target], default=0.0)
