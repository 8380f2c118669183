"""Memory levers and the memory planner.

* every remat policy, and scan over layers, computes the loss and gradients of the plain loop;
* bf16 compute keeps fp32 parameters, gradients and optimiser state;
* ``rmjax.memory.plan`` predicts the train state and batch bytes that XLA reports for the compiled
  step (arguments, outputs) on 1 device and on the (2, 2, 2) mesh. Its activation estimate is
  not compared with XLA:CPU's temp bytes: XLA:CPU ignores rematerialisation (a plain
  ``jax.checkpoint`` MLP reports the same temp bytes as without it) and keeps extra L x L
  buffers, so its temp size is not what a GPU/TPU compile allocates. ``scripts/check_gpu.py``
  compares it with XLA:GPU's on a GPU (docs/scale.md, Memory levers and planning).
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import memory, sharding, train_state
from tests.helpers import assert_tree_close, loss_metrics_grads, tiny_config


def loss_and_grads(config, mesh):
  (loss, _), grads = loss_metrics_grads(*train_state.create_state(config), config, mesh)
  return jax.device_get((loss, grads))


@pytest.mark.parametrize("variants", [
    pytest.param((("dots_saveable", False), ("full", True)), id="dots-and-scan+full"),
    pytest.param((("full", False), ("none", True)), id="full-and-scan", marks=pytest.mark.slow)])
def test_remat_policies_and_scan_match_the_plain_loop(mesh1, variants):
  results = {}
  for remat, scan in (("none", False), *variants):
    config = tiny_config("bt")  # the blocks are what remat changes; BT compiles fastest
    config.model.num_layers, config.model.remat, config.model.scan_layers = 3, remat, scan
    results[remat, scan] = loss_and_grads(config, mesh1)
  loss0, grads0 = results.pop(("none", False))
  for loss, grads in results.values():
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    assert_tree_close(grads, grads0, rtol=1e-4)  # recomputation reorders sums


def test_bf16_compute_keeps_fp32_master_weights_grads_and_optimizer(mesh1):
  config = tiny_config("bt")
  config.model.dtype = "bfloat16"
  graphdef, state = train_state.create_state(config)
  _, grads = loss_and_grads(config, mesh1)
  arrays = (jax.tree.leaves(nnx.state(state["model"], nnx.Param)) + jax.tree.leaves(grads)
            + [x for x in jax.tree.leaves(state["optimizer"]) if x.ndim > 0])
  assert len(arrays) > 30 and {x.dtype for x in arrays} == {np.dtype("float32")}


@pytest.mark.parametrize("mesh_shape", [pytest.param((1, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_plan_predicts_state_and_batch_bytes_of_the_compiled_step(mesh_shape):
  config = tiny_config("paper")
  config.model.dim, config.model.mlp_dim, config.model.num_layers = 64, 256, 2
  config.train.batch_size = 16
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  plan = memory.plan(config, mesh_shape)
  stats = memory.compiled(config, mesh)
  state = plan.params + plan.optimizer
  np.testing.assert_allclose(plan.batch + state, stats.argument_size_in_bytes, rtol=0.01)
  np.testing.assert_allclose(state, stats.output_size_in_bytes, rtol=0.01)  # + scalar metrics
  assert stats.alias_size_in_bytes >= 0.99 * state  # donated: the new state reuses the old
  assert plan.gradients == plan.params  # every parameter trains, in fp32
  assert plan.activations > 0


@pytest.mark.slow  # over a minute on 2 cores: -m slow
def test_plan_memory_cli_compiles_and_matches_xla_on_arguments():
  """``scripts/plan_memory.py --compile`` on a (2, 2, 2) mesh of fake devices: the plan's state +
  batch bytes equal XLA's argument bytes; an oversized mesh is refused by name."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "scripts", "plan_memory.py"),
         "--config=" + os.path.join(root, "configs", "synthetic.py") + ":paper,tiny",
         "--mesh=2,2,2", "--compile"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  row = re.search(r"^arguments\s+([\d.]+)\s+([\d.]+)", out.stdout, re.M)
  planned, xla = float(row[1]), float(row[2])
  assert planned == xla > 0
  assert re.search(r"^temp\s+[\d.]+\s+[\d.]+\s+plan/XLA", out.stdout, re.M)
  big = subprocess.run(cmd[:-2] + ["--mesh=4,4,1", "--compile"], capture_output=True, text=True,
                       cwd=root, timeout=300)
  assert big.returncode != 0 and "needs 16 devices" in big.stderr


def test_plan_shrinks_with_remat_sharding_and_accumulation():
  config = tiny_config("paper")
  config.model.num_layers = 4  # with one block, remat has nothing to save
  base = memory.plan(config, (1, 1, 1))
  config.model.remat = "dots_saveable"
  dots = memory.plan(config, (1, 1, 1)).activations
  config.model.remat = "full"
  # XLA on GPU/TPU recomputes elementwise results in fusions: dots_saveable keeps what none does
  assert memory.plan(config, (1, 1, 1)).activations < dots == base.activations
  config.model.remat, config.train.accum_steps = "none", 2
  assert memory.plan(config, (1, 1, 1)).activations < base.activations
  one = memory.plan(tiny_config("paper"), (1, 1, 1))
  eight = memory.plan(tiny_config("paper"), (2, 2, 2))
  assert eight.params < one.params / 3 and eight.batch == one.batch // 4


def test_plan_per_backend_tpu_keeps_elementwise_results_only_without_remat():
  """XLA:TPU without remat keeps, per block, the softmax probabilities (compute dtype), four more
  MLP-wide arrays and six fp32 D-wide arrays that XLA:GPU recomputes (the 1B v5p-32 HLO,
  docs/scale.md); the GPU plan is the closed form below, and XLA:CPU plans as without remat."""
  config = tiny_config("paper")
  config.model.num_layers, config.train.batch_size = 3, 4
  cfg = train_state.model_config(config)
  c = np.dtype(config.model.dtype).itemsize
  t, l, d, f, n, k, h = (2 * 4 * config.data.max_len, config.data.max_len, cfg.dim, cfg.mlp_dim,
                         cfg.num_heads, cfg.num_kv_heads, cfg.hd)
  logits = t * n * l * 4
  kept = t * d * c + t * c * ((n + 2 * k) * h + n * h + 2 * d + 2 * f) + logits  # GPU, 'none'
  gpu = memory.plan(config, (1, 1, 1))
  assert gpu == memory.plan(config, (1, 1, 1), backend="gpu")
  assert gpu.activations == 3 * kept + logits + 2 * t * d * 4  # + grad logits, final hidden
  tpu = memory.plan(config, (1, 1, 1), backend="tpu")
  extra = t * n * l * c + 4 * t * f * c + 6 * t * d * 4
  assert tpu.activations - gpu.activations == 3 * extra
  for remat in ("dots_saveable", "full"):  # under remat XLA:TPU recomputes them as XLA:GPU
    config.model.remat = remat
    assert memory.plan(config, (1, 1, 1), backend="tpu") == memory.plan(config, (1, 1, 1))
  assert memory.plan(config, (1, 1, 1), backend="cpu") == gpu  # 'full' ignored
  with pytest.raises(ValueError, match="backend 'cuda'.*'gpu', 'tpu', 'cpu'"):
    memory.plan(config, (1, 1, 1), backend="cuda")


def test_plan_of_a_config_with_init_from_needs_only_the_architecture(tmp_path):
  """``model.init_from`` gives the architecture; planning reads its config.json, no weights (the
  folder here has none), and plans what the same architecture set in the config plans."""
  config = tiny_config("paper")
  hf = dict(model_type="llama", vocab_size=256, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  pretrained = tiny_config("paper")
  for field in list(pretrained.model):
    if field not in train_state.ARCH_EXEMPT:
      setattr(pretrained.model, field, None)
  pretrained.model.init_from = str(tmp_path)
  assert memory.plan(pretrained, (2, 2, 2)) == memory.plan(config, (2, 2, 2))
