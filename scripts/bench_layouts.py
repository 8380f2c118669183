"""Training throughput by data layout on real data: ``pairs``, ``shared_prompt``, ``packed``.

  python scripts/bench_layouts.py                    # HH-RLHF and GSM8K, BT and paper, 4 layers
  python scripts/bench_layouts.py --trainable_top_layers=0   # the head only: a forward-bound step
  python scripts/bench_layouts.py --datasets=gsm8k_solutions --losses=bt --batches=2 --rounds=2
  python scripts/bench_layouts.py --layers=30        # the whole SmolLM2-135M depth (slow on CPU)
  python scripts/bench_layouts.py --pack_len=hh_rlhf=768  # data.pack_len per dataset

# B: pairs per batch

For each dataset (skipped when ``--source_dir`` lacks its file) the script takes ``--batches``
training batches from the real pipeline (SmolLM2's tokenizer, the config's bucketing and length
sorting with ``sort_window = --batches``, so the batches are one sort window; ``--max_len`` per
dataset keeps a CPU run short). All layouts train on the same pairs: the window's, sorted by the
length of the rows each runs (``shared_prompt`` and ``packed`` in the same batches; ``packed``:
one group, ``data.pack_len`` from ``--pack_len``, default ``2 * max_len``). Each contestant (dataset x
loss x layout) is the trainer's jitted step (``train.jit_train_step``: AdamW, clipping, the sparse
last block) on a SmolLM2-135M-shaped model with random weights and ``--layers`` of its 30 blocks,
training what ``--trainable_top_layers`` says (default: everything, as ``configs/gsm8k.py`` and
``configs/hh_rlhf.py`` do; ``configs/gsm8k_smollm2.py`` trains the top 2 of 30 blocks, a step
dominated by the forward pass, which ``0``, the head only, approximates), compiled for every
batch shape before timing. Then ``--rounds`` rounds each run every contestant's batches once, one
contestant after the other, so that all see the same load on a shared machine; the figures are
medians over rounds, speedups medians of per-round ratios.

Printed per contestant: pairs/s; real tokens/s (the pairs' non-pad tokens, the same data for
every layout); XLA's cost-analysis FLOPs per pair (mean over the batches); the padding share of
the rows the model runs. Before timing, each loss is evaluated on one batch in every layout from
the same weights (equal up to float32 rounding). The last line is one JSON object:
``hh_speedup``, ``gsm8k_speedup`` (pairs/s over ``pairs`` of the fastest exact layout, named by
``hh_fastest``, ``gsm8k_fastest``: the layout whose lower speedup over the losses is highest,
that lower one), and every figure.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rmjax and configs, from anywhere

from bench_measure import machine, xla_cost  # noqa: E402  beside this file

LAYOUTS = ("pairs", "shared_prompt", "packed")
DATASETS = {"hh_rlhf": ("hh", "hh-rlhf/harmless-base-test.jsonl.gz"),
            "gsm8k_solutions": ("gsm8k", "gsm8k/example_model_solutions.jsonl")}

_DATASETS = flags.DEFINE_list("datasets", list(DATASETS), "data.name of each dataset.")
_LOSSES = flags.DEFINE_list("losses", ["bt", "paper"], "Loss variants (configs/gsm8k.py).")
_SOURCE_DIR = flags.DEFINE_string("source_dir", str(Path(__file__).resolve().parents[2] / "shared"
                                                    / "data"), "The raw data (../shared/data).")
_MAX_LEN = flags.DEFINE_list("max_len", ["hh_rlhf=512", "gsm8k_solutions=320"],
                             "data.max_len per dataset (buckets above it are dropped).")
_PACK_LEN = flags.DEFINE_list("pack_len", [], "data.pack_len per dataset (default 2 * max_len).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder blocks (SmolLM2-135M has 30).")
_TOP = flags.DEFINE_integer("trainable_top_layers", -1, "train.trainable_top_layers: -1 trains "
                            "everything (the recipes' default), k the head and the top k blocks.")
_PAIRS = flags.DEFINE_integer("pairs", 16, "B: pairs per batch (the recipes' train.batch_size).")
_BATCHES = flags.DEFINE_integer("batches", 16, "Batches per contestant and round: one sort window "
                                "(configs/gsm8k.py's data.sort_window).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds.")


def make_config(dataset: str, loss: str, layout: str):
  from configs import gsm8k, hh_rlhf
  c = (hh_rlhf if dataset == "hh_rlhf" else gsm8k).get_config(loss)
  c.data.name, c.data.source_dir, c.data.layout = dataset, _SOURCE_DIR.value, layout
  c.data.max_len = int(dict(x.split("=") for x in _MAX_LEN.value)[dataset])
  c.data.pack_len = int(dict(x.split("=") for x in _PACK_LEN.value).get(dataset, 0))
  c.data.buckets = tuple(b for b in c.data.buckets if b < c.data.max_len) + (c.data.max_len,)
  c.model.update(vocab_size=49152, dim=576, num_layers=_LAYERS.value, num_heads=9,
                 num_kv_heads=3, head_dim=64, mlp_dim=1536, rope_theta=1e5)
  c.model.init_from = ""
  c.train.batch_size, c.train.trainable_top_layers = _PAIRS.value, _TOP.value
  c.mesh.shape = (1, 1, 1)
  return c


def take_batches(config) -> list[dict]:
  """The first sort window of the training pipeline: ``--batches`` batches."""
  from rmjax.data import sources
  from rmjax.data.pipeline import train_dataset
  opts = {**sources.pipeline_options(config), "sort_window": _BATCHES.value}
  it = iter(train_dataset(sources.make_source(config, "train"), sources.make_tokenizer(config),
                          global_batch_size=config.train.batch_size,
                          max_len=config.data.max_len, seed=config.seed,
                          padding_side=config.data.padding_side, **opts))
  return [next(it) for _ in range(_BATCHES.value)]


def loss_check(config, batches: dict) -> dict[str, float]:
  """The objective's loss on the first batch of each layout, from the same weights: one set of
  pairs (``shared_prompt`` and ``packed`` cut the same batches; ``pairs``: theirs alone)."""
  import jax

  from rmjax import objective, sharding, train_state
  terms = objective.build_terms(config.loss)
  first = {layout: batches[layout][0] for layout in LAYOUTS[1:]}
  first["pairs"] = {k: v for k, v in first["packed"].items() if not k.startswith("packed_")}
  for k, v in first["pairs"].items():
    np.testing.assert_array_equal(first["shared_prompt"][k], v, err_msg=k)  # the same pairs
  with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    model, _ = train_state.merge(*train_state.create_state(config))
    loss = jax.jit(lambda b: objective.objective(model, b, jax.random.key(0), terms)[0])
    return {layout: float(loss(first[layout])) for layout in LAYOUTS}


def padding_share(batches: list[dict]) -> float:
  """The share of the model's row tokens that are padding."""
  key = next(k for k in ("packed_mask", "shared_mask", "mask") if k in batches[0])
  return 1 - sum(int(b[key].astype(bool).sum()) for b in batches) / sum(b[key].size
                                                                         for b in batches)


class Contestant:
  """The trainer's jitted step on one layout's batches, compiled for each of their shapes."""

  def __init__(self, config, batches: list[dict]):
    import jax

    from rmjax import sharding, train, train_state
    self.mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(self.mesh):
      graphdef, self.state = train_state.create_state(config, self.mesh)
      step = train.jit_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding,
                                                                 self.state))
      self.batches = [sharding.host_to_global(b, self.mesh) for b in batches]
      self.compiled, flops, t0 = {}, [], time.perf_counter()
      for b in self.batches:
        shape = tuple(sorted((k, v.shape) for k, v in b.items()))
        if shape not in self.compiled:
          self.compiled[shape] = step.lower(self.state, b).compile()
        flops.append(xla_cost(self.compiled[shape])[0])
      self.compile_s = time.perf_counter() - t0
      self.shapes = [tuple(sorted((k, v.shape) for k, v in b.items())) for b in self.batches]
    self.flops_per_pair = float(np.mean(flops)) / config.train.batch_size

  def __call__(self) -> float:
    """Seconds for one step on each batch."""
    import jax
    t0 = time.perf_counter()
    for shape, b in zip(self.shapes, self.batches):
      self.state, metrics = self.compiled[shape](self.state, b)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def main(argv):
  del argv
  import jax
  results, rows = {}, []
  print(f"# {datetime.date.today()}, {machine()}, jax {jax.__version__}; SmolLM2-135M shape, "
        f"{_LAYERS.value} layers, random weights, fp32, trainable_top_layers={_TOP.value}, "
        f"B={_PAIRS.value}, "
        f"{_BATCHES.value} batches x {_ROUNDS.value} rounds")
  for dataset in _DATASETS.value:
    short, path = DATASETS[dataset]
    if not os.path.exists(os.path.join(_SOURCE_DIR.value, path)):
      print(f"# {dataset}: skipped, {path} not in {_SOURCE_DIR.value}")
      continue
    batches = {layout: take_batches(make_config(dataset, _LOSSES.value[0], layout))
               for layout in LAYOUTS}
    real = sum(int(b["mask"].sum()) for b in batches["pairs"])
    for layout in LAYOUTS[1:]:  # the same pairs
      assert real == sum(int(b["mask"].sum()) for b in batches[layout]), layout
    pairs = _BATCHES.value * _PAIRS.value
    contestants = {}
    for loss in _LOSSES.value:
      losses = loss_check(make_config(dataset, loss, "pairs"), batches)
      lp = losses["pairs"]
      differ = max(abs(x - lp) / abs(lp) for x in losses.values())
      print(f"# {dataset} {loss}: loss on one batch, "
            + ", ".join(f"{k} {v:.7f}" for k, v in losses.items())
            + f" (largest relative difference {differ:.1e})", flush=True)
      results[f"{short}_{loss}_loss_relative_difference"] = differ
      for layout in LAYOUTS:
        config = make_config(dataset, loss, layout)
        contestants[loss, layout] = c = Contestant(config, batches[layout])
        print(f"# {dataset} {loss} {layout}: compiled {len(c.compiled)} shapes in "
              f"{c.compile_s:.0f} s", flush=True)
    seconds = {k: [] for k in contestants}
    for _ in range(_ROUNDS.value):
      for k, c in contestants.items():
        seconds[k].append(c())
    for (loss, layout), c in contestants.items():
      s = np.asarray(seconds[loss, layout])
      ratio = float(np.median(np.asarray(seconds[loss, "pairs"]) / s))
      results[f"{short}_{loss}_{layout}"] = r = {
          "pairs_per_s": pairs / float(np.median(s)), "real_tokens_per_s": real / np.median(s),
          "gflops_per_pair": c.flops_per_pair / 1e9, "speedup": ratio,
          "padding": padding_share(batches[layout])}
      rows.append(f"| {dataset} | {loss} | {layout} | {r['pairs_per_s']:.2f} | "
                  f"{r['real_tokens_per_s']:,.0f} | {r['gflops_per_pair']:.2f} | "
                  f"{r['padding']:.1%} | {ratio:.2f}x |")
    lowest = {layout: min(results[f"{short}_{loss}_{layout}"]["speedup"]
                          for loss in _LOSSES.value) for layout in LAYOUTS[1:]}
    results[f"{short}_fastest"] = fastest = max(lowest, key=lowest.get)
    results[f"{short}_speedup"] = lowest[fastest]
  print("| dataset | loss | layout | pairs/s | real tokens/s | GFLOPs/pair | padding | "
        "speedup |")
  print("|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print(json.dumps({k: results.pop(k, None) for k in ("hh_speedup", "gsm8k_speedup",
                                                      "hh_fastest", "gsm8k_fastest")}
                   | results))


if __name__ == "__main__":
  app.run(main)
