"""The training loop: compile-once, non-finite skip, SIGKILL resume, corrupt checkpoints, CLI."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import objective, sharding, train, train_state
from rmjax.checkpoint import Checkpointer, data_state_of_another_process_count
from rmjax.data import sources
from rmjax.data.pipeline import train_dataset
from tests.helpers import pair_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *overrides, variant="paper,tiny", wait=True):
  cmd = [sys.executable, "-m", "rmjax.main", f"--config=configs/synthetic.py:{variant}",
         f"--workdir={workdir}", *overrides]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def final_params(workdir, config):
  """Parameters of the newest checkpoint in ``workdir``, as numpy."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    _, abstract = train_state.abstract_state(config, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    data_iter = iter(train_dataset(
        sources.make_source(config, "train"), sources.make_tokenizer(config),
        global_batch_size=config.train.batch_size, max_len=config.data.max_len, seed=0))
    step, state = ckpt.restore_latest(abstract, data_iter)
    ckpt.close()
  return step, jax.device_get(state["model"])


def test_create_state_equals_one_jitted_init_of_the_whole_model():
  """create_state builds the model eagerly, its blocks through one shared jitted init (fast to
  compile on GPUs); parameters and shardings are those of a single jitted init, on a 2x2x2 mesh."""
  from rmjax.models import RewardModel
  config = tiny_config("paper")
  config.model.num_layers = 3
  mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
  with sharding.use_mesh(mesh):
    graphdef, state = train_state.create_state(config)
    ref = nnx.jit(lambda: RewardModel(train_state.model_config(config), rngs=nnx.Rngs(config.seed)))()
  got = dict(nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state)["model"], nnx.Param)))
  want = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
  assert got.keys() == want.keys() and len(got) == 2 + 3 * 9 + 1
  for k in want:
    a, b = got[k][...], want[k][...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), k
  layers = [np.asarray(got[("backbone", "layers", i, "attn", "q", "kernel")][...]) for i in range(3)]
  assert not np.array_equal(layers[0], layers[1])  # each block draws its own numbers


def test_train_step_compiles_once_and_learns(mesh1, caplog):
  config = tiny_config("paper", steps=30, eval_every=1000, ckpt_every=1000)
  graphdef, state = train_state.create_state(config)
  step_fn = jax.jit(train.make_train_step(graphdef, objective.build_terms(config.loss),
                                          accum_steps=1, seed=0), donate_argnums=0)
  batches = [sharding.host_to_global(pair_batch(8, max_len=config.data.max_len,
                                                split="train"), mesh1)] * 30
  losses = []
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for b in batches:
      state, m = step_fn(state, b)
      losses.append(float(m["loss"]))
  compiles = [r for r in caplog.records if "train_step" in r.getMessage()
              and "Compiling" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]
  assert losses[-1] < losses[0] - 0.05  # it fits the repeated batch


def test_gradient_accumulation_matches_one_big_batch(mesh1):
  config = tiny_config("bt")
  config.optim.warmup_steps = 0
  graphdef, state = train_state.create_state(config)
  terms = objective.build_terms(config.loss)
  batch = sharding.host_to_global(pair_batch(8, max_len=config.data.max_len), mesh1)
  one = jax.jit(train.make_train_step(graphdef, terms, accum_steps=1, seed=0))
  four = jax.jit(train.make_train_step(graphdef, terms, accum_steps=4, seed=0))
  (s1, m1), (s4, m4) = one(state, batch), four(state, batch)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["model"]), jax.tree.leaves(s4["model"])):
    # Adam's first step is ~lr * sign(g): a near-zero gradient entry can move by up to lr, so
    # agreement is asked to 1% of lr
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0.01 * config.optim.lr)


def test_non_finite_updates_are_skipped_however_many_in_a_row(mesh1):
  """Skipped and counted, the streak too; optax's own apply_if_finite would apply the NaN update
  after max_consecutive_errors skips, the optimiser never does (the loop stops on the streak)."""
  config = tiny_config("paper")
  config.optim.warmup_steps = 0  # a warmup would make the first real step's lr 0
  config.optim.max_consecutive_nonfinite = 2
  graphdef, state = train_state.create_state(config)
  step_fn = jax.jit(train.make_train_step(graphdef, objective.build_terms(config.loss),
                                          accum_steps=1, seed=0))
  good = pair_batch(8, max_len=config.data.max_len)
  bad = {**good, "margin": np.full(8, np.nan, np.float32)}
  before = jax.device_get(state["model"])
  for n in range(1, 4):
    state, m = step_fn(state, sharding.host_to_global(bad, mesh1))
    assert not np.isfinite(m["loss"]) and int(m["skipped"]) == 1
    assert int(m["skipped_total"]) == int(m["skipped_in_a_row"]) == n
  after = jax.device_get(state["model"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, m = step_fn(state, sharding.host_to_global(good, mesh1))
  assert int(m["skipped"]) == int(m["skipped_in_a_row"]) == 0 and int(m["skipped_total"]) == 3
  moved = jax.device_get(state["model"])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after),
                                                      jax.tree.leaves(moved)))


def test_sigkill_mid_run_then_resume_is_bitwise_equal(tmp_path):
  steps = ["--config.train.steps=120", "--config.train.ckpt_every=20",
           "--config.train.eval_every=1000", "--config.train.log_every=50",
           "--config.loss.beta=0.25"]
  code, _, err = run_main(tmp_path / "whole", *steps)
  assert code == 0, err
  with open(tmp_path / "whole" / "config.json") as f:
    assert json.load(f)["loss"]["beta"] == 0.25  # the CLI override reached the run
  proc = run_main(tmp_path / "killed", *steps, wait=False)
  first = tmp_path / "killed" / "checkpoints" / "20"
  deadline = time.time() + 240
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed" / "checkpoints" / "120").exists(), "killed too late"
  code, _, err = run_main(tmp_path / "killed", *steps)
  assert code == 0, err
  resumed_at = [l for l in err.splitlines() if "resumed" in l]
  assert resumed_at and "step 120" not in resumed_at[0], resumed_at
  config = tiny_config("paper")
  step_a, whole = final_params(tmp_path / "whole", config)
  step_b, resumed = final_params(tmp_path / "killed", config)
  assert step_a == step_b == 120
  leaves_a, leaves_b = jax.tree.leaves(whole), jax.tree.leaves(resumed)
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~60 s on 2 cores (two runs of rmjax.main); tests/test_run_safety.py resumes
def test_corrupt_latest_checkpoint_falls_back_and_keeps_it(tmp_path):
  work = tmp_path / "run"
  code, _, err = run_main(work, "--config.train.steps=8", "--config.train.ckpt_every=4",
                          "--config.train.async_checkpointing=False")
  assert code == 0, err
  state_dir = work / "checkpoints" / "8" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  code, out, err = run_main(work, "--config.train.steps=12", "--config.train.ckpt_every=4",
                            "--allow_config_change")
  assert code == 0, err
  assert "cannot be restored" in err and "resumed" in err and "at step 4" in err
  assert (work / "checkpoints" / "8.corrupt-0" / "state").exists()  # nothing deleted
  assert (work / "checkpoints" / "12").exists()
  assert "pairwise_accuracy" in json.loads(out.strip().splitlines()[-1])["final_eval"]


def test_unknown_config_key_is_a_clear_error(tmp_path):
  code, _, err = run_main(tmp_path / "x", "--config.loss.betta=0.1")
  assert code != 0
  assert "betta" in err


@pytest.mark.slow  # ~25 s: compiles the trainer's step on 8 devices
def test_too_many_non_finite_steps_stop_training_before_a_checkpoint(tmp_path):
  config = tiny_config("bt", steps=6, ckpt_every=1, eval_every=1000, async_checkpointing=False)
  config.loss.bt_weight = float("nan")  # every gradient is NaN
  config.optim.max_consecutive_nonfinite = 2
  with pytest.raises(FloatingPointError, match=r"step 2: .*optim.max_consecutive_nonfinite=2"):
    train.train(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["1"]  # saved before the streak reached 2
  step, params = final_params(tmp_path, config)
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_restore_with_a_changed_config_renames_nothing_and_says_why(tmp_path, mesh1):
  config = tiny_config("bt")
  _, state = train_state.create_state(config)
  data_iter = iter(train_dataset(
      sources.make_source(config, "train"), sources.make_tokenizer(config),
      global_batch_size=config.train.batch_size, max_len=config.data.max_len, seed=0))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  for step in (2, 4):
    ckpt.save(step, state, data_iter)
  config.model.num_layers = 2  # resumed with another architecture
  _, abstract = train_state.abstract_state(config, mesh1)
  with pytest.raises(RuntimeError, match="none of the 2 checkpoints restores") as e:
    ckpt.restore_latest(abstract, data_iter)
  assert "step 4" in str(e.value) and str(tmp_path) in str(e.value)
  assert "config" in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  config.model.num_layers = 1  # the run's config, and a broken newest: set aside, older used
  _, abstract = train_state.abstract_state(config, mesh1)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  assert ckpt.restore_latest(abstract, data_iter)[0] == 2
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4.corrupt-0"]
  ckpt.close()


def test_itstime_every_n_steps_and_the_last():
  assert [s for s in range(1, 11) if train.itstime(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 4) if train.itstime(s, 1, 3)] == [1, 2, 3]


def test_batch_outputs_of_padded_batches_are_the_rows_outputs_in_order(mesh1):
  rows = {"x": np.arange(10, dtype=np.float32).reshape(5, 2), "y": np.arange(5, dtype=np.int32)}
  batches = list(train.padded_batches(rows, 2))
  assert [n for _, n in batches] == [2, 2, 1]
  np.testing.assert_array_equal(batches[-1][0]["y"], [4, 4])  # filled up with the final row
  shapes = []

  def fn(state, batch):
    shapes.append(batch["x"].shape)
    return {"sum": batch["x"].sum(1) + state, "y": batch["y"]}, batch["y"] * 2
  out, twice = train.batch_outputs(fn, 1.0, batches, mesh1)
  assert shapes == [(2, 2)] * 3  # one shape: one compile
  np.testing.assert_array_equal(out["sum"], rows["x"].sum(1) + 1)
  np.testing.assert_array_equal(out["y"], rows["y"])
  np.testing.assert_array_equal(twice, 2 * rows["y"])


def test_loop_yields_due_steps_and_stops_at_the_skip_limit():
  """A step function whose skip streak is given per step: the loop yields only at due steps
  (metrics on the host), and stops at the step that reaches the limit, whether it is checked
  lazily (a step with nothing due) or at a due step (where only logging still runs)."""
  def run(streaks, every, limit, start=0):
    def step_fn(state, batch):
      return state + batch, {"loss": jax.numpy.float32(batch), "pairwise_accuracy": 0.5,
                             "skipped_in_a_row": jax.numpy.int32(streaks[state])}
    seen = []
    try:
      for done, state, m, due in train.loop(step_fn, start, iter([1] * 10), start=start,
                                            steps=len(streaks), every=every, max_nonfinite=limit):
        assert isinstance(m["skipped_in_a_row"], np.ndarray)  # read from the device
        seen.append((done, state, sorted(due)))
    except FloatingPointError as e:
      return seen, str(e)
    return seen, None

  every = {"log": 2, "save": 3}
  assert run([0] * 6, every, 2) == ([(2, 2, ["log"]), (3, 3, ["save"]), (4, 4, ["log"]),
                                     (6, 6, ["log", "save"])], None)
  assert run([0] * 6, every, 2, start=3) == ([(4, 4, ["log"]), (6, 6, ["log", "save"])], None)
  assert run([0, 0, 0, 1, 2, 0], every, 2) == (  # step 5: nothing due, stopped after step 6 ran
      [(2, 2, ["log"]), (3, 3, ["save"]), (4, 4, ["log"])],
      "step 5: 2 non-finite gradients in a row (updates skipped), "
      "optim.max_consecutive_nonfinite=2: training stopped")
  seen, error = run([0, 0, 0, 0, 1, 2], every, 2)  # step 6: logged, not saved
  assert seen[-1] == (6, 6, ["log"]) and error.startswith("step 6: 2 non-finite")
  assert run([0, 0, 5, 0], {"log": 1}, None)[1] is None  # no limit: never stopped


def test_data_position_saved_under_another_process_count_restores(tmp_path, mesh1):
  config = tiny_config("bt")
  _, state = train_state.create_state(config)

  def data_iter():
    return iter(train_dataset(
        sources.make_source(config, "train"), sources.make_tokenizer(config),
        global_batch_size=config.train.batch_size, max_len=config.data.max_len, seed=0))
  saved = data_iter()
  next(saved), next(saved)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(2, state, saved)
  expected = next(saved)
  data = tmp_path / "checkpoints" / "2" / "data"
  assert data_state_of_another_process_count(str(data)) is None  # our own file: grain restores
  os.rename(data / "process_0-of-1.json", data / "process_1-of-2.json")  # as if by 2 processes
  assert data_state_of_another_process_count(str(data)) == str(data / "process_1-of-2.json")
  restored = data_iter()
  _, abstract = train_state.abstract_state(config, mesh1)
  assert ckpt.restore_latest(abstract, restored)[0] == 2
  np.testing.assert_array_equal(next(restored)["tokens"], expected["tokens"])
  ckpt.close()


def test_config_json_refuses_another_architecture(tmp_path):
  from rmjax.main import save_config
  config = tiny_config("bt")
  save_config(config, str(tmp_path))
  config.model.remat, config.train.steps = "full", 99  # not the architecture: written
  save_config(config, str(tmp_path), allow_change=True)
  config.model.num_layers, config.model.dim = 2, 48
  with pytest.raises(ValueError, match=r"model.dim=48 \(config.json: 32\), "
                                       r"model.num_layers=2 \(config.json: 1\)"):
    save_config(config, str(tmp_path), allow_change=True)  # the architecture: never
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["num_layers"] == 1 and saved["model"]["remat"] == "full"
  assert saved["train"]["steps"] == 99


def test_bad_accum_steps_and_intervals_are_clear_errors(tmp_path, mesh1):
  config = tiny_config("bt")
  graphdef, state = train_state.create_state(config)
  terms = objective.build_terms(config.loss)
  with pytest.raises(ValueError, match="train.accum_steps=0"):
    train.make_train_step(graphdef, terms, accum_steps=0, seed=0)
  step_fn = train.make_train_step(graphdef, terms, accum_steps=3, seed=0)
  batch = sharding.host_to_global(pair_batch(8, max_len=config.data.max_len), mesh1)
  with pytest.raises(ValueError, match=r"train.batch_size=8 .* train.accum_steps=3"):
    jax.eval_shape(step_fn, state, batch)
  for field in ("log_every", "eval_every", "ckpt_every"):
    with pytest.raises(ValueError, match=f"train.{field}=0"):
      train.train(tiny_config("bt", **{field: 0}), str(tmp_path))
  config = tiny_config("bt", batch_size=6)
  config.mesh.shape = (2, 2, 2)  # data x fsdp: 4 batch shards
  with pytest.raises(ValueError, match=r"train.batch_size=6 .* 4 batch shards"):
    train.train(config, str(tmp_path))


def test_create_state_follows_the_active_logical_rules():
  """Two models of one config under different rules: each gets its rules' shardings (the blocks'
  shared jitted init is per rules and mesh)."""
  config = tiny_config("bt")
  mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
  no_mlp = tuple((k, None if k == "mlp" else v) for k, v in sharding.DEFAULT_RULES)
  for rules in (sharding.DEFAULT_RULES, no_mlp):
    with sharding.use_mesh(mesh, rules):
      graphdef, state = train_state.create_state(config)
    gate = state["model"]["backbone"]["layers"][0]["mlp"]["gate"]["kernel"][...]
    want = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("embed", "mlp"), rules))
    assert gate.sharding.is_equivalent_to(want, 2), (rules, gate.sharding.spec)


def test_training_loop_makes_no_implicit_transfer(tmp_path, monkeypatch):
  """Inside the loop (steps, logging, evaluation, checkpoints) every transfer is explicit
  (``host_to_global`` in, one ``device_get`` of the metrics per logging step out). Set-up may
  move constants freely. On CPU JAX guards only host-to-device transfers, so that is what this
  catches here; on accelerators the same guard also catches implicit reads."""
  def allowed(f):
    def run(*args, **kwargs):
      with jax.transfer_guard("allow"):
        return f(*args, **kwargs)
    return run
  for name in ("create_state", "abstract_state", "jit_train_step", "make_eval_step",
               "distinct_solutions"):
    monkeypatch.setattr(train, name, allowed(getattr(train, name)))
  config = tiny_config("paper")
  config.train.update(steps=4, log_every=2, eval_every=4, ckpt_every=4)
  with jax.transfer_guard("disallow"):
    final = train.train(config, str(tmp_path))
  assert np.isfinite(final["pairwise_accuracy"])
