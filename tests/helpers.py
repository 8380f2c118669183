"""Shared test fixtures: a tiny config and a batch of pairs from the synthetic data."""
import numpy as np

from configs import synthetic
from rmjax.data.pipeline import FIELDS, encode_pair
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer


def tiny_config(variant="paper", **train):
  c = synthetic.get_config(f"{variant},tiny")
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def pair_batch(n=8, max_len=64, padding_side="right", split="validation"):
  src, tok = SyntheticMath(n, split=split), ByteTokenizer()
  pairs = [encode_pair(src[i], tok, max_len, padding_side) for i in range(n)]
  return {k: np.stack([p[k] for p in pairs]) for k in FIELDS}
