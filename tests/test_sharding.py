"""The 8-device (data=2, fsdp=2, tensor=2) mesh computes what one device computes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rmjax import sharding, train_state
from tests.helpers import assert_tree_close, loss_metrics_grads, tiny_config


def loss_and_grads(mesh_shape, variant, devices):
  config = tiny_config(variant)
  config.model.num_heads, config.model.num_kv_heads = 4, 2  # tensor-shardable head counts
  mesh = sharding.make_mesh(mesh_shape, devices)
  with sharding.use_mesh(mesh):
    graphdef, state = train_state.create_state(config)
    (loss, metrics), grads = loss_metrics_grads(graphdef, state, config, mesh)
    kernel = state["model"]["backbone"]["layers"][0]["mlp"]["gate"]["kernel"][...]
    return jax.device_get((loss, metrics, grads)), (kernel.sharding.spec,
                                                    len(kernel.sharding.device_set))


# infonce is the stronger check (its negatives span every device); paper runs with -m slow
@pytest.mark.parametrize("variant", [pytest.param("paper", marks=pytest.mark.slow), "infonce"])
def test_eight_device_mesh_matches_one_device(variant):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  (l1, m1, g1), spec1 = loss_and_grads((1, 1, 1), variant, jax.devices()[:1])
  (l8, m8, g8), spec8 = loss_and_grads((2, 2, 2), variant, jax.devices())
  assert spec8 == (P("fsdp", "tensor"), 8)  # really sharded over the 8 devices
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m8["contrastive_loss"], m1["contrastive_loss"], rtol=1e-5)
  assert len(jax.tree.leaves(g1)) > 10
  assert_tree_close(g8, g1, rtol=1e-4)  # sums split over devices


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.make_mesh((-1, 2, 1)).devices.shape == (4, 2, 1)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh((-1, 3, 1))
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh((2, 2, 1), jax.devices()[:2])


def test_dcn_shape_builds_the_hybrid_mesh_and_checks_slices():
  mesh = sharding.make_mesh((-1, 2, 2), dcn_shape=(1, 1, 1))
  assert mesh.devices.shape == (2, 2, 2) and mesh.axis_names == sharding.MESH_AXES
  with pytest.raises(ValueError, match="slices"):
    sharding.make_mesh((1, 2, 2), dcn_shape=(2, 1, 1))  # one process: one slice


def test_devices_of_several_slices_fill_the_mesh_slice_by_slice(monkeypatch):
  """GPU nodes may report themselves as slices (e.g. XLA's mock GPU processes), which
  jax.make_mesh refuses: without dcn_shape the mesh takes them slice-major instead."""
  slice_of = {d.id: (7 - d.id) // 2 for d in jax.devices()}  # 4 slices, in reverse id order
  monkeypatch.setattr(sharding, "_slice_of", lambda d: slice_of[d.id])
  mesh = sharding.make_mesh((4, 2, 1))
  assert [[slice_of[d.id] for d in row.ravel()] for row in mesh.devices] == [
      [0, 0], [1, 1], [2, 2], [3, 3]]  # data spans the slices, fsdp stays within one
  assert sorted(d.id for d in mesh.devices.ravel()) == list(range(8))


def test_slurm_args_one_process_per_gpu_or_per_node():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
         "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "4097",
         "SLURM_STEP_NODELIST": "gpu[007-008]"}
  assert sharding.slurm_args(env) == {"coordinator_address": "gpu007:61441", "num_processes": 16,
                                      "process_id": 9, "local_device_ids": [1]}
  per_node = sharding.slurm_args({**env, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                                  "SLURM_LOCALID": "0"}, coordinator="head:1234")
  assert per_node["local_device_ids"] is None and per_node["coordinator_address"] == "head:1234"
  assert sharding.slurm_args({**env, "CUDA_VISIBLE_DEVICES": "1"})["local_device_ids"] is None
  with pytest.raises(ValueError, match="srun"):
    sharding.slurm_args({})
  assert sharding.first_host("node001,host2") == "node001"
  assert sharding.first_host("a[01,07-09],b") == "a01"


def test_init_distributed_single_process_is_a_no_op():
  sharding.init_distributed("none")
  with pytest.raises(ValueError, match="coordinator"):
    sharding.init_distributed("explicit", num_processes=2)
  with pytest.raises(ValueError, match="mode 'none' takes no --coordinator"):
    sharding.init_distributed("none", coordinator="host:1234")  # flags not silently ignored
  assert jax.process_count() == 1
