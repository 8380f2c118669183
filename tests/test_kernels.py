"""Attention kernels (rmjax.models.attention): TPU splash attention against XLA attention.

On this CPU splash's Pallas kernels run in the Pallas interpreter (``attention.INTERPRET``): its
outputs and gradients under both layouts' masks equal XLA attention under
``llama.positions_and_mask``'s. Compiled for a TPU topology (libtpu, as ``rmjax.aot``), the
trainer's step holds the Mosaic kernel, so 'splash' is not silently the XLA path.
"""
import dataclasses
import functools
import importlib.util
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from rmjax import aot, memory
from rmjax.models import attention
from rmjax.models.llama import Llama, LlamaConfig, positions_and_mask
from tests.helpers import assert_tree_close, pair_batch

CFG = LlamaConfig(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setattr(attention, "INTERPRET", True)


def row_masks(l: int):
  """Segment ids and parts of three rows of length ``l``: a right-padded shared-prompt row with
  three responses (best-of-N scoring's rows), two packed shared-prompt units, and a left-padded
  row whose parts are all 0 (a plain sequence)."""
  seg = np.zeros((3, l), np.int32)
  parts = np.zeros((3, l), np.int32)
  seg[0, :l - 7] = 1
  parts[0, 9:l - 30], parts[0, l - 30:l - 20], parts[0, l - 20:l - 7] = 1, 2, 3
  seg[1, :l // 2], seg[1, l // 2:l - 1] = 1, 2
  parts[1, 5:20], parts[1, 20:l // 2] = 1, 2
  parts[1, l // 2 + 3:l // 2 + 9], parts[1, l // 2 + 9:l - 1] = 1, 2
  seg[2, 11:] = 1
  return jnp.asarray(seg), jnp.asarray(parts)


def xla_reference(q, k, v, seg, parts, window):
  _, mask_BxLxL = positions_and_mask(seg, window, parts)
  return jax.nn.dot_product_attention(q, k, v, mask=mask_BxLxL[:, None], scale=0.3)


@pytest.mark.parametrize("layout,window", [("pairs", 37), ("shared_prompt", 0)])
def test_splash_equals_xla_attention_values_and_gradients(interpret, layout, window):
  """Outputs and q/k/v gradients at every position (pads included: a pad sees itself only);
  ``l`` = 300 is padded to 384 = three 128-blocks, so blocks are skipped and partly masked.
  Pairs with a sliding window (the causal mask without one: the model test below)."""
  l, n, k, h = 300, 4, 2, 16
  rng = np.random.default_rng(0)
  q, kk, v, cot = (rng.normal(size=(3, l, heads, h)).astype(np.float32) for heads in (n, k, k, n))
  seg, parts = row_masks(l)
  parts = parts if layout == "shared_prompt" else None

  def out_and_grads(fn):  # one compile: outputs, and the q/k/v gradients of <out, cot>
    out, vjp = jax.vjp(fn, q, kk, v)
    return out, vjp(cot)

  splash = lambda q, kk, v: attention.splash(q, kk, v, seg, parts, 0.3, window)
  xla = lambda q, kk, v: xla_reference(q, kk, v, seg, parts, window)
  assert_tree_close(jax.jit(out_and_grads, static_argnums=0)(splash),
                    jax.jit(out_and_grads, static_argnums=0)(xla), rtol=1e-5)


def test_splash_model_equals_xla_model(interpret, mesh1):
  """The backbone with 'splash' == with 'xla' (same weights) at the sparse last block's rows, on
  shared-prompt rows: the blocks before the last scanned, splash's two calls merged; the last
  block's rows XLA's in both. (Rows without parts take the same path with one call.)"""
  cfg = dataclasses.replace(CFG, num_layers=3, scan_layers=True)
  xla = Llama(cfg, rngs=nnx.Rngs(0))
  splash = Llama(dataclasses.replace(cfg, attention="splash"), rngs=nnx.Rngs(0))
  seg, parts = row_masks(48)
  tokens = jnp.asarray(pair_batch(3, max_len=48)["tokens"][:, 0])
  rows = jnp.asarray([[3, 17, 30, 40, 47]] * 3)
  run = nnx.jit(lambda model: model(tokens, seg, rows, parts_BxL=parts))
  assert_tree_close(run(splash), run(xla), rtol=1e-5)


def test_splash_with_parts_and_a_window_runs_xla_and_says_so(caplog):
  """Shared-prompt rows with a sliding window: XLA attention (no TPU needed), one log line."""
  seg, parts = row_masks(48)
  q = np.random.default_rng(0).normal(size=(3, 48, 4, 8)).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(cfg, q):
    _, mask_BxLxL = positions_and_mask(seg, 8, parts)
    mask = attention.layer_masks(cfg, (mask_BxLxL,), seg, parts)[0]
    return attention.attend(cfg, q, q[:, :, :2], q[:, :, 2:], mask)

  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    got = run(dataclasses.replace(CFG, sliding_window=8, attention="splash"), q)
  assert "model.sliding_window run on XLA attention" in caplog.text
  np.testing.assert_array_equal(got, run(dataclasses.replace(CFG, sliding_window=8), q))


def test_splash_is_refused_where_it_cannot_run():
  with pytest.raises(ValueError, match="model.attention='splash' has no attention soft-capping"):
    LlamaConfig(**{**CFG.__dict__, "attention": "splash", "attn_softcap": 50.0})
  with pytest.raises(ValueError, match="model.sliding_layers=.0,."):
    LlamaConfig(**{**CFG.__dict__, "attention": "splash", "sliding_window": 8,
                   "sliding_layers": (0,)})
  with pytest.raises(ValueError, match="expected one of 'xla', 'cudnn', 'splash'"):
    LlamaConfig(**{**CFG.__dict__, "attention": "flash"})
  x = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="model.attention='splash' runs on TPUs only.*'cpu'"):
    attention.splash(x, x, x, jnp.ones((1, 8), jnp.int32), None, 1.0)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason=f"libtpu not installed: {aot.INSTALL}")
@pytest.mark.parametrize("layout", [pytest.param("pairs", marks=pytest.mark.slow),
                                    "shared_prompt"])
def test_splash_train_step_compiles_for_tpu_with_the_pallas_kernel(layout):
  """The trainer's step (rmjax.memory.compile_step, as rmjax.aot) for 4 v5e chips: splash's
  Mosaic custom calls are in the optimised HLO (block 0; the sparse last block is XLA's)."""
  config = synthetic.get_config("paper,tiny")
  with config.unlocked():
    config.mesh.shape = (1, 4, 1)
    config.data.layout = layout
    config.model.update(num_layers=2, head_dim=64, dtype="bfloat16", attention="splash")
  _, _, devices = aot.topology_devices("v5e:2x2")
  mesh, _ = aot.mesh_for(config, devices, 1)
  text = memory.compile_step(config, mesh).as_text()
  calls = text.count('custom_call_target="tpu_custom_call"')
  # forward, and the backward's dkv and dq kernels, for each call (two with parts)
  assert calls >= (6 if layout == "shared_prompt" else 3), calls
