"""Shared test fixtures: a tiny config and a batch of pairs from the synthetic data."""
import jax
import numpy as np
from flax import nnx

from configs import synthetic
from rmjax import objective, sharding, train_state
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
    model, _ = train_state.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = lambda p: objective.objective(nnx.merge(model_def, p, rest), batch,
                                            jax.random.key(3), terms)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return f(state, batch)


def relative_errors(actual, desired) -> dict[str, float]:
  """``||a - d|| / ||d||`` per leaf (float64), keyed by the leaf's path."""
  flat_a, tree_a = jax.tree.flatten_with_path(actual)
  flat_d, tree_d = jax.tree.flatten_with_path(desired)
  assert tree_a == tree_d, f"different trees:\n{tree_a}\n{tree_d}"
  errors = {}
  for (path, a), (_, d) in zip(flat_a, flat_d):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    assert a.shape == d.shape, f"{jax.tree_util.keystr(path)}: shapes {a.shape} {d.shape}"
    diff, norm = np.linalg.norm((a - d).ravel()), np.linalg.norm(d.ravel())
    errors[jax.tree_util.keystr(path)] = diff / norm if norm else (0.0 if diff == 0 else np.inf)
  return errors


def assert_tree_close(actual, desired, rtol):
  """Every leaf within ``rtol`` of ``desired`` in norm, ``||a - d|| <= rtol * ||d||``: float32
  rounding (which differs by CPU and XLA version) moves single entries near 0 by much more than
  their size, but a leaf's norm by ~1e-6; a wrong mask or a dropped term moves it by >> 1e-3."""
  errors = relative_errors(actual, desired)
  bad = {k: e for k, e in errors.items() if not e <= rtol}
  worst = max(errors, key=errors.get)
  assert not bad, (f"{len(bad)} of {len(errors)} leaves differ by more than rtol={rtol:g} in "
                   f"norm: {dict(sorted(bad.items(), key=lambda kv: -kv[1])[:5])}")
  return errors[worst]
