"""Two CPU processes (gloo collectives, 2 fake devices each) train what one process trains.

  A  this (pytest) process, 8 devices, mesh (2, 2, 2): 6 steps, checkpoints at 3 and 6
  B  2 processes x 2 devices, mesh (1, 2, 2): the same 6 steps from scratch
  C  the same 2 processes, multi-slice mesh (1, 2, 1) x dcn (2, 1, 1): resume A's step-3
     checkpoint (written by 1 process) to step 6
then this process restores B's and C's step-6 checkpoints (written by 2 processes).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from rmjax import sharding, train, train_state
from rmjax.checkpoint import Checkpointer
from rmjax.data import sources
from rmjax.data.pipeline import train_dataset
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420
OVERRIDES = {"train.steps": 6, "train.ckpt_every": 3, "train.eval_every": 1000,
             "train.log_every": 1, "data.eval_size": 8}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(runs, tmp_path) -> list[tuple[str, str]]:
  """``tests/multihost_worker.py`` as 2 processes of 2 fake CPU devices; each must exit 0."""
  port, env = free_port(), {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  logs = [(tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), "2",
                             str(i), json.dumps(runs)], cwd=ROOT, env=env,
                            stdout=open(out, "w"), stderr=open(err, "w"))
           for i, (out, err) in enumerate(logs)]
  try:
    procs[0].wait(timeout=TIMEOUT_S)
    procs[1].wait(timeout=30)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
  outs = [(out.read_text(), err.read_text()) for out, err in logs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} (exit {p.returncode}):\n{err[-3000:]}"
  return outs


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step logged twice (two writers?): {steps}"
  return {r["step"]: r["train/loss"] for r in rows}


def restore(workdir):
  """The newest checkpoint of ``workdir`` restored in this process on one device: (step,
  parameters as numpy, the data iterator's next batch)."""
  config = tiny_config("paper")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    _, abstract = train_state.abstract_state(config, mesh)
    data_iter = iter(train_dataset(
        sources.make_source(config, "train"), sources.make_tokenizer(config),
        global_batch_size=config.train.batch_size, max_len=config.data.max_len, seed=config.seed))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step, state = ckpt.restore_latest(abstract, data_iter)
    ckpt.close()
  return step, jax.device_get(state["model"]), next(data_iter)


def assert_params_close(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
  one, two, resumed = (str(tmp_path / d) for d in ("one", "two", "resumed"))
  config = tiny_config("paper")
  config.update_from_flattened_dict({**OVERRIDES, "mesh.shape": (2, 2, 2)})
  train.train(config, one)
  shutil.copytree(os.path.join(one, "checkpoints", "3"),
                  os.path.join(resumed, "checkpoints", "3"))

  (out0, err0), (out1, err1) = run_two_processes([
      [two, {**OVERRIDES, "mesh.shape": [1, 2, 2]}],
      [resumed, {**OVERRIDES, "mesh.shape": [1, 2, 1], "mesh.dcn_shape": [2, 1, 1]}]], tmp_path)
  # only process 0 prints, logs and shows progress
  assert out0.count("final_eval") == 2 and "final_eval" not in out1
  assert "train:" in err0 and "train:" not in err1
  assert f"resumed {resumed} at step 3" in err0

  loss_a, loss_b, loss_c = losses(one), losses(two), losses(resumed)
  assert sorted(loss_b) == [1, 2, 3, 4, 5, 6] and sorted(loss_c) == [4, 5, 6]
  for loss in (loss_b, loss_c):
    np.testing.assert_allclose([loss[s] for s in loss], [loss_a[s] for s in loss], rtol=1e-5)

  step_a, params_a, next_a = restore(one)
  for workdir in (two, resumed):  # 2-process checkpoints, restored in 1 process
    step, params, next_batch = restore(workdir)
    assert step == step_a == 6
    assert_params_close(params, params_a)
    for k in next_a:  # the data iterator continues at the same global batch
      np.testing.assert_array_equal(next_batch[k], next_a[k])
