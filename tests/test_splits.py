"""One problem split per dataset, whatever its config, and cached features that keep every split.

HH-RLHF is red-team material: these tests assert on it and never print its text.
"""
import collections
import itertools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from rmjax import cache_features, sharding, train_state
from rmjax.data import readers
from rmjax.data.synthetic import SyntheticMath
from tests.helpers import tiny_config

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")
DATASETS = ("gsm8k_solutions", "gsm8k_perturbed", "hh_rlhf", "finegrained_qa")


def config_splits(name: str, data_dir: str) -> dict[str, dict[int, set]]:
  """``{config: {problem_id: splits}}`` for every config of builder ``name``, split by the
  builder's own code on the real files, without preparing it (nothing is written)."""
  import tensorflow_datasets as tfds
  from rmjax.data import builders  # noqa: F401 (registers the builders)
  cls = tfds.builder_cls(name)
  out = {}
  for config in [c.name for c in cls.BUILDER_CONFIGS] or [""]:
    builder = cls(config=config or None, data_dir=data_dir)
    splits = collections.defaultdict(set)
    for split, examples in builder._split_generators(SimpleNamespace(manual_dir=DATA)).items():
      for _, ex in examples:
        splits[int(ex["problem_id"])].add(split)
    out[config or name] = dict(splits)
  return out


@needs_data
@pytest.mark.parametrize("name", DATASETS)
def test_every_config_of_a_dataset_shares_one_problem_split(name, tmp_path):
  configs = config_splits(name, str(tmp_path))
  for config, splits in configs.items():
    twice = [p for p, s in splits.items() if len(s) > 1]
    assert not twice, f"{name}/{config}: {len(twice)} problems in two splits, e.g. {twice[:5]}"
  for (a, split_a), (b, split_b) in itertools.combinations(configs.items(), 2):
    leak = sorted(p for p in split_a.keys() & split_b.keys() if split_a[p] != split_b[p])
    assert not leak, (f"{name}: {len(leak)} problems in one split of {a} and another of {b}, "
                      f"e.g. {leak[:5]}")
  # the default config's split is the one the README's results and cached features use
  if name == "gsm8k_solutions":
    _, pairs, _ = readers.gsm8k_solutions(str(DATA / "gsm8k" / "example_model_solutions.jsonl"))
    want = readers.split_groups([p["problem_id"] for p in pairs], 0)
    assert {str(p): s.pop() for p, s in configs["pairs"].items()} == want
    counts = collections.Counter(s.pop() for s in configs["solutions"].values())
    assert counts == {"train": 585 + 470, "validation": 73 + 59, "test": 73 + 59}
  if name == "finegrained_qa":
    pairs, _ = readers.finegrained_qa(str(DATA / "finegrained-qa" / "dev_feedback.json"))
    want = readers.split_groups([p["question_id"] for p in pairs], 0)
    assert {str(p): s.pop() for p, s in configs["decisive"].items()} == want


def test_synthetic_configs_share_one_problem_split():
  """Problems (prompts) generated under other data settings keep the split their hash picks."""
  split_of = collections.defaultdict(set)
  for kwargs in ({}, {"error_kinds": ("arith", "copy")}, {"seed": 7, "min_steps": 1}):
    for split in ("train", "validation", "test"):
      src = SyntheticMath(300, split=split, max_steps=3, **kwargs)
      for i in range(len(src)):
        split_of[src[i]["prompt"]].add(split)
  assert len(split_of) > 300 and all(len(s) == 1 for s in split_of.values())


def test_caching_another_split_keeps_the_earlier_ones(tmp_path):
  out = str(tmp_path / "features")
  config = tiny_config("paper")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    model, _ = train_state.merge(*train_state.create_state(config))
    cache_features.cache(config, model, 1, out, ("train",), limit=12, batch_size=8)
    cache_features.cache(config, model, 1, out, ("validation",), limit=8, batch_size=8)
    with pytest.raises(ValueError, match="other settings"):  # another layer: refused, not mixed
      cache_features.cache(config, model, 0, out, ("test",), limit=8, batch_size=8)
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f)["splits"] == {"train": 12, "validation": 8}
  for split, n in (("train", 12), ("validation", 8)):
    src = cache_features.FeatureSource(out, split)
    assert len(src) == n and len(src.arrays()["features"]) == n
    assert src[n - 1]["features"].shape == (2, config.data.max_len, config.model.dim)
