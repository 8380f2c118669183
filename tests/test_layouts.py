"""data.layout='shared_prompt' (one row per pair, the common prefix once) against 'pairs';
the packed layout's own tests are in tests/test_packing.py."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import objective, sharding, train, train_state
from rmjax.data import packing
from rmjax.data.pipeline import BucketTrim, share_prompt, train_dataset
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.models.llama import positions_and_mask
from tests.helpers import assert_tree_close, pair_batch, tiny_config
from tests.test_golden import GOLDEN


def shared_batch(batch: dict, padding_side: str) -> dict:
  """``batch`` (pairs) plus its shared rows, trimmed as the pipeline trims them."""
  n, _, max_len = batch["tokens"].shape
  rows = [share_prompt({k: v[i] for k, v in batch.items()}, pad_id=0) for i in range(n)]
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return BucketTrim((), max_len, padding_side)(stacked)


def packed_batch(batch: dict, padding_side: str, shards: int = 1, accum_steps: int = 1) -> dict:
  """``batch`` (pairs) plus its packed rows, as the pipeline builds them; rows of ``4 *
  max_len`` tokens, so that they hold several of the synthetic pairs (each ~``max_len``)."""
  max_len = batch["tokens"].shape[-1]
  return packing.pack(shared_batch(batch, padding_side), pad_id=0, pack_len=4 * max_len,
                      row_lengths=[*BucketTrim((), max_len, padding_side).shared_buckets,
                                   4 * max_len], shards=shards, accum_steps=accum_steps)


def test_shared_row_attends_like_two_separate_sequences():
  """Naive reference: in the row, token i may attend to token j iff j <= i and both are tokens
  of one of the pair's two sequences (``shared_index``); each sequence's tokens sit at positions
  0, 1, ... and spell it; the rejected rest never sees the chosen one."""
  batch = pair_batch(6, max_len=48, padding_side="left")
  shared = shared_batch(batch, "left")
  pos_BxS, allowed_BxSxS = map(np.asarray, positions_and_mask(
      shared["shared_mask"], 0, shared["shared_parts"]))
  saw_shared_response = False
  for b in range(6):
    real = batch["mask"][b].astype(bool)
    seqs = [shared["shared_index"][b, s][real[s]] for s in (0, 1)]
    n_row = int(shared["shared_mask"][b].sum())
    assert sorted(set(seqs[0]) | set(seqs[1])) == list(range(n_row))  # nothing else in the row
    want = np.zeros((n_row, n_row), bool)
    for s, where in enumerate(seqs):
      np.testing.assert_array_equal(shared["shared_tokens"][b, where],
                                    batch["tokens"][b, s][real[s]])
      np.testing.assert_array_equal(pos_BxS[b, where], np.arange(len(where)))
      for i in where:
        for j in where:
          want[i, j] |= j <= i
    np.testing.assert_array_equal(allowed_BxSxS[b, :n_row, :n_row], want)
    common = len(set(seqs[0]) & set(seqs[1]))
    saw_shared_response |= common > int((batch["response"][b, 0] == 0)[real[0]].sum())
  assert saw_shared_response  # the synthetic pairs share response tokens too: written once
  assert shared["shared_mask"].sum() < batch["mask"].sum()  # fewer tokens


def objective_and_grads(config, batch, terms):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    graphdef, state = train_state.create_state(config)
    model, _ = train_state.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    fn = lambda p: objective.objective(nnx.merge(model_def, p, rest), batch, jax.random.key(5),
                                       terms)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


@pytest.mark.parametrize("variant, padding, remat, sparse", [
    ("paper", "left", "full", True), ("infonce", "right", "none", True),
    ("bt", "right", "none", True), ("paper", "right", "none", False)])
def test_shared_and_packed_give_the_pairs_loss_metrics_and_gradients(variant, padding, remat,
                                                                     sparse):
  config = tiny_config(variant)
  config.model.remat = remat
  terms = objective.build_terms(config.loss)
  terms = dataclasses.replace(terms, sparse=sparse and terms.sparse)
  pairs = pair_batch(8, max_len=config.data.max_len, padding_side=padding)
  (loss_p, metrics_p), grads_p = objective_and_grads(config, pairs, terms)
  for layout in (shared_batch(pairs, padding), packed_batch(pairs, padding, shards=2)):
    (loss, metrics), grads = objective_and_grads(config, layout, terms)
    np.testing.assert_allclose(loss, loss_p, rtol=1e-5)
    assert set(metrics) == set(metrics_p)
    for k in metrics_p:  # atol: reward_margin is a small difference of rewards (cancellation)
      np.testing.assert_allclose(metrics[k], metrics_p[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert_tree_close(grads, grads_p, rtol=1e-4)  # float32 rounding, not a wrong row


def test_shared_and_packed_states_and_rewards_equal_the_pairs_ones():
  """The dense outputs: rewards and every real token's state, in the per-sequence coordinates."""
  config = tiny_config("paper")
  pairs = pair_batch(8, max_len=config.data.max_len, padding_side="left")
  with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    model, _ = train_state.merge(*train_state.create_state(config))
    out_p, *outs = (objective.forward_pairs(model, b) for b in (
        pairs, shared_batch(pairs, "left"), packed_batch(pairs, "left", shards=2)))
  real = pairs["mask"].astype(bool)
  for out in outs:
    assert_tree_close((out.reward_chosen_B, out.reward_rejected_B),
                      (out_p.reward_chosen_B, out_p.reward_rejected_B), rtol=1e-5)
    assert_tree_close((np.asarray(out.h_chosen_BxLxD)[real[:, 0]],
                       np.asarray(out.h_rejected_BxLxD)[real[:, 1]]),
                      (np.asarray(out_p.h_chosen_BxLxD)[real[:, 0]],
                       np.asarray(out_p.h_rejected_BxLxD)[real[:, 1]]), rtol=1e-5)


def test_train_step_with_accumulation_on_8_devices_is_the_same():
  """The whole step (2 micro-batches, batch sharded over 8 devices): same metrics and update."""
  config = tiny_config("paper", accum_steps=2, batch_size=16)
  mesh = sharding.make_mesh((8, 1, 1), jax.devices()[:8])
  pairs = pair_batch(16, max_len=config.data.max_len)
  results = []
  with sharding.use_mesh(mesh):
    for batch in (pairs, shared_batch(pairs, "right")):
      graphdef, state = train_state.create_state(config, mesh)
      step = train.jit_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
      state, metrics = step(state, sharding.host_to_global(batch, mesh))
      results.append(jax.device_get((nnx.to_pure_dict(state), metrics)))
  for k in results[0][1]:
    np.testing.assert_allclose(results[1][1][k], results[0][1][k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  assert_tree_close(results[1][0], results[0][0], rtol=1e-5)


def test_one_training_step_gives_the_golden_values(mesh1):
  """tests/test_golden.py's step and pairs, laid out as shared-prompt rows."""
  config = tiny_config("paper")
  graphdef, state = train_state.create_state(config)
  step = jax.jit(train.make_train_step(graphdef, objective.build_terms(config.loss),
                                       accum_steps=1, seed=0))
  batch = shared_batch(pair_batch(8, max_len=config.data.max_len, split="train"), "right")
  _, metrics = step(state, sharding.host_to_global(batch, mesh1))
  for k, want in GOLDEN["paper"].items():
    assert float(metrics[k]) == pytest.approx(want, rel=1e-4), k


def test_pipeline_gives_the_same_pairs_and_resumes_exactly():
  """Either layout: the same pairs in each sort window (in the same batches without sorting);
  sorted on the shared rows' lengths, trimmed to a bucket or a sum of two; the iterator state
  restores the exact next batch."""
  src, tok = SyntheticMath(64, split="validation"), ByteTokenizer()
  make = lambda layout, window: iter(train_dataset(
      src, tok, global_batch_size=4, max_len=48, seed=3, buckets=(16, 32), sort_window=window,
      layout=layout))
  pairs, shared = make("pairs", 1), make("shared_prompt", 1)
  for _ in range(2):
    p, s = next(pairs), next(shared)
    for k, v in p.items():
      np.testing.assert_array_equal(s[k], v, err_msg=k)
  pairs, shared = make("pairs", 4), make("shared_prompt", 4)
  window = lambda it: [next(it) for _ in range(4)]
  real = lambda batches: sorted(b["tokens"][i, k][b["mask"][i, k] == 1].tobytes()
                                for b in batches for i in range(4) for k in (0, 1))
  p, s = window(pairs), window(shared)
  assert real(s) == real(p)
  ranges = sorted((b["shared_mask"].sum(-1).min(), b["shared_mask"].sum(-1).max()) for b in s)
  assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))  # sorted, then cut
  for b in s:
    width, longest = b["shared_tokens"].shape[1], b["shared_mask"].sum(-1).max()
    assert width in (16, 32, 48, 64, 80, 96) and longest <= width < longest + 16
  state = shared.get_state()
  want = next(shared)
  resumed = make("shared_prompt", 4)
  resumed.set_state(state)
  got = next(resumed)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_unknown_layout_is_an_error():
  with pytest.raises(ValueError, match="data.layout='rows'"):
    train_dataset(SyntheticMath(8), ByteTokenizer(), global_batch_size=4, max_len=48, seed=0,
                  layout="rows")


@pytest.mark.parametrize("layout", ["pairs", "shared_prompt", "packed"])
def test_memory_planning_compiles_the_batch_the_pipeline_gives(layout):
  """``memory.abstract_batch`` (what ``rmjax.main``'s memory check and ``rmjax.aot`` compile) has
  the pipeline's fields and dtypes in every layout, each at least as long as any batch."""
  from rmjax import memory
  config = tiny_config("paper")
  config.data.layout = layout
  config.data.max_len, config.train.batch_size = 48, 4
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  planned = memory.abstract_batch(config, mesh)
  batches = iter(train_dataset(SyntheticMath(64, split="validation"), ByteTokenizer(),
                               global_batch_size=4, max_len=48, seed=0, layout=layout))
  for _ in range(4):
    batch = next(batches)
    assert set(batch) == set(planned)
    for k, v in batch.items():
      assert v.dtype == planned[k].dtype and v.ndim == len(planned[k].shape), k
      assert all(a <= b for a, b in zip(v.shape, planned[k].shape)), (k, v.shape)
