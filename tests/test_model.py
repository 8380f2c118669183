"""Reward model: causality, padding-side invariance, last-token reward, head init."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

import pytest

from rmjax.models import LlamaConfig, RewardModel, last_token_index
from tests.helpers import pair_batch

pytestmark = pytest.mark.usefixtures("mesh1")

CFG = LlamaConfig(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def model(cfg=CFG, seed=0):
  return RewardModel(cfg, rngs=nnx.Rngs(seed))


def test_last_token_index_right_left_and_no_padding():
  mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(last_token_index(mask), [2, 4, 4])


def test_causality_later_tokens_never_change_earlier_states():
  m = model()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, size=(2, 16))
  mask = np.ones((2, 16), np.int32)
  _, h = m(tokens, mask)
  changed = tokens.copy()
  changed[:, 9:] = rng.integers(1, 256, size=(2, 7))
  _, h2 = m(changed, mask)
  np.testing.assert_array_equal(h[:, :9], h2[:, :9])
  assert not np.allclose(h[:, 9:], h2[:, 9:])


def test_rewards_do_not_depend_on_padding_side():
  m = model()
  right, left = pair_batch(6, padding_side="right"), pair_batch(6, padding_side="left")
  r_right, h_right = m(right["tokens"][:, 0], right["mask"][:, 0])
  r_left, h_left = m(left["tokens"][:, 0], left["mask"][:, 0])
  np.testing.assert_allclose(r_right, r_left, atol=1e-5)
  # the real tokens' hidden states agree too
  for i in range(6):
    n = right["mask"][i, 0].sum()
    np.testing.assert_allclose(h_right[i, :n], h_left[i, -n:], atol=1e-5)


def test_reward_reads_the_last_real_token_and_ignores_padding():
  m = model()
  b = pair_batch(4)
  tokens, mask = b["tokens"][:, 0], b["mask"][:, 0]
  r, h = m(tokens, mask)
  last = mask.sum(1) - 1
  want = (np.asarray(h, np.float64)[np.arange(4), last]
          @ np.asarray(m.head.kernel[...], np.float64)[:, 0])
  # relative to the rewards' norm (one may be near 0): fp32 rounding 1e-7, another token's O(1)
  assert np.linalg.norm(r - want) <= 1e-5 * np.linalg.norm(want)
  garbage = np.where(mask == 1, tokens, 77)  # different pad ids: nothing changes
  np.testing.assert_allclose(m(garbage, mask)[0], r, rtol=1e-6)


def test_head_init_is_normal_with_std_one_over_d_plus_1():
  cfg = LlamaConfig(vocab_size=256, dim=255, num_layers=1, num_heads=3, num_kv_heads=1,
                    mlp_dim=32)
  w = np.concatenate([np.asarray(model(cfg, seed).head.kernel[...]) for seed in range(8)])
  assert w.shape == (8 * 255, 1)
  sigma, n = 1 / 256, w.size  # N(0, std=1/(D+1))
  z = w[:, 0].astype(np.float64) / sigma
  # sum z^2 ~ chi2(n), sum z ~ N(0, n): bounds a correct init breaks with probability 1e-6;
  # they hold std within ~5% (n = 2040), far from e.g. 1/sqrt(D) or 1/D^2
  assert stats.chi2.ppf(5e-7, n) < np.sum(z ** 2) < stats.chi2.isf(5e-7, n), w.std() / sigma
  assert abs(z.sum()) / np.sqrt(n) < stats.norm.isf(5e-7)


def test_bf16_compute_rounds_states_like_bf16_and_keeps_rewards_fp32():
  bf = LlamaConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  b = pair_batch(8)
  tokens, mask = b["tokens"].reshape(16, -1), b["mask"].reshape(16, -1)
  r32, h32 = model()(tokens, mask)
  r16, h16 = model(bf)(tokens, mask)
  assert h16.dtype == r16.dtype == jnp.float32  # states handed to the losses are fp32
  real = mask.astype(bool)
  h32, h16 = np.asarray(h32, np.float64)[real], np.asarray(h16, np.float64)[real]
  # bf16's 8-bit mantissa: fp16 compute (11 bits) errs ~8x less, fp32 not at all
  err = np.linalg.norm(h16 - h32) / np.linalg.norm(h32)
  assert 2.5e-3 < err < 2e-2, err
  r32, r16 = np.asarray(r32, np.float64), np.asarray(r16, np.float64)
  # the error of small rewards (a random head) varies more from model to model
  err = np.linalg.norm(r16 - r32) / np.linalg.norm(r32)
  assert err < 0.1, err
  # the final norm and the head run in fp32: their outputs are mostly not bf16 numbers
  is_bf16 = lambda x: x == x.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)
  assert np.mean(is_bf16(h16)) < 0.5 and np.mean(is_bf16(r16)) < 0.5


def test_cudnn_attention_is_refused_where_it_cannot_run():
  """cuDNN flash attention (scripts/check_gpu.py checks it against XLA's on a GPU) needs bf16
  compute and a GPU: a config error and a clear message here, not a failure deep in JAX."""
  with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype"):
    LlamaConfig(**{**CFG.__dict__, "attention": "cudnn"})
  with pytest.raises(ValueError, match="model.attention='flash'"):
    LlamaConfig(**{**CFG.__dict__, "attention": "flash"})
  b = pair_batch(2)
  m = model(LlamaConfig(**{**CFG.__dict__, "attention": "cudnn", "dtype": "bfloat16"}))
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="NVIDIA GPUs only"):
      m(b["tokens"][:, 0], b["mask"][:, 0])


def test_gqa_matches_explicit_head_repetition():
  """K/V heads shared by groups of query heads == MHA with repeated K/V projections."""
  gqa = model()
  cfg_mha = LlamaConfig(**{**CFG.__dict__, "num_kv_heads": 4})
  mha = model(cfg_mha)
  hd = CFG.dim // CFG.num_heads
  for blk_g, blk_m in zip(gqa.backbone.layers, mha.backbone.layers):
    for name in ("k", "v"):
      w = np.asarray(getattr(blk_g.attn, name).kernel[...]).reshape(CFG.dim, 2, hd)
      getattr(blk_m.attn, name).kernel[...] = jnp.asarray(
          np.repeat(w, 2, axis=1).reshape(CFG.dim, 4 * hd))
  shared = dict(nnx.to_flat_state(nnx.state(gqa, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(mha, nnx.Param)):
    if path[-2] not in ("k", "v"):
      var[...] = shared[path][...]
  b = pair_batch(3)
  np.testing.assert_allclose(gqa(b["tokens"][:, 0], b["mask"][:, 0])[0],
                             mha(b["tokens"][:, 0], b["mask"][:, 0])[0], rtol=1e-5, atol=1e-6)
