"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

Each function writes one figure to ``path`` and returns the path.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """``(false positive rate, true positive rate)`` at every distinct score threshold."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  order = np.argsort(-scores, kind="stable")
  scores, labels = scores[order], labels[order]
  last_of_level = np.r_[scores[1:] != scores[:-1], True]  # a tie moves both rates at once
  tp, fp = np.cumsum(labels)[last_of_level], np.cumsum(~labels)[last_of_level]
  return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def reward_histogram(path: str, rewards, labels, title: str = "reward by correctness") -> str:
  rewards, labels = np.asarray(rewards, np.float64), np.asarray(labels).astype(bool)
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.histogram_bin_edges(rewards, bins=40)
  ax.hist(rewards[labels], bins=bins, alpha=0.6, label=f"correct (n={labels.sum()})")
  ax.hist(rewards[~labels], bins=bins, alpha=0.6, label=f"incorrect (n={(~labels).sum()})")
  ax.set(xlabel="reward", ylabel="solutions", title=title)
  ax.legend()
  return _save(fig, path)


def roc_curve(path: str, scores, labels, auroc: float | None = None) -> str:
  fpr, tpr = roc_points(scores, labels)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.plot(fpr, tpr, label="reward" if auroc is None else f"reward (AUROC {auroc:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
  ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC: correct vs not",
         xlim=(0, 1), ylim=(0, 1))
  ax.legend(loc="lower right")
  return _save(fig, path)


def q_traces(path: str, traces, labels, error_positions=None, names=None,
             threshold: float | None = 0.0) -> str:
  """``Q_t`` over response tokens of a few solutions; a dot marks each known first error."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, q_T in enumerate(traces):
    style = "-" if labels[i] else "--"
    name = names[i] if names is not None else ("correct" if labels[i] else "incorrect")
    (line,) = ax.plot(np.arange(len(q_T)), q_T, style, lw=1.2, label=name)
    if error_positions is not None and error_positions[i] >= 0:
      e = error_positions[i]
      ax.plot([e], [q_T[e]], "o", color=line.get_color(), ms=6)
  if threshold is not None:
    ax.axhline(threshold, color="k", lw=0.8, ls=":")
  ax.set(xlabel="response token t", ylabel="Q_t = cos(h_t, goal)",
         title="Q_t traces (solid: correct, dashed: incorrect, dot: first error)")
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def filtering_curve(path: str, curve: dict) -> str:
  """Voting accuracy vs share of tokens saved, one point per threshold (``voting_curve``)."""
  rows = curve["curve"]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([r["tokens_saved"] for r in rows], [r["accuracy"] for r in rows], "o-")
  for r in rows:
    ax.annotate(f"{r['threshold']:g}", (r["tokens_saved"], r["accuracy"]), fontsize=7,
                textcoords="offset points", xytext=(3, 3))
  ax.axhline(curve["unfiltered_accuracy"], color="k", lw=0.8, ls=":", label="no filtering")
  ax.set(xlabel="share of tokens saved", ylabel="majority-vote accuracy",
         title="goal-filtered voting (labels: Q threshold)")
  ax.legend()
  return _save(fig, path)
