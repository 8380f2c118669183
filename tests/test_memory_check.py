"""The check before a run (``rmjax.memory.check_fits``, ``rmjax.main.check_memory``): a config
whose planned step at its longest batch length exceeds the devices' memory stops before
training, with the figures and only levers whose own plan fits; one that fits passes.

The budgets are fake (a fraction of the plan), so these run on any machine without allocating.
"""
import re

import jax
import pytest

from rmjax import main, memory
from tests.helpers import tiny_config

MESH = (1, 1, 1)


def bucketed():
  config = tiny_config("paper")
  config.data.max_len, config.data.buckets = 64, (16, 32)
  config.model.dim, config.model.mlp_dim = 64, 256
  return config


def planned(config, length, mesh=MESH, **fields):
  return memory.plan(memory.with_fields(config, data__max_len=length, **fields), mesh).total


def apply(config, flags: str):
  """The config after the message's ``--config.block.name=value`` flags."""
  fields = {}
  for block, name, value in re.findall(r"--config\.(\w+)\.(\w+)=(\S+)", flags):
    fields[f"{block}__{name}"] = value if block == "model" else int(value)
  return memory.with_fields(config, **fields)


def test_bucket_lengths_are_the_pipelines_up_to_max_len():
  config = bucketed()
  assert memory.bucket_lengths(config) == [16, 32, 64]
  config.data.buckets = (16, 128)  # a bucket over max_len is never produced
  assert memory.bucket_lengths(config) == [16, 64]


def test_a_config_that_fits_passes_with_every_length_planned():
  config = bucketed()
  need = planned(config, 64)
  out = memory.check_fits(config, MESH, need)  # exactly enough
  assert out == {n: planned(config, n) for n in (16, 32, 64)}
  assert out[16] < out[32] < out[64]
  with pytest.raises(memory.DoesNotFit):
    memory.check_fits(config, MESH, need - 1)


def test_a_config_that_does_not_fit_stops_with_figures_and_levers_that_fit():
  config = bucketed()
  full, accum2 = planned(config, 64), planned(config, 64, train__accum_steps=2)
  budget = (max(accum2, planned(config, 32)) + full) // 2  # 64 tokens fail, accumulation fits
  assert planned(config, 32) <= budget < full
  with pytest.raises(memory.DoesNotFit) as e:
    memory.check_fits(config, MESH, budget, "configs/x.py: ")
  msg = str(e.value)
  assert msg.startswith("configs/x.py: the train step does not fit: at 64 tokens (batch 8 pairs")
  assert f"needs {full / 2 ** 20:.2f} MiB" in msg and f"{budget / 2 ** 20:.2f} MiB available" in msg
  assert "Lengths that fit: [16, 32] of [16, 32, 64]" in msg
  listed = re.findall(r"^  (--config[^:]+):", msg, re.M)
  assert "--config.train.accum_steps=2" in listed
  for flag, _, _ in memory.levers(config, MESH):  # listed if and only if its plan fits
    fits = planned(apply(config, flag), 64) <= budget
    assert (flag in listed) == fits, flag
  assert "--memory_check=none" in msg


def test_no_single_lever_fits_gives_a_chain_that_fits():
  config = bucketed()
  config.model.remat = "full"
  budget = planned(config, 64, train__accum_steps=4)  # halving the micro-batch once is not enough
  assert planned(config, 64, train__accum_steps=2) > budget
  with pytest.raises(memory.DoesNotFit, match=r"\n  --config\.train\.accum_steps=4: ") as e:
    memory.check_fits(config, MESH, budget)
  chain = re.search(r"^  (--config.*): ", str(e.value), re.M).group(1)
  assert planned(apply(config, chain), 64) <= budget


def test_main_stops_before_training_when_the_devices_are_too_small(monkeypatch):
  """With the plan only (compile_=False): the fake budget is set by the plan."""
  config = bucketed()  # main plans on all devices: the batch is split over them
  mesh = (jax.device_count(), 1, 1)
  config.train.batch_size = 8 * jax.device_count()
  monkeypatch.setattr(memory, "device_bytes", lambda device: (planned(config, 32, mesh), "fake"))
  with pytest.raises(SystemExit, match=r"(?s)x\.py: the train step does not fit.*available: fake"):
    main.check_memory(config, "x.py", compile_=False)
  monkeypatch.setattr(memory, "device_bytes", lambda device: (planned(config, 64, mesh), "fake"))
  main.check_memory(config, "x.py", compile_=False)  # fits: returns


def test_main_with_compile_reads_xlas_bytes(monkeypatch):
  """compile_=True: the figure at the longest length is XLA's, the rest scaled by its ratio."""
  config = bucketed()
  config.train.batch_size = 8 * jax.device_count()
  monkeypatch.setattr(memory, "device_bytes", lambda device: (2 ** 10, "fake"))
  with pytest.raises(SystemExit, match=r"at 64 tokens .* XLA's compiled step needs [\d.]+ MiB"):
    main.check_memory(config, "x.py")


def test_a_step_that_fits_by_a_wide_margin_is_not_compiled(monkeypatch):
  """The plan times ``PLAN_MARGIN`` within the budget: no compile (it costs a tiny run as much
  as its training); closer than that: compiled."""
  config = bucketed()
  config.train.batch_size = 8 * jax.device_count()
  mesh = (jax.device_count(), 1, 1)
  need = planned(config, 64, mesh)
  compiled = []
  monkeypatch.setattr(memory, "compiled", lambda c, m: compiled.append(c) or 1 / 0)
  monkeypatch.setattr(memory, "device_bytes",
                      lambda device: (round(need * memory.PLAN_MARGIN), "fake"))
  main.check_memory(config, "x.py")
  assert not compiled
  monkeypatch.setattr(memory, "device_bytes",
                      lambda device: (round(need * memory.PLAN_MARGIN) - 1, "fake"))
  with pytest.raises(ZeroDivisionError):
    main.check_memory(config, "x.py")
  assert compiled
