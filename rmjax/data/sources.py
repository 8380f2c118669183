"""Config -> tokenizer and random-access example source (the one place datasets are chosen)."""
from __future__ import annotations

from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer


def make_tokenizer(config):
  if config.data.tokenizer == "byte":
    return ByteTokenizer()
  raise ValueError(f"data.tokenizer={config.data.tokenizer!r}: expected 'byte'")


def make_source(config, split: str):
  d = config.data
  if d.name == "synthetic":
    size = d.train_size if split == "train" else d.eval_size
    return SyntheticMath(size, split=split, seed=d.seed, min_steps=d.min_steps,
                         max_steps=d.max_steps, max_value=d.max_value,
                         error_kinds=tuple(d.error_kinds.split(",")))
  raise ValueError(f"data.name={d.name!r}: expected 'synthetic'")
