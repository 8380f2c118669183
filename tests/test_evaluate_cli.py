"""``rmjax.evaluate`` end to end: train a tiny run, evaluate it, compare with train's eval.json."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rmjax import evaluate, sharding, train
from rmjax.checkpoint import restore_state
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.eval import voting
from rmjax.eval.goal import load_goal
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config():
  return tiny_config("bt", steps=4)  # BT only: the cheapest train step to compile


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(run_config(), workdir)
  return workdir


def test_evaluate_matches_train_eval_and_compiles_once(tiny_run, tmp_path, caplog):
  c = run_config()
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    result = evaluate.evaluate(c, tiny_run, str(tmp_path), goal_examples=24, n_boot=200)
  compiles = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage() and "forward" in r.getMessage()]
  assert len(compiles) == 1, compiles  # goal pass and eval pass share one compiled forward

  with open(os.path.join(tiny_run, "eval.json")) as f:
    trained = json.load(f)
  assert result["step"] == trained["step"] == c.train.steps
  assert result["pairwise_accuracy"] == trained["pairwise_accuracy"]
  assert result["auroc"] == pytest.approx(trained["auroc"], abs=1e-6)
  ci = result["auroc_ci"]
  assert ci["low"] <= result["auroc"] <= ci["high"] and ci["n_groups"] == c.data.eval_size

  with open(tmp_path / "eval.json") as f:
    written = json.load(f)
  assert set(written) >= {"pairwise_accuracy", "auroc", "auroc_ci", "goal", "q", "localization",
                          "voting", "plots"}
  assert "skipped" in written["voting"]
  step_dir = os.path.join(tiny_run, "checkpoints", str(c.train.steps))
  assert load_goal(step_dir).shape == (c.model.dim,)
  for name in ("q_largest_drop", "q_below", "prefix_reward_largest_drop"):
    loc = written["localization"][name]
    assert loc["n"] == c.data.eval_size and 0 < loc["random_hit_rate_step"] < 1
  for path in written["plots"]:
    assert os.path.getsize(path) > 2000
  assert (tmp_path / "eval.md").read_text().startswith("| dataset |")


def test_voting_on_scored_solutions(tiny_run):
  """Solutions -> rows -> the restored model's Q_t -> goal-filtered voting."""
  c = run_config()
  solutions = [{"problem_id": ex["id"], "prompt": ex["prompt"], "response": ex[side],
                "answer": ex[side].split()[-1], "is_correct": side == "chosen"}
               for ex in SyntheticMath(6, split="validation") for side in ("chosen", "rejected")]
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, step_dir, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_solutions(solutions, ByteTokenizer(), c)
    res = evaluate.run_sequences(jax.jit(evaluate.make_forward(graphdef)), state, rows,
                                 load_goal(step_dir), batch_size=16, mesh=mesh,
                                 rules=sharding.DEFAULT_RULES, desc="solutions")
  scored = evaluate.voting_inputs(solutions, rows, res)
  assert [len(s["q"]) for s in scored] == [len(s["response"]) for s in solutions]
  curve = voting.voting_curve(scored, [-1.0, 0.0, 1.0], min_tokens=5)
  assert curve["curve"][0]["tokens_saved"] == 0.0  # Q_t >= -1 always: nothing discarded
  assert curve["curve"][0]["accuracy"] == curve["unfiltered_accuracy"] == 1.0  # tie: first wins
  assert curve["curve"][-1]["fallback_problems"] == 6  # Q_t < 1 always: all discarded


def test_error_windows_point_at_the_slip():
  examples = list(SyntheticMath(30, split="validation"))
  lengths = [len(ex["rejected"]) for ex in examples]
  lengths[0] -= 1  # as if cut to fit max_len: left out
  windows, keep = evaluate.error_windows(examples, ByteTokenizer(), lengths, k=2)
  assert not keep[0] and keep[1:].all()
  for ex, start, end in zip(examples[1:], *windows["step"]):
    assert start == ex["error_char"] and ex["rejected"][end - 1] == "\n"
    assert "\n" not in ex["rejected"][start:end - 1]
  np.testing.assert_array_equal(windows["within_2"][1], windows["step"][0] + 2)


@pytest.mark.slow
def test_cli_on_a_step_folder(tiny_run, tmp_path):
  step_dir = os.path.join(tiny_run, "checkpoints", "4")
  proc = subprocess.run(
      [sys.executable, "-m", "rmjax.evaluate", f"--checkpoint={step_dir}",
       "--config=configs/synthetic.py:bt,tiny", "--config.train.steps=4", f"--out={tmp_path}",
       "--n_boot=50"],
      cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4
  assert os.path.exists(os.path.join(step_dir, "goal.npy"))
