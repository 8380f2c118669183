"""Evaluation tools against independent implementations: sklearn, numpy loops, naive voting."""
import statistics
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.eval import goal, localize, plots, voting
from rmjax.eval.metrics import (auroc, auroc_ci, markdown_table, mean_sd, pairwise_accuracy,
                                preference_metrics, unique_solutions)


# --- AUROC and its group bootstrap ---

@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, 300).astype(float)  # many ties
  labels = rng.random(300) < 0.3
  assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def naive_group_bootstrap(scores, labels, groups, n_boot, seed, level):
  """Concatenates the rows of the drawn groups and asks sklearn, with the same RNG draws."""
  names = sorted(set(groups))
  rows_of = {g: [i for i, x in enumerate(groups) if x == g] for g in names}
  rng, values = np.random.default_rng(seed), []
  for _ in range(n_boot):
    rows = [i for g in rng.integers(0, len(names), len(names)) for i in rows_of[names[g]]]
    if len(set(labels[rows])) == 2:
      values.append(roc_auc_score(labels[rows], scores[rows]))
  return np.quantile(values, [(1 - level) / 2, (1 + level) / 2]), n_boot - len(values)


def test_auroc_ci_matches_naive_group_bootstrap():
  rng = np.random.default_rng(0)
  groups = [f"p{g}" for g in rng.integers(0, 40, 150)]  # uneven group sizes
  scores = rng.integers(0, 8, 150).astype(float)
  labels = (scores + rng.normal(0, 3, 150)) > 4
  ci = auroc_ci(scores, labels, groups, n_boot=100, seed=7, level=0.9)
  (low, high), skipped = naive_group_bootstrap(scores, labels, groups, 100, 7, 0.9)
  assert ci["low"] == pytest.approx(low, abs=1e-12) and ci["high"] == pytest.approx(high, abs=1e-12)
  assert ci["n_skipped"] == skipped and ci["n_groups"] == len(set(groups))
  assert ci["low"] <= ci["auroc"] <= ci["high"]
  assert ci["auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_ci_skips_single_class_draws():
  # two problems: one with only correct, one with only incorrect solutions, perfectly separated;
  # a draw of the same problem twice has one class (skipped), every other draw has AUROC 1
  ci = auroc_ci([3.0, 2.5, 0.1, 0.2], [1, 1, 0, 0], ["a", "a", "b", "b"], n_boot=400, seed=0)
  assert ci["low"] == ci["high"] == ci["auroc"] == 1.0
  assert 100 < ci["n_skipped"] < 300  # about half


def test_auroc_counts_a_solution_in_several_pairs_once():
  # pairs (A, X), (A, Y), (A, Z) of problem p and (B, Z) of problem q: A is one solution, Z two
  tokens_Bx2xL = np.asarray([[[1, 1], [2, 2]], [[1, 1], [3, 3]], [[1, 1], [4, 4]],
                             [[5, 5], [4, 4]]])
  problem_B = ["p", "p", "p", "q"]
  reward_of = {1: 0.3, 2: 0.5, 3: 0.1, 4: 0.2, 5: 0.9}
  rewards_Bx2 = np.vectorize(reward_of.get)(tokens_Bx2xL[..., 0])
  distinct = {}  # naive: the first row of each (problem, tokens), in pair order
  for b in range(4):
    for side in (0, 1):
      distinct.setdefault((problem_B[b], tuple(tokens_Bx2xL[b, side])),
                          (2 * b + side, rewards_Bx2[b, side], side == 0))
  rows, scores, labels = zip(*distinct.values())
  want = roc_auc_score(labels, scores)
  assert want != pytest.approx(roc_auc_score(np.tile([1, 0], 4), rewards_Bx2.reshape(-1)))
  keep = unique_solutions(tokens_Bx2xL, np.repeat(problem_B, 2))
  np.testing.assert_array_equal(keep, rows)
  metrics = preference_metrics(rewards_Bx2[:, 0], rewards_Bx2[:, 1], keep)
  assert metrics["auroc"] == pytest.approx(want, abs=1e-12)
  assert metrics["pairwise_accuracy"] == 0.75  # over pairs, duplicates and all
  assert len(unique_solutions(tokens_Bx2xL)) == 5  # tokens only: A and Z once each


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
  with pytest.raises(ValueError, match="reward_chosen: 1 of 2 are not finite"):
    pairwise_accuracy([bad, 1.0], [0.0, 0.0])
  scores, labels = [0.1, bad, 0.3, 0.4], [1, 0, 1, 0]
  with pytest.raises(ValueError, match="not finite"):
    auroc(scores, labels)
  with pytest.raises(ValueError, match="not finite"):
    auroc_ci(scores, labels, ["a", "a", "b", "b"], n_boot=10)


def test_mean_sd_is_the_sample_standard_deviation():
  values = [0.61, 0.64, 0.70]
  assert mean_sd(values) == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
  assert mean_sd([0.5]) == "0.500"  # one seed: no spread to estimate


def test_markdown_table():
  table = markdown_table([{"dataset": "gsm8k", "auroc": 0.71234, "n": 3},
                          {"dataset": "math", "auroc": 0.5}])
  assert table.splitlines() == ["| dataset | auroc | n |", "|---|---|---|",
                                "| gsm8k | 0.712 | 3 |", "| math | 0.500 |  |"]
  later = markdown_table([{"a": 1}, {"a": 2, "b": "x"}])  # a column only a later row has
  assert later.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| 2 | x |"]


# --- goal state and Q_t ---

def test_goal_and_q_values_match_numpy_loop(tmp_path):
  rng = np.random.default_rng(0)
  b, l, d = 5, 7, 4
  h = rng.normal(size=(b, l, d)).astype(np.float32)
  lengths = [7, 3, 5, 1, 6]
  mask = np.zeros((b, l), np.int32)
  for i, n in enumerate(lengths):
    if i % 2:
      mask[i, l - n:] = 1  # left padding
    else:
      mask[i, :n] = 1
  correct = np.array([1, 0, 1, 1, 0], bool)
  final = np.asarray(goal.final_token_states(h, mask))
  last = [max(t for t in range(l) if mask[i, t]) for i in range(b)]
  np.testing.assert_array_equal(final, np.stack([h[i, last[i]] for i in range(b)]))
  g = goal.goal_state(final, correct)
  np.testing.assert_allclose(g, np.mean([h[i, last[i]] for i in range(b) if correct[i]], axis=0),
                             rtol=1e-6)
  q = np.asarray(goal.q_values(h, g, mask))
  for i in range(b):
    for t in range(l):
      if mask[i, t]:
        want = h[i, t] @ g / (np.linalg.norm(h[i, t]) * np.linalg.norm(g))
        assert q[i, t] == pytest.approx(want, abs=1e-5)
      else:
        assert np.isnan(q[i, t])
  goal.save_goal(str(tmp_path), g)
  np.testing.assert_array_equal(goal.load_goal(str(tmp_path)), g)
  with pytest.raises(FileNotFoundError, match="rmjax.evaluate"):
    goal.load_goal(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="no correct"):
    goal.goal_state(final, np.zeros(b, bool))


# --- error localisation ---

def test_localisation_rules_on_constructed_traces():
  assert localize.largest_drop([1.0, 0.9, 0.8, 0.2, 0.1]) == 3
  assert localize.largest_drop([1.0, 0.5, 0.0, 0.5]) == 1  # equal drops: the earliest
  assert localize.largest_drop([0.3]) == -1
  assert localize.first_below([0.5, -0.1, 0.2, -0.3], 0.0) == 1
  assert localize.first_below([0.5, -0.1, 0.2, -0.3], 0.0, min_tokens=2) == 3
  assert localize.first_below([0.5, 0.1], 0.0) == -1
  traces = [np.array([1, 1, 1, 0, 0.]), np.array([1, 0, 1, 1, 1, 1.]), np.array([1, 1, 1.])]
  start, end = np.array([3, 4, 2]), np.array([5, 6, 3])
  m = localize.localization_metrics(traces, {"step": (start, end)})
  # predictions 3 (a hit), 1 (before its error: a miss), 1 (a flat trace: the earliest; a miss)
  assert m["hit_rate_step"] == pytest.approx(1 / 3)
  assert m["random_hit_rate_step"] == pytest.approx(np.mean([2 / 4, 2 / 5, 1 / 2]))
  m = localize.localization_metrics(traces, {"step": (start, end)}, "below", threshold=0.5)
  assert m["n_no_prediction"] == 1 and m["hit_rate_step"] == pytest.approx(1 / 3)


def test_random_hit_rate_matches_enumeration():
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 30, 50)
  start = rng.integers(0, 35, 50)
  end = start + rng.integers(1, 8, 50)
  brute = np.mean([np.mean([s <= t < e for t in range(1, n)])
                   for n, s, e in zip(lengths, start, end)])
  assert localize.random_hit_rate(lengths, start, end) == pytest.approx(brute)


def test_char_to_token_for_bytes_and_synthetic_errors():
  offsets = localize.byte_offsets("aé=b")  # é is two bytes
  assert [localize.char_to_token(offsets, c) for c in range(4)] == [0, 1, 3, 4]
  with pytest.raises(ValueError, match="outside"):
    localize.char_to_token(offsets, 4)
  tok = ByteTokenizer()
  for ex in SyntheticMath(20, split="validation"):
    offsets = localize.response_offsets(tok, ex["rejected"])
    t = localize.char_to_token(offsets, ex["error_char"])
    ids = tok.encode(ex["rejected"])
    assert tok.decode(ids[:t]) == ex["chosen"][:ex["error_char"]]  # shared correct prefix
    assert ids[t] != tok.encode(ex["chosen"])[t]  # the first wrong token


# --- goal-filtered voting ---

def naive_vote(solutions, threshold, min_tokens):
  by_problem = {}
  for s in solutions:
    by_problem.setdefault(s["problem_id"], []).append(s)
  solved = saved = total = 0
  for sols in by_problem.values():
    kept, would_save = [], 0
    for s in sols:
      total += len(s["q"])
      stop = next((t for t in range(min_tokens, len(s["q"])) if s["q"][t] < threshold), None)
      if stop is None:
        kept.append(s)
      else:
        would_save += len(s["q"]) - stop - 1
    if kept:
      saved += would_save
    else:
      kept = sols
    votes = Counter(s["answer"] for s in kept if s["answer"] is not None)
    if votes:
      best = max(votes.values())
      winner = next(s for s in kept if votes.get(s["answer"]) == best)
      solved += winner["is_correct"]
  return solved / len(by_problem), saved / total


def random_solutions(seed, n_problems=60):
  rng = np.random.default_rng(seed)
  out = []
  for p in rng.permutation(n_problems):  # problems interleaved, not contiguous
    for _ in range(rng.integers(1, 6)):
      answer = None if rng.random() < 0.1 else int(rng.integers(0, 3))
      out.append({"problem_id": f"q{p}", "q": rng.normal(0.3, 0.5, rng.integers(1, 25)),
                  "answer": answer, "is_correct": answer == 0})
  return out


@pytest.mark.parametrize("seed", range(3))
def test_filtered_vote_matches_naive_loop(seed):
  solutions = random_solutions(seed)
  curve = voting.voting_curve(solutions, [-0.5, 0.0, 0.2, 0.5], min_tokens=5)
  assert curve["unfiltered_accuracy"] == pytest.approx(naive_vote(solutions, -np.inf, 5)[0])
  for row in curve["curve"]:
    acc, saved = naive_vote(solutions, row["threshold"], 5)
    assert row["accuracy"] == pytest.approx(acc) and row["tokens_saved"] == pytest.approx(saved)
  assert voting.tokens_saved_at_accuracy(curve, tolerance=1.0) == max(
      r["tokens_saved"] for r in curve["curve"])


def test_majority_vote_tie_breaks_and_fallback():
  assert voting.majority_vote(["7", "5", "5", "7"], [True, False, False, True]) == ("7", True)
  assert voting.majority_vote([None, None], [True, True]) == (None, False)
  q_bad = np.r_[np.ones(5), -np.ones(5)]
  sols = [{"problem_id": 0, "q": q_bad, "answer": "3", "is_correct": True},
          {"problem_id": 0, "q": q_bad, "answer": "4", "is_correct": False},
          {"problem_id": 0, "q": q_bad, "answer": "4", "is_correct": False}]
  row = voting.filtered_vote(sols, threshold=0.0, min_tokens=5)
  assert row["fallback_problems"] == 1 and row["tokens_saved"] == 0.0 and row["accuracy"] == 0.0
  with pytest.raises(ValueError, match="missing"):
    voting.filtered_vote([{"problem_id": 0, "q": q_bad}], 0.0)


# --- plots ---

def test_roc_points_match_sklearn():
  rng = np.random.default_rng(1)
  scores, labels = rng.integers(0, 10, 200).astype(float), rng.random(200) < 0.4
  fpr, tpr = plots.roc_points(scores, labels)
  want_fpr, want_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, want_fpr)
  np.testing.assert_allclose(tpr, want_tpr)


def test_plots_write_png_files(tmp_path):
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=100), rng.random(100) < 0.5
  curve = voting.voting_curve(random_solutions(0, 10), [0.0, 0.3])
  paths = [plots.reward_histogram(str(tmp_path / "h.png"), scores, labels),
           plots.roc_curve(str(tmp_path / "r.png"), scores, labels, 0.5),
           plots.q_traces(str(tmp_path / "q.png"), [rng.normal(size=9), rng.normal(size=6)],
                          [True, False], [-1, 3]),
           plots.filtering_curve(str(tmp_path / "f.png"), curve)]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(open(p, "rb").read()) > 2000
