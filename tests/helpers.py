"""Shared test fixtures: a tiny config and a batch of pairs from the synthetic data."""
import jax
import numpy as np
from flax import nnx

from configs import synthetic
from rmjax import objective, sharding, train
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


def loss_metrics_grads(graphdef, state, config, mesh, padding_side="right"):
  """``((loss, metrics), grads)`` of the config's objective on 8 fixed pairs, every parameter."""
  terms = objective.build_terms(config.loss)
  batch = sharding.host_to_global(
      pair_batch(8, max_len=config.data.max_len, padding_side=padding_side), mesh)

  @jax.jit
  def f(state, batch):
    model, _ = train.unpack(nnx.merge(graphdef, state))
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = lambda p: objective.objective(nnx.merge(model_def, p, rest), batch,
                                            jax.random.key(3), terms)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return f(state, batch)
