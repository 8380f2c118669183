"""``rmjax.evaluate --solutions``: labelled single solutions, each scored once, against sklearn's
AUROC, a by-problem bootstrap written out here, and accuracy counted by hand."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rmjax import evaluate, sharding, train
from rmjax.checkpoint import restore_state
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.eval import solutions as solutions_lib
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config():
  return tiny_config("bt", steps=4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(run_config(), workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:  # as rmjax.main writes it
    f.write(run_config().to_json_best_effort())
  return workdir


def solutions_file(path, n_problems=8):
  """Per problem: its correct and wrong solution, and a second wrong one (a dict with the
  problem's three lines); ids as strings, the last problem's lines without one."""
  lines = []
  for i, ex in enumerate(SyntheticMath(n_problems, split="validation")):
    pid = {"problem_id": f"q{i}"} if i < n_problems - 1 else {}
    lines += [{"prompt": ex["prompt"], "response": ex["chosen"], "label": True, **pid},
              {"prompt": ex["prompt"], "response": ex["rejected"], "label": 0, **pid},
              {"prompt": ex["prompt"], "response": ex["rejected"] + " 1", "label": False, **pid}]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return str(path), lines


def naive_bootstrap(rewards, labels, problems, n_boot, seed, level=0.95):
  """Whole problems drawn with replacement (the documented draw), sklearn's AUROC per draw."""
  names = sorted(set(problems))
  rows = {p: [i for i, q in enumerate(problems) if q == p] for p in names}
  rng, values = np.random.default_rng(seed), []
  for _ in range(n_boot):
    idx = [i for g in rng.integers(0, len(names), len(names)) for i in rows[names[g]]]
    if len(set(labels[idx])) == 2:
      values.append(roc_auc_score(labels[idx], rewards[idx]))
  return np.quantile(values, [(1 - level) / 2, (1 + level) / 2])


def test_solutions_file_metrics_match_sklearn_and_a_by_problem_bootstrap(tiny_run, tmp_path):
  path, lines = solutions_file(tmp_path / "sol.jsonl")
  max_len = run_config().data.max_len  # both sides cut long solutions alike
  result = evaluate.evaluate_solutions(tiny_run, path, str(tmp_path / "out"), n_boot=60,
                                       threshold=0.0, max_len=max_len)
  with open(result["scored"]) as f:
    scored = [json.loads(line) for line in f]
  assert [{k: s[k] for k in line} for s, line in zip(scored, lines)] == lines
  assert len(scored) == len(lines)  # one output per line, in order
  rewards = np.asarray([s["reward"] for s in scored])
  labels = np.asarray([bool(line["label"]) for line in lines])

  # each line scored once, alone: the run's model on that solution's own row
  c = run_config()
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, _, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_solutions(lines, ByteTokenizer(), c)
    want = evaluate.run_sequences(
        jax.jit(evaluate.make_forward(graphdef)), state, rows, np.zeros(c.model.dim, np.float32),
        batch_size=8, mesh=mesh, rules=sharding.DEFAULT_RULES, desc="solutions")["reward"]
  assert np.abs(rewards - want).max() <= 1e-5 * np.abs(want).max()

  assert result["auroc"] == pytest.approx(roc_auc_score(labels, rewards), abs=1e-12)
  # problems as read_labels names them (their sorted order numbers the groups of each draw)
  problems = [json.dumps(line["problem_id"]) if "problem_id" in line else f"line {i + 1}"
              for i, line in enumerate(lines)]
  assert result["n_problems"] == 7 + 3  # 7 with ids, the last problem's 3 lines on their own
  low, high = naive_bootstrap(rewards, labels, problems, 60, 0)
  ci = result["auroc_ci"]
  assert (ci["low"], ci["high"]) == pytest.approx((low, high), abs=1e-12)
  assert result["accuracy"] == pytest.approx(np.mean((rewards > 0) == labels))
  assert result["n_solutions"] == 24 and result["n_correct"] == 8
  for plot in result["plots"]:
    assert os.path.getsize(plot) > 2000
  assert os.path.exists(tmp_path / "out" / "eval.json")

  # normalised, threshold 0 is the run's stored mean (within the rewards: not all on one side)
  normed = evaluate.evaluate_solutions(tiny_run, path, str(tmp_path / "m"), n_boot=10,
                                       normalize=True, max_len=max_len)
  with open(os.path.join(tiny_run, "reward_stats.json")) as f:
    stats = json.load(f)
  with open(normed["scored"]) as f:
    z = np.asarray([json.loads(line)["reward"] for line in f])
  assert np.abs(z - (rewards - stats["mean"]) / stats["std"]).max() <= 1e-5 * np.abs(z).max()
  assert normed["accuracy"] == pytest.approx(np.mean((rewards > stats["mean"]) == labels))
  assert normed["auroc"] == pytest.approx(result["auroc"])  # a monotone map
  assert rewards.min() < stats["mean"] < rewards.max()


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a", "response": "b"}, "field 'label' missing"),
    ({"prompt": "a", "response": "b", "label": "yes"}, 'label="yes": expected true/false or 1/0'),
    ({"prompt": "a", "response": "b", "label": 2}, "label=2"),
    ({"prompt": "a", "response": "b", "label": 1, "problem_id": [1]}, "problem_id=\\[1\\]"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
  good = [{"prompt": "p", "response": "r", "label": True}, {"text": "t", "label": False}]
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in [*good, line]))
  with pytest.raises(ValueError, match=f"{path}:3: {message}"):
    solutions_lib.read_labels(str(path))


def test_one_class_is_an_error(tmp_path):
  path = tmp_path / "one.jsonl"
  path.write_text(json.dumps({"text": "t", "label": 1}) + "\n")
  with pytest.raises(ValueError, match="all 1 solutions are labelled True"):
    solutions_lib.read_labels(str(path))


@pytest.mark.slow
def test_cli_scores_a_solutions_file(tiny_run, tmp_path):
  path, _ = solutions_file(tmp_path / "sol.jsonl", n_problems=4)
  proc = subprocess.run(
      [sys.executable, "-m", "rmjax.evaluate", f"--model={tiny_run}", f"--solutions={path}",
       "--n_boot=20", "--normalize"],
      cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["n_solutions"] == 12 and 0 <= out["auroc"] <= 1
  assert os.path.exists(tmp_path / "sol_eval" / "reward_hist.png")
