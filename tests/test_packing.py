"""data.layout='packed' (several pairs' shared-prompt rows in one row) against 'pairs'."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rmjax import objective, sharding, train, train_state
from rmjax.data import packing
from rmjax.data.pipeline import train_dataset
from rmjax.data.synthetic import SyntheticMath
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.models.llama import positions_and_mask
from tests.helpers import assert_tree_close, pair_batch, tiny_config
from tests.test_layouts import objective_and_grads, packed_batch, shared_batch


def test_packed_rows_attend_like_separate_sequences():
  """Naive reference: every pair's two sequences are spelled in its group's rows at
  ``packed_index``, at positions 0, 1, ...; a token attends to exactly the earlier tokens of its
  own sequences; rows hold several pairs."""
  batch = pair_batch(12, max_len=48, padding_side="left")
  packed = packed_batch(batch, "left", shards=2, accum_steps=2)
  tokens_GxRxS = packed["packed_tokens"]
  g, r, s = tokens_GxRxS.shape
  pos, allowed = map(np.asarray, positions_and_mask(
      packed["packed_mask"].reshape(g * r, s), 0, packed["packed_parts"].reshape(g * r, s)))
  pos, allowed = pos.reshape(g, r * s), allowed.reshape(g, r, s, s)
  groups = packing.pair_groups(12, 2, 2)
  want = np.zeros((g, r, s, s), bool)
  for b in range(12):
    real = batch["mask"][b].astype(bool)
    for side in (0, 1):
      where = packed["packed_index"][b, side][real[side]]
      np.testing.assert_array_equal(tokens_GxRxS[groups[b]].reshape(-1)[where],
                                    batch["tokens"][b, side][real[side]])
      np.testing.assert_array_equal(pos[groups[b], where], np.arange(len(where)))
      row, at = np.divmod(where, s)
      assert len(set(row)) == 1  # a pair lies in one row
      want[groups[b], row[0]][np.ix_(at, at)] |= np.tril(np.ones((len(at), len(at)), bool))
  real_rows = packed["packed_mask"] > 0
  np.testing.assert_array_equal(allowed & real_rows[..., None], want)
  assert (packed["packed_mask"].max(-1) >= 2).any()  # some row holds two pairs or more
  assert real_rows.sum() == shared_batch(batch, "left")["shared_mask"].sum()  # nothing twice


# loss, metrics, gradients and dense outputs against 'pairs': tests/test_layouts.py (with
# shared_prompt)


@pytest.mark.slow  # ~30 s on 2 cores; the dense outputs: tests/test_layouts.py
def test_packed_gives_the_shared_prompt_loss_and_gradients_dense():
  """Without the sparse last block (every state computed and gathered back)."""
  config = tiny_config("paper")
  terms = dataclasses.replace(objective.build_terms(config.loss), sparse=False)
  pairs = pair_batch(8, max_len=config.data.max_len)
  (loss_s, _), grads_s = objective_and_grads(config, shared_batch(pairs, "right"), terms)
  (loss_k, _), grads_k = objective_and_grads(config, packed_batch(pairs, "right"), terms)
  np.testing.assert_allclose(loss_k, loss_s, rtol=1e-5)
  assert_tree_close(grads_k, grads_s, rtol=1e-4)


def test_changing_one_pair_moves_only_its_outputs():
  """A token of one pair changes (a row-mate shares its row): its reward and states move, no
  other pair's rewards or states (dense, and the sparse path's sampled ones) do."""
  config = tiny_config("paper")
  pairs = pair_batch(8, max_len=config.data.max_len)
  packed = packed_batch(pairs, "right")
  row_of = packed["packed_slot"] // packed["packed_pairs"].shape[-1]
  victim = next(b for b in range(8) if (row_of == row_of[b]).sum() >= 2)
  real = pairs["mask"][victim].astype(bool)
  first = np.flatnonzero(pairs["tokens"][victim, 0] != pairs["tokens"][victim, 1])[0]
  assert real[0, first]  # a chosen token after the common prefix: the packing stays the same
  changed = {k: v.copy() for k, v in pairs.items()}
  changed["tokens"][victim, 0, first] = 1 + max(pairs["tokens"][victim, :, first])
  repacked = packed_batch(changed, "right")
  for k in ("packed_mask", "packed_slot", "packed_index"):
    np.testing.assert_array_equal(repacked[k], packed[k], err_msg=k)
  states_Bx2xP = np.broadcast_to(np.arange(0, 48, 3, dtype=np.int32), (8, 2, 16))
  with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
    model, _ = train_state.merge(*train_state.create_state(config))
    run = jax.jit(lambda b, states: objective.forward_pairs(model, b, 0, states))
    outs = [[jax.device_get(run(b, states)) for b in (packed, repacked)]
            for states in (None, states_Bx2xP)]
  others = np.arange(8) != victim
  for before, after in outs:
    for field in ("reward_chosen_B", "reward_rejected_B", "h_chosen_BxLxD", "h_rejected_BxLxD"):
      a, b = np.asarray(getattr(before, field)), np.asarray(getattr(after, field))
      assert_tree_close(b[others], a[others], rtol=1e-6)
    moved = np.abs(after.reward_chosen_B[victim] - before.reward_chosen_B[victim])
    assert moved > 1e-4 * np.abs(before.reward_chosen_B).max()
    assert np.abs(after.h_chosen_BxLxD[victim] - before.h_chosen_BxLxD[victim]).max() > 1e-3


def test_pipeline_gives_each_pair_once_and_resumes_exactly():
  """The same pairs as the other layouts in each sort window, each pair's unit once in the rows;
  the iterator state restores the exact next batch."""
  src, tok = SyntheticMath(64, split="validation"), ByteTokenizer()
  make = lambda layout: iter(train_dataset(
      src, tok, global_batch_size=8, max_len=48, seed=3, buckets=(16, 32), sort_window=4,
      layout=layout, pack_len=192, pack_shards=2, accum_steps=2))
  real = lambda batches: sorted(b["tokens"][i, k][b["mask"][i, k] == 1].tobytes()
                                for b in batches for i in range(8) for k in (0, 1))
  pairs, shared, packed = make("pairs"), make("shared_prompt"), make("packed")
  for _ in range(2):  # an epoch: 64 pairs in two windows of 4 batches
    p, s, k = ([next(it) for _ in range(4)] for it in (pairs, shared, packed))
    assert real(k) == real(p)
    for bs, bk in zip(s, k):  # the same batches as shared_prompt, packed
      np.testing.assert_array_equal(bk["tokens"], bs["tokens"])
      g = packing.pair_groups(8, 2, 2)
      slots = bk["packed_pairs"].reshape(4, -1)
      for group in range(4):  # every pair of the group in exactly one slot
        assert sorted(slots[group][slots[group] >= 0]) == list(range(2))
      assert (bk["packed_mask"] > 0).sum() == bs["shared_mask"].sum()
      np.testing.assert_array_equal(
          slots[g, bk["packed_slot"]], np.tile(np.arange(2).repeat(2), 2))
  state = packed.get_state()
  want = next(packed)
  resumed = make("packed")
  resumed.set_state(state)
  got = next(resumed)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_batch_that_does_not_split_into_groups_names_the_fields():
  with pytest.raises(ValueError, match="train.accum_steps=3"):
    train_dataset(SyntheticMath(8), ByteTokenizer(), global_batch_size=8, max_len=48, seed=0,
                  layout="packed", pack_shards=2, accum_steps=3)


@pytest.mark.slow  # two train steps with accumulation compiled: ~60 s on 2 cores
def test_packed_train_step_on_8_devices_gives_the_one_device_step():
  """The step with accumulation (2 micro-batches) on a packed batch sharded over 8 devices: the
  metrics and update of the pairs layout on one device; the gathers from rows to pairs stay on
  their devices (no all-gather in the compiled step)."""
  config = tiny_config("paper", accum_steps=2, batch_size=32)
  pairs = pair_batch(32, max_len=config.data.max_len)
  results = []
  for batch, n_devices in ((pairs, 1), (packed_batch(pairs, "right", 8, 2), 8)):
    mesh = sharding.make_mesh((n_devices, 1, 1), jax.devices()[:n_devices])
    with sharding.use_mesh(mesh):
      graphdef, state = train_state.create_state(config, mesh)
      step = train.jit_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
      batch = sharding.host_to_global(batch, mesh)
      hlo = step.lower(state, batch).compile().as_text()
      state, metrics = step(state, batch)
      results.append(jax.device_get((nnx.to_pure_dict(state), metrics)))
  assert "all-gather" not in hlo
  for k in results[0][1]:
    np.testing.assert_allclose(results[1][1][k], results[0][1][k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  assert_tree_close(results[1][0], results[0][0], rtol=1e-5)
