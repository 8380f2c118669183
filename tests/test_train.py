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
from flax import nnx

from rmjax import objective, sharding, train
from rmjax.checkpoint import Checkpointer
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
    _, abstract = train.abstract_state(config, mesh)
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
    graphdef, state = train.create_state(config)
    ref = nnx.jit(lambda: RewardModel(train.model_config(config), rngs=nnx.Rngs(config.seed)))()
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
  graphdef, state = train.create_state(config)
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
  graphdef, state = train.create_state(config)
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


def test_non_finite_update_is_skipped_and_counted(mesh1):
  config = tiny_config("paper")
  config.optim.warmup_steps = 0  # a warmup would make the first real step's lr 0
  graphdef, state = train.create_state(config)
  step_fn = jax.jit(train.make_train_step(graphdef, objective.build_terms(config.loss),
                                          accum_steps=1, seed=0))
  good = pair_batch(8, max_len=config.data.max_len)
  bad = {**good, "margin": np.full(8, np.nan, np.float32)}
  before = jax.device_get(state["model"])
  state, m = step_fn(state, sharding.host_to_global(bad, mesh1))
  assert not np.isfinite(m["loss"]) and int(m["skipped"]) == 1 and int(m["skipped_total"]) == 1
  after = jax.device_get(state["model"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, m = step_fn(state, sharding.host_to_global(good, mesh1))
  assert int(m["skipped"]) == 0 and int(m["skipped_total"]) == 1
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
  code, out, err = run_main(work, "--config.train.steps=12", "--config.train.ckpt_every=4")
  assert code == 0, err
  assert "cannot be restored" in err and "resumed" in err and "at step 4" in err
  assert (work / "checkpoints" / "8.corrupt-0" / "state").exists()  # nothing deleted
  assert (work / "checkpoints" / "12").exists()
  assert "pairwise_accuracy" in json.loads(out.strip().splitlines()[-1])["final_eval"]


def test_unknown_config_key_is_a_clear_error(tmp_path):
  code, _, err = run_main(tmp_path / "x", "--config.loss.betta=0.1")
  assert code != 0
  assert "betta" in err
