"""A run's record: its config fixed at the first start, metrics once per step after a resume,
evaluation of a run initialised from a pretrained model."""
import glob
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto.event_pb2 import Event, SessionLog

from rmjax import evaluate, sharding, train, train_state
from rmjax.convert.export import export_reward_model
from rmjax.main import save_config
from rmjax.models import RewardModel
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
  with open(path) as f:
    return f.read()


def test_resume_with_another_config_is_refused_unless_allowed_and_recorded(tmp_path):
  work = str(tmp_path)
  config = tiny_config("paper")
  save_config(config, work)
  first = read(tmp_path / "config.json")
  os.makedirs(tmp_path / "checkpoints" / "4")
  os.makedirs(tmp_path / "checkpoints" / "8.corrupt-0")

  # fields that say where and how the run runs may differ on any resume: recorded, not refused
  config.mesh.shape, config.model.remat = (1, 1, 1), "full"
  save_config(config, work)
  assert json.loads(read(tmp_path / "config.json"))["model"]["remat"] == "full"

  config.loss.beta, config.train.steps = 0.1, 20
  with pytest.raises(ValueError) as e:
    save_config(config, work)
  message = str(e.value)
  assert "loss.beta: 0.5 (config.json) -> 0.1 (now)" in message
  assert "train.steps: 8 (config.json) -> 20 (now)" in message
  assert "--allow_config_change" in message and "mesh" not in message
  assert json.loads(read(tmp_path / "config.json"))["loss"]["beta"] == 0.5  # nothing written
  assert len(read(tmp_path / "config_history.jsonl").splitlines()) == 1

  save_config(config, work, allow_change=True)
  saved = json.loads(read(tmp_path / "config.json"))
  assert saved["loss"]["beta"] == 0.1 and saved["train"]["steps"] == 20
  assert read(tmp_path / "config_original.json") == first  # the first start's, kept
  config.optim.lr = 1e-3
  save_config(config, work, allow_change=True)
  save_config(config, work)  # the same config again: nothing to record
  history = [json.loads(l) for l in read(tmp_path / "config_history.jsonl").splitlines()]
  assert [r["changed"] for r in history] == [
      {"mesh.shape": {"old": [-1, 1, 1], "new": [1, 1, 1]},
       "model.remat": {"old": "none", "new": "full"}},
      {"loss.beta": {"old": 0.5, "new": 0.1}, "train.steps": {"old": 8, "new": 20}},
      {"optim.lr": {"old": 3e-3, "new": 1e-3}}]
  assert all(r["step"] == 4 and r["time"] for r in history)
  assert read(tmp_path / "config_original.json") == first

  config.model.num_layers = 2  # another architecture: refused even when changes are allowed
  with pytest.raises(ValueError, match=r"model.num_layers=2 \(config.json: 1\)"):
    save_config(config, work, allow_change=True)
  assert json.loads(read(tmp_path / "config.json"))["model"]["num_layers"] == 1
  assert len(read(tmp_path / "config_history.jsonl").splitlines()) == 3


def test_a_run_written_before_fields_were_added_resumes_unless_their_value_changes_it(tmp_path):
  """A config.json without the fields added since (data.convention, data.layout,
  loss.center_rewards, new model switches) resumes when their values mean what that run did;
  a value that changes the run is refused. data.convention is recorded resolved."""
  config = tiny_config("paper")
  config.data.convention, config.loss.center_rewards = "", 0.0
  config.model.qk_norm = None  # the family switches' default: off, or the checkpoint's
  save_config(config, str(tmp_path))
  saved = json.loads(read(tmp_path / "config.json"))
  assert saved["data"]["convention"] == "rmjax"  # '' resolved: no init_from classifier
  for block, field in (("data", "convention"), ("loss", "center_rewards"), ("model", "qk_norm"),
                       ("model", "mlp_act")):
    del saved[block][field]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  save_config(config, str(tmp_path))  # the same run: accepted, nothing recorded
  assert not os.path.exists(tmp_path / "config_history.jsonl")
  config.loss.center_rewards = 0.01
  with pytest.raises(ValueError, match=r"loss.center_rewards: 0.0 \(config.json\) -> 0.01"):
    save_config(config, str(tmp_path))


def test_main_refuses_a_changed_config_unless_the_flag_allows_it(tmp_path):
  """The command line, with training stubbed out."""
  save_config(tiny_config("paper"), str(tmp_path))
  run = ("import sys; from absl import app; from rmjax import main, train; "
         "train.train = lambda config, workdir: {}; app.run(main.main)")

  def main(*flags):
    return subprocess.run(
        [sys.executable, "-c", run, "--config=configs/synthetic.py:paper,tiny",
         f"--workdir={tmp_path}", "--config.loss.beta=0.1", *flags], cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300)

  refused = main()
  assert refused.returncode != 0
  assert "loss.beta: 0.5 (config.json) -> 0.1 (now)" in refused.stderr
  assert json.loads(read(tmp_path / "config.json"))["loss"]["beta"] == 0.5
  allowed = main("--allow_config_change")
  assert allowed.returncode == 0, allowed.stderr
  assert json.loads(read(tmp_path / "config.json"))["loss"]["beta"] == 0.1
  assert "loss.beta" in json.loads(read(tmp_path / "config_history.jsonl"))["changed"]


def tensorboard_purges(logdir) -> list[int]:
  """Steps of the session-start events (TensorBoard hides earlier events from that step on)."""
  steps = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):  # TFRecords: length, its crc, the event, its crc
      n = struct.unpack("<Q", data[i:i + 8])[0]
      event = Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        steps.append(event.step)
  return steps


def test_metrics_after_a_crash_and_resume_hold_each_step_once(tmp_path):
  config = tiny_config("bt", steps=4, log_every=1, eval_every=1000, ckpt_every=4,
                       async_checkpointing=False)
  train.train(config, str(tmp_path))
  # what a run killed after step 6 leaves past its newest checkpoint (4), a line cut short
  with open(tmp_path / "metrics.jsonl", "a") as f:
    for step in (5, 6):
      f.write(json.dumps({"step": step, "train/loss": 123.0}) + "\n")
    f.write('{"step": 7, "train/lo')
  config.train.steps = 6
  train.train(config, str(tmp_path))
  lines = [json.loads(l) for l in read(tmp_path / "metrics.jsonl").splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4, 5, 6]
  assert [l["step"] for l in lines if "eval/auroc" in l] == [4, 6]
  assert all(l.get("train/loss") != 123.0 for l in lines)
  # the resumed writer hides TensorBoard's events after step 4 (4's are in the checkpoint)
  # (two runs within one second may share one event file name, so the first run's may be gone)
  purges = tensorboard_purges(tmp_path / "tb")
  assert 5 in purges and set(purges) <= {1, 5}, purges


def test_evaluate_a_run_initialised_from_a_pretrained_model(tmp_path):
  config = tiny_config("bt", steps=1, eval_every=1000, async_checkpointing=False)
  with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    model = RewardModel(train_state.model_config(config), rngs=nnx.Rngs(1))
    export_reward_model(model, tmp_path / "hf")
  for field in list(config.model):
    if field not in train_state.ARCH_EXEMPT:
      setattr(config.model, field, None)  # the architecture comes from the checkpoint
  config.model.init_from = str(tmp_path / "hf")
  config.data.eval_size = 8
  train.train(config, str(tmp_path / "run"))
  result = evaluate.evaluate(config, str(tmp_path / "run"), str(tmp_path / "eval"),
                             goal_examples=8, n_boot=10)
  assert result["step"] == 1 and result["n_pairs"] == 8
  assert np.load(result["goal"]["path"]).shape == (model.backbone.cfg.dim,)
