"""The attention kernels behind ``LlamaConfig.attention``: XLA, cuDNN (NVIDIA) and splash (TPU).

# B: batch, L: sequence length, P: query rows, N: query heads, K: kv heads, H: head dim

What runs where (docs/performance.md, Attention kernels):
* ``xla`` (any backend): the [B, L, L] mask of ``llama.positions_and_mask`` on the logits. Also,
  under every setting, the sparse last block's few query rows (not a causal prefix) and Gemma 2's
  soft-capped logits.
* ``cudnn`` (NVIDIA GPUs): ``jax.nn.dot_product_attention(implementation='cudnn')``; the mask goes
  in as an additive [B, 1, L, L] bias (``is_causal`` lets cuDNN skip the upper triangle).
* ``splash`` (TPUs): Pallas splash attention, the mask expressed by segment ids, never an L x L
  array. Rows without parts (pairs, packed rows): one call, causal (or a sliding window over the
  row's index, which within a segment is its position) and equal-id segments. Rows with parts
  (the shared prompt: a token sees its segment's shared tokens and its own part), which no one
  equality of ids expresses: two calls, each token's own part, then the shared tokens for the
  parts' tokens, merged by their log-sum-exps; the backward pass runs the kernel's own backward
  against the merged output and log-sum-exp (as ring attention does). Parts with a sliding
  window run on XLA (one log line): the window counts positions, which a second part does not
  share with its row index.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from rmjax.models.layers import LlamaConfig, softcapped_attention

log = logging.getLogger(__name__)

# Run splash's Pallas kernels in the Pallas interpreter (any backend, slow): the tests' CPU check
# of the kernel's numbers. Off, 'splash' compiles for TPUs only.
INTERPRET = False


class SegmentMask(NamedTuple):
  """What 'splash' reads: the token's segment id and part (``positions_and_mask``'s inputs); the
  dense mask stays for the sparse last block."""
  dense_BxLxL: jax.Array
  seg_BxL: jax.Array
  parts_BxL: jax.Array | None


def layer_masks(cfg: LlamaConfig, masks: tuple, seg_BxL: jax.Array, parts_BxL) -> tuple:
  """The blocks' masks as ``cfg.attention`` reads them: dense, or each in a ``SegmentMask``."""
  if cfg.attention != "splash":
    return masks
  return tuple(SegmentMask(m, seg_BxL.astype(jnp.int32), parts_BxL) for m in masks)


def attend(cfg: LlamaConfig, q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask, rows_BxP=None):
  """Attention of the queries (every position, or the rows ``rows``) over every key, under
  ``mask`` (the dense [B, L, L] mask or a ``SegmentMask``), with ``cfg.attention``'s kernel."""
  segments = mask if isinstance(mask, SegmentMask) else None
  mask_BxPxL = segments.dense_BxLxL if segments else mask
  if rows_BxP is not None:
    mask_BxPxL = jnp.take_along_axis(mask_BxPxL, rows_BxP[:, :, None], axis=1)
  scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
  if cfg.attn_softcap:  # XLA only (LlamaConfig refuses the kernels with a soft cap)
    return softcapped_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxPxL,
                                scale or cfg.hd ** -0.5, cfg.attn_softcap)
  if cfg.attention == "cudnn" and rows_BxP is None:
    if jax.default_backend() != "gpu":
      raise ValueError(f"model.attention='cudnn' runs on NVIDIA GPUs only; JAX's backend here "
                       f"is {jax.default_backend()!r}: use model.attention='xla'")
    # The mask (padding, window) becomes an additive bias; is_causal lets cuDNN skip the
    # blocks above the diagonal, which the mask excludes anyway.
    return jax.nn.dot_product_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_BxPxL[:, None],
                                        scale=scale, is_causal=True, implementation="cudnn")
  if segments is not None and rows_BxP is None:
    if segments.parts_BxL is None or not cfg.sliding_window:
      return splash(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, segments.seg_BxL, segments.parts_BxL,
                    scale or cfg.hd ** -0.5, cfg.sliding_window)
    _note("model.attention='splash': rows with parts (data.layout='shared_prompt') and "
          "model.sliding_window run on XLA attention")
  # XLA; also the sparse last block's few query rows, which are not a causal prefix
  return jax.nn.dot_product_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_BxPxL[:, None],
                                      scale=scale)


@functools.lru_cache(maxsize=None)
def _note(message: str) -> None:
  log.warning(message)  # once per process


def splash(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, parts_BxL, scale: float, window: int = 0):
  """Splash attention under ``positions_and_mask(seg, window, parts)``'s mask (a pad attends to
  itself only), on the TPU the mesh in context (or JAX's backend) compiles for."""
  interpret = _interpret()
  b, l, n, _ = q_BxLxNxH.shape
  lp = -(-l // 128) * 128  # the kernel's blocks are multiples of 128: pad with tokens of their own
  pad = lambda x: jnp.pad(x, ((0, 0), (0, lp - l)) + ((0, 0),) * (x.ndim - 2))
  heads_first = lambda x: pad(x).transpose(0, 2, 1, 3)
  # splash has no scale: scaled queries, in the compute dtype (as XLA's logits are rounded)
  q_BxNxLxH = heads_first((q_BxLxNxH * jnp.asarray(scale, q_BxLxNxH.dtype)))
  k_BxKxLxH, v_BxKxLxH = heads_first(k_BxLxKxH), heads_first(v_BxLxKxH)
  seg_BxL = pad(seg_BxL)
  own_BxL = jnp.broadcast_to(-1 - jnp.arange(lp, dtype=jnp.int32)[None], (b, lp))
  if parts_BxL is None:  # one id per segment, a pad's own id
    ids = (jnp.where(seg_BxL > 0, seg_BxL, own_BxL),)
  else:
    part_BxL = pad(parts_BxL.astype(jnp.int32))
    real_BxL = seg_BxL > 0
    # call 1: each (segment, part) its own id; call 2: the parts' queries (id = segment) and the
    # shared keys (id = segment); other queries (-1) and keys (-2) match nothing
    ids = (jnp.where(real_BxL, seg_BxL * (jnp.max(part_BxL) + 1) + part_BxL, own_BxL),
           jnp.where(real_BxL & (part_BxL > 0), seg_BxL, -1),
           jnp.where(real_BxL & (part_BxL == 0), seg_BxL, -2))
  body = functools.partial(_splash_local, window=window, interpret=interpret)
  out_BxNxLxH = _on_mesh(body, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, ids)
  return out_BxNxLxH.transpose(0, 2, 1, 3)[:, :l]


def _interpret() -> bool:
  """Whether the kernels run interpreted: off a TPU target only with ``INTERPRET``."""
  platform = _platform()
  if platform == "tpu" or INTERPRET:
    return platform != "tpu"
  raise ValueError(f"model.attention='splash' runs on TPUs only (Pallas TPU kernels); this "
                   f"program is compiled for {platform!r}: use model.attention='xla' (or "
                   "'cudnn' on NVIDIA GPUs)")


def _platform() -> str:
  """The platform being compiled for: the mesh's devices (a TPU topology on a CPU host, as
  ``rmjax.aot`` compiles) or JAX's default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def _on_mesh(body, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, ids):
  """``body`` on each device's rows and heads (Pallas kernels are not partitioned by XLA): a
  shard_map over the mesh in context, batch and heads sharded by the active logical rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return body(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, *ids)
  rules = dict(flax_spmd.get_logical_axis_rules())
  batch, heads = rules.get("batch"), rules.get("heads")
  shards = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ()))
  n, k = q_BxNxLxH.shape[1], k_BxKxLxH.shape[1]
  if n % shards:  # every device of the heads axes computes all heads of its rows
    heads = None
  elif k % shards:  # kv heads repeated for their query heads: shards hold whole groups
    k_BxKxLxH, v_BxKxLxH = (jnp.repeat(x, n // k, axis=1) for x in (k_BxKxLxH, v_BxKxLxH))
  qkv, row = P(batch, heads, None, None), P(batch, None)
  return jax.shard_map(body, in_specs=(qkv, qkv, qkv) + (row,) * len(ids), out_specs=qkv,
                       check_vma=False)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, *ids)


def _splash_local(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, *ids, window: int, interpret: bool):
  """One device's splash attention: one call (ids: one array) or two merged (three arrays)."""
  spec = (q_BxNxLxH.shape[1], q_BxNxLxH.shape[2], window, interpret)
  if len(ids) == 1:
    kernel = jax.vmap(_kernel(*spec, residuals=False))
    return kernel(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, splash_lib.SegmentIds(ids[0], ids[0]))
  own_BxL, query_BxL, shared_BxL = ids
  return _two_calls(spec, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH,
                    splash_lib.SegmentIds(own_BxL, own_BxL),
                    splash_lib.SegmentIds(query_BxL, shared_BxL))


def _kernel(heads: int, length: int, window: int, interpret: bool, residuals: bool):
  """Splash attention for one row ([N, L, H] queries, [K, L, H] keys and values), causal or a
  causal window of ``window`` tokens; ``residuals``: also its log-sum-exps [N, L]."""
  shape = (length, length)
  mask = mask_lib.LocalMask(shape, (window - 1, 0), 0) if window else mask_lib.CausalMask(shape)
  b = next(s for s in (512, 256, 128) if length % s == 0)
  sizes = splash_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                                block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                                block_kv_dq=b)
  return splash_lib.make_splash_mha(mask_lib.MultiHeadMask((mask,) * heads), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, save_residuals=residuals,
                                    interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _two_calls(spec, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own, shared):
  """Attention over the union of two disjoint key sets (segment ids ``own`` and ``shared``)."""
  return _two_calls_fwd(spec, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own, shared)[0]


def _two_calls_fwd(spec, q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own, shared):
  kernel = jax.vmap(_kernel(*spec, residuals=True))
  (o1_BxNxLxH, (lse1_BxNxL,)) = kernel(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own)
  (o2_BxNxLxH, (lse2_BxNxL,)) = kernel(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, shared)
  # a query with no key in a call has a log-sum-exp near the mask value (-0.7 x float32 max):
  # its weight is 0; every query has itself in the first call
  lse_BxNxL = jnp.logaddexp(lse1_BxNxL, lse2_BxNxL)
  w1_BxNxLx1, w2_BxNxLx1 = (jnp.exp(x - lse_BxNxL)[..., None] for x in (lse1_BxNxL, lse2_BxNxL))
  o_BxNxLxH = (w1_BxNxLx1 * o1_BxNxLxH.astype(jnp.float32)
               + w2_BxNxLx1 * o2_BxNxLxH.astype(jnp.float32)).astype(q_BxNxLxH.dtype)
  return o_BxNxLxH, (q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own, shared, o_BxNxLxH, lse_BxNxL)


def _two_calls_bwd(spec, res, do_BxNxLxH):
  """Each call's backward kernel with the merged output and log-sum-exp: its probabilities are
  the merged softmax's restricted to its keys, so the two gradients add up to the merged one."""
  q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, own, shared, o_BxNxLxH, lse_BxNxL = res
  kernel = _kernel(*spec, residuals=False)
  kw = kernel.kwargs

  def backward(q, k, v, ids, o, lse, do):
    grads = splash_lib._splash_attention_bwd(  # pylint: disable=protected-access
        save_residuals=False, mask_value=kw["mask_value"], is_mqa=kw["is_mqa"],
        block_sizes=kw["block_sizes"], residual_checkpoint_name=kw["residual_checkpoint_name"],
        mask_function=kw["mask_function"], attn_logits_soft_cap=kw["attn_logits_soft_cap"],
        interpret=kw["interpret"],
        res=(q, k, v, ids, None, o, lse, kernel.dq_mask_info, kernel.dkv_mask_info), do=do)
    return grads[3:6]  # dq, dk, dv

  both = [jax.vmap(backward)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, ids, o_BxNxLxH, lse_BxNxL,
                             do_BxNxLxH) for ids in (own, shared)]
  dq, dk, dv = (a + b for a, b in zip(*both))
  return dq, dk, dv, None, None


_two_calls.defvjp(_two_calls_fwd, _two_calls_bwd)
