"""rmjax.aot: the trainer's step compiled for TPU topologies on this CPU host (libtpu).

Compiling needs libtpu (the ``tpu`` extra, which ``test`` includes); without it those tests skip.
"""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import synthetic
from rmjax import aot, hlo, memory, sharding, train_state

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason=f"libtpu not installed: {aot.INSTALL}")
CONFIG = "configs/synthetic.py:paper,tiny"


def tiny(shape, dcn=None):
  config = synthetic.get_config("paper,tiny")
  with config.unlocked():
    config.mesh.shape, config.mesh.dcn_shape = shape, dcn
  return config


def test_topology_names():
  assert aot.parse_topology("v5p-128") == ("v5p", "v5p:4x4x4")  # 128 TensorCores, 64 chips
  assert aot.parse_topology("v5litepod-256") == ("v5e", "v5e:16x16")
  assert aot.parse_topology("v6e-256") == ("v6e", "v6e:16x16")
  assert aot.parse_topology("v5e:2x2") == ("v5e", "v5e:2x2")
  for bad in ("v9:2x2", "v5p:4x4", "v5e-3", "tpu"):
    with pytest.raises(ValueError, match="unknown TPU topology.*v5p:4x4x4.*v5litepod-256"):
      aot.parse_topology(bad)


def test_no_libtpu_says_how(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(RuntimeError, match=r"needs libtpu.*pip install -e '\.\[tpu\]'"):
    aot.topology_devices("v5e:2x2")


HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[8,128]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
}

%all-reduce-scatter.1 (input: f32[64]) -> f32[16] {
  %all-reduce.2 = f32[64]{0} all-reduce(%input), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (a: f32[16,8], b: s32[]) -> f32[8] {
  %a = f32[16,8]{1,0:T(8,128)} parameter(0)
  %b = s32[]{:T(128)} parameter(1)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %f = f32[16]{0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %ar = (f32[4]{0}, bf16[2]{0}) all-reduce(%p, %q), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  %send = (f32[5,8]{1,0}, u32[], token[]) send(%g, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
}
"""


WIDENED = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(31)
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = bf16[64,128]{1,0} all-reduce(%x), channel_id=1, replica_groups=mesh['axis_0'=4] {'axis_0'}, to_apply=%add
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""


def test_collectives_in_a_loop_without_known_trip_count_count_the_conditions_bound():
  """XLA:TPU's widened layer scans carry no known_trip_count: the trips come from the condition
  (the 8B v5p-128 compile: 421 all-reduces per step, not 31)."""
  (row,) = hlo.collectives(WIDENED, 1)
  assert (row["kind"], row["count"], row["bytes"]) == ("all-reduce", 31, 31 * 64 * 128 * 2)


def test_entry_parameters_of_a_tupled_argument():
  """Programs with many arguments (the 70B step: 2178) take them as one tuple parameter."""
  text = ("HloModule m\n\nENTRY %main (p: (f32[16,8], s32[])) -> f32[8] {\n"
          "  %p = (f32[16,8]{1,0:T(8,128)}, s32[]{:T(128)}) parameter(0), sharding={...}\n}\n")
  assert hlo.entry_parameters(text) == [("f32", (16, 8), 512, 16 * 128 * 4), ("s32", (), 4, 512)]


def test_collectives_from_hlo():
  rows = {(r["kind"], r["network"]): r for r in hlo.collectives(HLO, 2)}
  assert set(rows) == {("all-gather", "ici"), ("reduce-scatter", "ici"), ("all-reduce", "ici"),
                       ("all-reduce", "dcn")}
  ag = rows["all-gather", "ici"]  # in a while body of 3 trips, group of 4
  assert (ag["count"], ag["bytes"], ag["moved_bytes"]) == (3, 3 * 8 * 128 * 2, 3 * 2048 * 3 / 4)
  assert rows["reduce-scatter", "ici"]["bytes"] == 64 * 4
  assert rows["all-reduce", "ici"]["moved_bytes"] == (16 + 4) * 2 * 3 / 4
  dcn = rows["all-reduce", "dcn"]
  assert (dcn["count"], dcn["bytes"], dcn["moved_bytes"]) == (1, 160, 160)
  assert hlo.entry_parameters(HLO) == [("f32", (16, 8), 512, 16 * 128 * 4), ("s32", (), 4, 512)]


def per_chip_shapes(config, mesh):
  """(dtype, per-chip shape) of every array of the state and batch the step reads."""
  with sharding.use_mesh(mesh, config.mesh.rules):
    _, abstract = train_state.abstract_state(config, mesh)
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  # the step only writes opt_state.last_finite (a bool): jit drops an argument it never reads
  leaves = [x for p, x in leaves if "last_finite" not in jax.tree_util.keystr(p)]
  leaves += [x for k, x in memory.abstract_batch(config, mesh).items()
             if k != "truncated"]  # a statistic the step never reads: dropped too
  return sorted((x.dtype.name, tuple(x.sharding.shard_shape(x.shape))) for x in leaves)


@needs_libtpu
def test_v5e_2x2_arguments_exact():
  config = tiny((2, 2, 1))
  out = aot.analyse(config, "v5e:2x2")
  assert out["num_chips"] == 4 and out["fits"] and out["mesh_shape"] == [2, 2, 1]
  _, _, devices = aot.topology_devices("v5e:2x2")
  mesh, _ = aot.mesh_for(config, devices, 1)
  text = memory.compile_step(config, mesh).as_text()
  names = {"float32": "f32", "int32": "s32", "uint32": "u32"}
  expected = [(names[d], s) for d, s in per_chip_shapes(config, mesh)]
  params = hlo.entry_parameters(text)
  assert sorted((d, s) for d, s, _, _ in params) == expected  # nothing replicated by accident
  assert sum(p[3] for p in params) == out["argument_bytes"]  # XLA's figure: tile-padded
  assert out["argument_unpadded_bytes"] == sum(p[2] for p in params)
  plan = out["plan"]  # planned for XLA:TPU (rmjax.memory.plan's backend)
  assert plan == dataclasses.asdict(memory.plan(config, (2, 2, 1), backend="tpu"))
  state_bytes = sum(math.prod(s) * 4 for _, s in expected)  # every array here is 4 bytes wide
  assert plan["params"] + plan["optimizer"] + plan["batch"] == state_bytes + 1  # + last_finite
  assert out["flops_per_chip"] > 0 and out["est_step_s"] > 0 and 0 < out["est_mfu"] < 1
  kinds = {c["kind"] for c in out["collectives"]}
  assert {"all-gather", "all-reduce"} <= kinds
  assert all(c["network"] == "ici" for c in out["collectives"])


@needs_libtpu
def test_cli_two_slices_json_and_dcn_data_parallel_only():
  """Data parallel across 2 slices: only all-reduces (gradients, metrics) cross the DCN."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  run = subprocess.run(
      [sys.executable, "-m", "rmjax.aot", f"--config={CONFIG}", "--topology=v5e:2x2",
       "--num_slices=2", "--config.mesh.shape=(1,4,1)", "--config.mesh.dcn_shape=(2,1,1)"],
      capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  for key in aot.REPORT_KEYS:
    assert key in out and out[key] is not None, key
  assert out["num_chips"] == 8 and out["num_slices"] == 2 and out["fits"]
  assert "collectives of one step" in run.stdout and "FITS" in run.stdout
  assert out["dcn_collective_bytes"] > 0
  dcn_kinds = {c["kind"] for c in out["collectives"] if c["network"] == "dcn"}
  assert dcn_kinds == {"all-reduce"}


@needs_libtpu
@pytest.mark.slow
def test_fsdp_over_dcn_gathers_across_slices():
  """The counter-case: FSDP across slices moves parameter all-gathers onto the DCN."""
  out = aot.analyse(tiny((1, 4, 1), (1, 2, 1)), "v5e:2x2", num_slices=2)
  dcn_kinds = {c["kind"] for c in out["collectives"] if c["network"] == "dcn"}
  assert "all-gather" in dcn_kinds


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips():
  _, _, devices = aot.topology_devices("v5e:2x2")
  with pytest.raises(ValueError, match="does not divide 4 devices.*4 chips in 1 slice"):
    aot.mesh_for(tiny((3, -1, 1)), devices, 1)
  with pytest.raises(ValueError, match="needs 8 devices, have 4"):
    aot.mesh_for(tiny((2, 4, 1)), devices, 1)


@needs_libtpu
def test_search_bisects_per_remat_policy(monkeypatch):
  """--search's bisection, with a stand-in for the compile: the largest batch per policy."""
  limit = {"none": 6, "dots_saveable": 6, "full": 20}  # pairs per chip that fit
  tried = []

  def analyse(config, topology, num_slices):
    per_chip = config.train.batch_size // 4
    tried.append((config.model.remat, per_chip))
    return {"fits": per_chip <= limit[config.model.remat], "compile_s": 0.0}

  monkeypatch.setattr(aot, "analyse", analyse)
  config = tiny((1, 4, 1))
  with config.unlocked():
    config.train.batch_size = 32  # 8 pairs per chip: too many without full remat
  out = aot.search(config, "v5e:2x2")
  assert out["max_batch_per_chip"] == limit and out["batch_shards"] == 4
  assert out["cheapest_remat"] == "full" and out["max_batch_per_chip_cheapest"] == 20
  assert len(tried) == len(set(tried)) <= 16
  assert "no remat policy fits" not in aot.search_table(out)
