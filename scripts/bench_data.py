"""Data pipeline throughput next to the train step's consumption rate, for one config.

  python scripts/bench_data.py --config=configs/gsm8k.py [--config.model.num_layers=2 ...]
      [--batches=64] [--steps=6]

Prints the pipeline's pairs/s and real tokens/s (after the first batch, which pays for start-up),
its padding and truncation, then the jitted train step's pairs/s and tokens/s on batches taken from
the same pipeline (the most frequent bucket shape, or all with --all_shapes; compiled before
timing; the trainer's own step, ``train.trainable_top_layers`` included), and the ratio: above 1
the pipeline keeps the step fed. Each figure is measured in this one run; the machine's other load
counts.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rmjax import sharding, train, train_state
from rmjax.data import sources
from rmjax.data.pipeline import length_report, train_dataset

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gsm8k.py", "Config file [:arg].")
_BATCHES = flags.DEFINE_integer("batches", 64, "pipeline batches to time")
_STEPS = flags.DEFINE_integer("steps", 6, "train steps to time")
_ALL_SHAPES = flags.DEFINE_bool("all_shapes", False, "time steps on every bucket shape (one "
                                "compilation each), not only on the most frequent one")


def bench_pipeline(config, n_batches: int):
  tokenizer = sources.make_tokenizer(config)
  source = sources.make_source(config, "train")
  it = iter(train_dataset(source, tokenizer, global_batch_size=config.train.batch_size,
                          max_len=config.data.max_len, seed=config.seed,
                          padding_side=config.data.padding_side,
                          **sources.pipeline_options(config)))
  t0 = time.perf_counter()
  batches = [next(it)]
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  batches += [next(it) for _ in range(n_batches)]
  seconds = time.perf_counter() - t0
  timed = batches[1:]
  real = sum(int(b["mask"].sum()) for b in timed)
  padded = sum(b["mask"].size for b in timed)
  print(f"data  {source!r}, tokenizer {config.data.tokenizer!r}")
  print(f"data  first batch {first:.2f} s; then {n_batches} batches in {seconds:.2f} s: "
        f"{n_batches * config.train.batch_size / seconds:,.0f} pairs/s, "
        f"{real / seconds:,.0f} real tokens/s, padding {1 - real / padded:.1%}, "
        f"shapes {sorted({b['tokens'].shape[-1] for b in timed})}")
  print(f"data  truncation over the training split: "
        f"{length_report(source, tokenizer, config.data.max_len)}")
  return batches, n_batches * config.train.batch_size / seconds, real / seconds


def bench_step(config, batches, n_steps: int):
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  with sharding.use_mesh(mesh, rules):
    graphdef, state = train_state.create_state(config)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step = train.jit_train_step(graphdef, config, state_sharding)
    if not _ALL_SHAPES.value:  # a full-size model takes minutes to compile on a few CPU cores
      shapes = [b["tokens"].shape for b in batches]
      common = max(set(shapes), key=shapes.count)
      batches = [b for b in batches if b["tokens"].shape == common]
    batches = [sharding.host_to_global(b, mesh, rules) for b in batches]
    compiled = set()
    for b in batches:  # compile every bucket shape first
      if b["tokens"].shape not in compiled:
        compiled.add(b["tokens"].shape)
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    timed = [batches[i % len(batches)] for i in range(n_steps)]
    t0 = time.perf_counter()
    for b in timed:
      state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
  real = sum(int(np.asarray(b["mask"]).sum()) for b in timed)
  params = sum(x.size for x in jax.tree.leaves(state["model"]))
  print(f"step  model {params / 1e6:.1f}M parameters, {len(compiled)} compiled shapes; "
        f"{n_steps} steps in {seconds:.2f} s: {seconds / n_steps:.2f} s/step, "
        f"{n_steps * config.train.batch_size / seconds:,.1f} pairs/s, {real / seconds:,.0f} "
        "real tokens/s")
  return n_steps * config.train.batch_size / seconds


def main(argv):
  del argv
  config = _CONFIG.value
  batches, data_rate, _ = bench_pipeline(config, _BATCHES.value)
  step_rate = bench_step(config, batches, _STEPS.value)
  print(f"ratio pipeline / train step = {data_rate / step_rate:,.1f}x "
        f"({jax.device_count()} {jax.devices()[0].platform} devices)")


if __name__ == "__main__":
  app.run(main)
