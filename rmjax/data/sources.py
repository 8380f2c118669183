"""Config -> tokenizer, random-access example source and pipeline options (the one place
datasets are chosen).

``config.data.name``: ``synthetic`` (generated, no files), or a TFDS builder prepared on first use
from ``data.source_dir`` into ``data.tfds_dir``: ``gsm8k_solutions``, ``gsm8k_perturbed``,
``hh_rlhf``, ``finegrained_qa``, ``preference_jsonl`` (``data.files``).
"""
from __future__ import annotations

import jax
from jax.experimental import multihost_utils

from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import load_tokenizer, resolve_convention

BUILDERS = {"gsm8k_solutions": "gsm8k_solutions/pairs", "gsm8k_perturbed": "gsm8k_perturbed",
            "hh_rlhf": "hh_rlhf", "finegrained_qa": "finegrained_qa/decisive",
            "preference_jsonl": "preference_jsonl"}
# data.* fields that tune the training pipeline, with their values for configs that lack them
PIPELINE_DEFAULTS = {"buckets": (), "sort_window": 1, "layout": "pairs", "pack_len": 0,
                     "num_threads": 0, "num_workers": 0}


def make_tokenizer(config):
  """The run's tokenizer under its scoring convention (``data.convention``; '' or absent: 'hf'
  when ``model.init_from`` is a sequence classifier, else 'rmjax'; rmjax.data.tokenizer)."""
  init_from = config.model.get("init_from", "")
  return load_tokenizer(config.data.tokenizer, resolve_convention(
      config.data.get("convention", ""), init_from), init_from)


def parse_files(spec: str) -> dict[str, str]:
  """``"train=a.jsonl,validation=b.jsonl"`` -> ``{"train": "a.jsonl", ...}``."""
  files = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
  if not files or len(files) != len([i for i in spec.split(",") if i.strip()]):
    raise ValueError(f"data.files={spec!r}: expected 'split=path,...', e.g. "
                     "'train=pairs.jsonl,validation=val.jsonl'")
  return files


def make_source(config, split: str):
  d = config.data
  if d.name == "synthetic":
    size = d.train_size if split == "train" else d.eval_size
    return SyntheticMath(size, split=split, seed=d.seed, min_steps=d.min_steps,
                         max_steps=d.max_steps, max_value=d.max_value,
                         error_kinds=tuple(d.error_kinds.split(",")))
  if d.name not in BUILDERS:
    raise ValueError(f"data.name={d.name!r}: expected 'synthetic' or one of {sorted(BUILDERS)}")
  from rmjax.data import builders  # imports tensorflow_datasets: only for real data
  kwargs = {"source_dir": d.source_dir, "data_dir": d.tfds_dir or None}
  if d.name == "preference_jsonl":
    kwargs["files"] = parse_files(d.files)
  if jax.process_count() > 1:  # process 0 prepares; the others then find it (or build locally)
    if jax.process_index() == 0:
      builders.build(BUILDERS[d.name], **kwargs)
    multihost_utils.sync_global_devices(f"rmjax_build_{d.name}_{split}")
  return builders.load_split(BUILDERS[d.name], split, **kwargs)


def pipeline_options(config) -> dict:
  """``train_dataset`` keyword arguments from ``config.data`` (bucketing, parallel reads)."""
  opts = {k: config.data.get(k, v) for k, v in PIPELINE_DEFAULTS.items()}
  opts["buckets"] = tuple(opts["buckets"])
  return opts
