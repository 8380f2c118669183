"""Decoder in Flax NNX: Llama, Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm), Gemma 2, SmolLM2.

# B: batch, L: sequence length, D: model dim, N: query heads, K: kv heads, H: head dim, F: mlp dim

One backbone; the families differ by ``LlamaConfig`` switches (``rmjax.models.layers``). Numerics
follow Hugging Face ``transformers``, so imported checkpoints reproduce its hidden states.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from rmjax.indexing import gather_rows
from rmjax.models import attention
# DTYPES, RUN_ONLY_FIELDS and LlamaConfig are imported from here too
from rmjax.models.layers import (DTYPES, MLP_ACTIVATIONS, REMAT_POLICIES,  # noqa: F401
                                 RUN_ONLY_FIELDS, LlamaConfig, linear, rmsnorm, rope,
                                 rope_frequencies)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.hd
    self.q = linear(cfg, cfg.dim, n * h, ("embed", "heads"), rngs, bias=cfg.qkv_bias)
    self.k = linear(cfg, cfg.dim, k * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.v = linear(cfg, cfg.dim, k * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.o = linear(cfg, n * h, cfg.dim, ("heads", "embed"), rngs)
    if cfg.qk_norm:
      self.q_norm, self.k_norm = rmsnorm(cfg, h, rngs), rmsnorm(cfg, h, rngs)

  def __call__(self, x_BxLxD, pos_BxL, mask, rows_BxP=None):
    """Self-attention; with ``rows`` only those query rows are computed (output [B, P, D]),
    while keys and values still come from every position. ``mask``: [B, L, L], or for
    'splash' an ``attention.SegmentMask`` (``attention.layer_masks``)."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    inv_freq = rope_frequencies(cfg)
    xq, pos_q = x_BxLxD, pos_BxL
    if rows_BxP is not None:
      xq, pos_q = gather_rows(x_BxLxD, rows_BxP), jnp.take_along_axis(pos_BxL, rows_BxP, axis=1)
    p = xq.shape[1]
    q_BxPxNxH = self.q(xq).reshape(b, p, cfg.num_heads, cfg.hd)
    k_BxLxKxH = self.k(x_BxLxD).reshape(b, l, cfg.num_kv_heads, cfg.hd)
    if cfg.qk_norm:  # per head, before RoPE (Qwen3)
      q_BxPxNxH = self.q_norm(q_BxPxNxH).astype(q_BxPxNxH.dtype)
      k_BxLxKxH = self.k_norm(k_BxLxKxH).astype(k_BxLxKxH.dtype)
    q_BxPxNxH = rope(q_BxPxNxH, pos_q, inv_freq)
    k_BxLxKxH = rope(k_BxLxKxH, pos_BxL, inv_freq)
    v_BxLxKxH = self.v(x_BxLxD).reshape(b, l, cfg.num_kv_heads, cfg.hd)
    out_BxPxNxH = attention.attend(cfg, q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask, rows_BxP)
    return self.o(out_BxPxNxH.reshape(b, p, cfg.num_heads * cfg.hd))


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate = linear(cfg, cfg.dim, cfg.mlp_dim, ("embed", "mlp"), rngs)
    self.up = linear(cfg, cfg.dim, cfg.mlp_dim, ("embed", "mlp"), rngs)
    self.down = linear(cfg, cfg.mlp_dim, cfg.dim, ("mlp", "embed"), rngs)
    self.act = MLP_ACTIVATIONS[cfg.mlp_act]

  def __call__(self, x_BxLxD):
    return self.down(self.act(self.gate(x_BxLxD)) * self.up(x_BxLxD))


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = rmsnorm(cfg, cfg.dim, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = rmsnorm(cfg, cfg.dim, rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.sandwich_norms:  # Gemma 2: HF's post_attention_ and post_feedforward_layernorm
      self.post_attn_norm = rmsnorm(cfg, cfg.dim, rngs)
      self.post_mlp_norm = rmsnorm(cfg, cfg.dim, rngs)
    self.sandwich = cfg.sandwich_norms
    self.dtype = DTYPES[cfg.dtype]
    self.remat = cfg.remat

  def __call__(self, x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP=None):
    """The block's output at every position, or only at ``rows`` ([B, P, D])."""
    if self.remat == "none":
      return self.forward(x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP)
    forward = nnx.remat(Block.forward, policy=REMAT_POLICIES[self.remat])
    return forward(self, x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP)

  def forward(self, x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP=None):
    h_BxLxD = self.attn_norm(x_BxLxD).astype(self.dtype)
    x_BxPxD = x_BxLxD if rows_BxP is None else gather_rows(x_BxLxD, rows_BxP)
    a_BxPxD = self.attn(h_BxLxD, pos_BxL, mask_BxLxL, rows_BxP)
    if self.sandwich:
      a_BxPxD = self.post_attn_norm(a_BxPxD).astype(self.dtype)
    x_BxPxD = x_BxPxD + a_BxPxD
    m_BxPxD = self.mlp(self.mlp_norm(x_BxPxD).astype(self.dtype))
    if self.sandwich:
      m_BxPxD = self.post_mlp_norm(m_BxPxD).astype(self.dtype)
    return x_BxPxD + m_BxPxD


def jitted_init(factory, cfg: LlamaConfig):
  """``factory(cfg, rngs=rngs)`` as one jitted function per (factory, config, logical axis rules,
  mesh). Inside a traced init it is inlined and changes nothing; called eagerly
  (``rmjax.train_state.create_state``), a model's identical blocks share one compiled init instead of
  compiling every parameter's random-number kernels, which is slow for deep models (timings:
  docs/performance.md, Initialisation).
  Same numbers either way."""
  # the parameters' shardings come from the active rules and mesh: both are part of the key
  return _jitted_init(factory, cfg, _frozen(flax_spmd.get_logical_axis_rules()),
                      jax.sharding.get_abstract_mesh())


def _frozen(x):
  """Lists (rules read back from JSON) as tuples, all the way down: hashable."""
  return tuple(map(_frozen, x)) if isinstance(x, (list, tuple)) else x


@functools.lru_cache(maxsize=None)
def _jitted_init(factory, cfg: LlamaConfig, rules, mesh):
  del rules, mesh  # cache key only
  return nnx.jit(lambda rngs: factory(cfg, rngs=rngs))


def positions_and_mask(mask_BxL: jax.Array, sliding_window: int = 0,
                       parts_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """RoPE positions and the attention mask of a batch's rows.

  ``mask_BxL``: 0 on padding, else the token's segment id (1 for every real token of an ordinary
  row; a packed row numbers its sequences 1, 2, ...). ``parts_BxL`` (optional): 0 on what a
  segment shares (a prompt), ``k > 0`` on its part ``k`` (a response). A token attends to the
  earlier tokens of its segment that are shared or of its own part, so two responses written
  after one prompt never see each other.

  A token's position is the number of tokens it attends to, minus one: real tokens counted from
  the start of their segment, a response continuing from its prompt's end, a left-padded row
  seeing its right-padded twin's positions. A pad query attends to itself only (its output is
  never read). With ``sliding_window`` > 0 a query sees only keys less than that many positions
  back (Mistral).
  """
  seg_BxL = mask_BxL.astype(jnp.int32)
  l = seg_BxL.shape[1]
  idx = jnp.arange(l)
  causal_LxL = idx[:, None] >= idx[None, :]
  allowed_BxLxL = (causal_LxL[None] & (seg_BxL[:, :, None] == seg_BxL[:, None, :])
                   & (seg_BxL[:, None, :] != 0))
  if parts_BxL is not None:
    allowed_BxLxL &= ((parts_BxL[:, None, :] == 0)
                      | (parts_BxL[:, None, :] == parts_BxL[:, :, None]))
  pos_BxL = jnp.maximum(allowed_BxLxL.sum(axis=-1) - 1, 0).astype(jnp.float32)
  if sliding_window:
    allowed_BxLxL = window_mask(pos_BxL, allowed_BxLxL, sliding_window)
  allowed_BxLxL |= (seg_BxL == 0)[:, :, None] & jnp.eye(l, dtype=bool)[None]
  return pos_BxL, allowed_BxLxL


def window_mask(pos_BxL: jax.Array, allowed_BxLxL: jax.Array, sliding_window: int) -> jax.Array:
  """``allowed`` narrowed to keys less than ``sliding_window`` positions back. On the output of
  ``positions_and_mask(mask, 0, parts)`` it gives ``positions_and_mask(mask, sliding_window,
  parts)``'s mask (a pad query's own key is 0 positions back)."""
  return allowed_BxLxL & (pos_BxL[:, :, None] - pos_BxL[:, None, :] < sliding_window)


def _batch_sharded(x: jax.Array) -> jax.Array:
  """``x`` constrained to the batch sharding of the active logical rules (leading dimension:
  logical ``batch``); unchanged without a mesh or a ``batch`` rule."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  spec = flax_spmd.apply_rules(P("batch", *(None,) * (x.ndim - 1)), None)
  if spec[0] == "batch":  # no rule for it
    return x
  return jax.lax.with_sharding_constraint(x, spec)


class Llama(nnx.Module):
  """Decoder backbone: tokens -> final-norm hidden states ``h_BxLxD`` (the 'last layer')."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=DTYPES[cfg.dtype],
                           param_dtype=DTYPES[cfg.param_dtype],
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                                ("vocab", "embed")),
                           rngs=rngs)
    self.layers = nnx.List([jitted_init(Block, cfg)(rngs) for _ in range(cfg.num_layers)])
    self.final_norm = rmsnorm(cfg, cfg.dim, rngs)

  def __call__(self, tokens_BxL: jax.Array, mask_BxL: jax.Array, rows_BxP=None, *,
               parts_BxL=None) -> jax.Array:
    """Final-norm states; ``mask`` and ``parts`` as in ``positions_and_mask``."""
    return self.run_from(self._embed(tokens_BxL), mask_BxL, 0, rows_BxP, parts_BxL=parts_BxL)

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.embed_scale:  # HF: sqrt(dim) as a float32 tensor cast to the weights' dtype
      x_BxLxD = x_BxLxD * jnp.asarray(np.float32(self.cfg.dim ** 0.5), x_BxLxD.dtype)
    return x_BxLxD

  def _masks(self, mask_BxL: jax.Array, parts_BxL) -> tuple[jax.Array, tuple]:
    """Positions and the masks ``(full, windowed)`` (one array twice without a window); block
    ``i`` reads ``masks[cfg.windowed(i)]``."""
    window = self.cfg.sliding_window
    if not window or self.cfg.sliding_layers is None:  # one mask for every layer
      pos_BxL, mask_BxLxL = positions_and_mask(mask_BxL, window, parts_BxL)
      masks = (mask_BxLxL, mask_BxLxL)
    else:
      pos_BxL, full_BxLxL = positions_and_mask(mask_BxL, 0, parts_BxL)
      masks = (full_BxLxL, window_mask(pos_BxL, full_BxLxL, window))
    return pos_BxL, attention.layer_masks(self.cfg, masks, mask_BxL, parts_BxL)

  def run_from(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, layer: int, rows_BxP=None, *,
               parts_BxL=None) -> jax.Array:
    """Blocks ``layer``.. and the final norm, on ``x`` = the hidden states entering ``layer``.

    ``rows``: return only the states at these positions, [B, P, D]. The last block then computes
    its queries, MLP and norm at those rows alone (its keys and values still read every
    position) — all a loss that reads a few states needs, and the same numbers.
    """
    pos_BxL, masks = self._masks(mask_BxL, parts_BxL)
    blocks = list(self.layers[layer:])
    last = blocks.pop() if rows_BxP is not None else None
    x_BxLxD = self._blocks(layer, blocks, x_BxLxD, pos_BxL, masks)
    if last is not None:
      n = self.cfg.num_layers - 1
      x_BxLxD = last(x_BxLxD, pos_BxL, masks[self.cfg.windowed(n)], rows_BxP)
    return self.final_norm(x_BxLxD)

  def _blocks(self, start, blocks, x_BxLxD, pos_BxL, masks):
    """``blocks`` (layers ``start``, ``start + 1``, ...) in turn, each with its mask."""
    windowed = [self.cfg.windowed(i) for i in range(start, start + len(blocks))]
    if not self.cfg.scan_layers or len(blocks) < 2:
      for block, w in zip(blocks, windowed):
        x_BxLxD = block(x_BxLxD, pos_BxL, masks[w])
      return x_BxLxD
    graphdef, first = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), first, *(nnx.state(b) for b in blocks[1:]))

    def body(x_BxLxD, xs):
      state, w = xs
      # one mask for all, or the layer's flag picks between the two (Gemma 2's alternation)
      mask_BxLxL = masks[windowed[0]] if len(set(windowed)) == 1 else jnp.where(w, *masks[::-1])
      # Nothing else pins the activations inside the loop: without this, XLA's partitioner keeps
      # the FSDP-sharded weights in place and shards the activations on D instead, so every chip
      # holds the whole batch's [B, L, F] MLP activations and all-reduces them.
      x_BxLxD = _batch_sharded(x_BxLxD)
      return _batch_sharded(nnx.merge(graphdef, state)(x_BxLxD, pos_BxL, mask_BxLxL)), None

    return jax.lax.scan(body, x_BxLxD, (stacked, jnp.asarray(windowed)))[0]

  def features(self, tokens_BxL: jax.Array, mask_BxL: jax.Array, layer: int, *,
               parts_BxL=None) -> jax.Array:
    """The hidden states entering block ``layer``; ``layer = num_layers``: the final-norm output
    (the last layer). ``run_from(features(t, m, k), m, k)`` equals ``self(t, m)``."""
    if layer == self.cfg.num_layers:
      return self(tokens_BxL, mask_BxL, parts_BxL=parts_BxL)
    pos_BxL, masks = self._masks(mask_BxL, parts_BxL)
    return self._blocks(0, list(self.layers[:layer]), self._embed(tokens_BxL), pos_BxL, masks)
