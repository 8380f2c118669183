"""Llama-family decoder in Flax NNX (Llama, Mistral, Qwen2-style QKV bias, SmolLM2).

# B: batch, L: sequence length, D: model dim, N: query heads, K: kv heads, H: head dim, F: mlp dim

Numerics follow Hugging Face ``transformers`` (RoPE with the rotate-half layout, RMSNorm in fp32),
so imported checkpoints reproduce its hidden states.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from rmjax.indexing import gather_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {"none": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


# LlamaConfig fields that say how the model runs, not what it computes
RUN_ONLY_FIELDS = ("remat", "scan_layers", "attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # default dim // num_heads
  mlp_dim: int = 256
  rope_theta: float = 10000.0
  # RoPE frequency scaling as in HF configs: 'default' (none), 'linear' (positions / factor) or
  # 'llama3' (low frequencies / factor, smooth in between; needs the three fields below)
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  sliding_window: int = 0  # attend to at most this many latest tokens (Mistral); 0 = unlimited
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype: float32 or bfloat16
  # per-block rematerialisation (memory for compute): 'none', 'dots_saveable' (keep matmul
  # outputs, recompute the rest in the backward pass) or 'full' (keep only each block's input)
  remat: str = "none"
  # run the blocks as one jax.lax.scan (one block in the compiled program instead of
  # num_layers); the weights stay per block and are stacked on the fly (one transient copy)
  scan_layers: bool = False
  # attention kernel: 'xla' (any backend and dtype) or 'cudnn' (cuDNN flash attention on NVIDIA
  # GPUs; bf16/fp16 compute; the causal mask lets it skip the upper triangle)
  attention: str = "xla"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.rope_type not in ("default", "linear", "llama3"):
      raise ValueError(f"model.rope_type={self.rope_type!r}: expected 'default', 'linear' or "
                       "'llama3'")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in DTYPES:
        raise ValueError(f"model.{f}={getattr(self, f)!r}: expected one of {sorted(DTYPES)}")
    if self.attention not in ("xla", "cudnn"):
      raise ValueError(f"model.attention={self.attention!r}: expected 'xla' or 'cudnn'")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' or 'float16' "
                       "(cuDNN flash attention has no float32 kernel)")

  @property
  def hd(self) -> int:
    return self.head_dim or self.dim // self.num_heads


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, axes, rngs, *, bias=False):
  # Fan-in scaling (variance 1/n_in): a fixed std such as 0.02 leaves a small model's attention
  # logits near zero, and it then learns positional patterns very slowly from scratch.
  init = nnx.initializers.lecun_normal()
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=DTYPES[cfg.dtype],
                    param_dtype=DTYPES[cfg.param_dtype],
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:]), rngs=rngs)


def _rmsnorm(cfg: LlamaConfig, rngs):
  return nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps, dtype=jnp.float32,
                     param_dtype=DTYPES[cfg.param_dtype],
                     scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
                     rngs=rngs)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [H/2] of the rotary embedding, with HF's 'linear' / 'llama3' scaling."""
  h = cfg.hd
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    smooth = ((cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    mid = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor,
                        np.where(wavelen < high_wavelen, inv_freq, mid))
  return inv_freq.astype(np.float32)


def rope(x_BxLxNxH: jax.Array, pos_BxL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, rotate-half layout (as Hugging Face Llama)."""
  ang_BxLxH = jnp.concatenate([pos_BxL[..., None] * inv_freq[None, None, :]] * 2,
                              axis=-1)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(ang_BxLxH) + rotated * jnp.sin(ang_BxLxH)).astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.hd
    self.q = _linear(cfg, cfg.dim, n * h, ("embed", "heads"), rngs, bias=cfg.qkv_bias)
    self.k = _linear(cfg, cfg.dim, k * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.v = _linear(cfg, cfg.dim, k * h, ("embed", "kv_heads"), rngs, bias=cfg.qkv_bias)
    self.o = _linear(cfg, n * h, cfg.dim, ("heads", "embed"), rngs)

  def __call__(self, x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP=None):
    """Self-attention; with ``rows`` only those query rows are computed (output [B, P, D]),
    while keys and values still come from every position."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    inv_freq = rope_frequencies(cfg)
    xq, pos_q, mask_q = x_BxLxD, pos_BxL, mask_BxLxL
    if rows_BxP is not None:
      xq, pos_q = gather_rows(x_BxLxD, rows_BxP), jnp.take_along_axis(pos_BxL, rows_BxP, axis=1)
      mask_q = jnp.take_along_axis(mask_BxLxL, rows_BxP[:, :, None], axis=1)
    p = xq.shape[1]
    q_BxPxNxH = rope(self.q(xq).reshape(b, p, cfg.num_heads, cfg.hd), pos_q, inv_freq)
    k_BxLxKxH = rope(self.k(x_BxLxD).reshape(b, l, cfg.num_kv_heads, cfg.hd), pos_BxL, inv_freq)
    v_BxLxKxH = self.v(x_BxLxD).reshape(b, l, cfg.num_kv_heads, cfg.hd)
    if cfg.attention == "cudnn" and rows_BxP is None:
      if jax.default_backend() != "gpu":
        raise ValueError(f"model.attention='cudnn' runs on NVIDIA GPUs only; JAX's backend here "
                         f"is {jax.default_backend()!r}: use model.attention='xla'")
      # The mask (padding, window) becomes an additive bias; is_causal lets cuDNN skip the
      # blocks above the diagonal, which the mask excludes anyway.
      out_BxPxNxH = jax.nn.dot_product_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH,
                                                 mask=mask_q[:, None], is_causal=True,
                                                 implementation="cudnn")
    else:  # also the sparse last block's few query rows, which are not a causal prefix
      out_BxPxNxH = jax.nn.dot_product_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH,
                                                 mask=mask_q[:, None])
    return self.o(out_BxPxNxH.reshape(b, p, cfg.num_heads * cfg.hd))


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate = _linear(cfg, cfg.dim, cfg.mlp_dim, ("embed", "mlp"), rngs)
    self.up = _linear(cfg, cfg.dim, cfg.mlp_dim, ("embed", "mlp"), rngs)
    self.down = _linear(cfg, cfg.mlp_dim, cfg.dim, ("mlp", "embed"), rngs)

  def __call__(self, x_BxLxD):
    return self.down(jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD))


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _rmsnorm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _rmsnorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)
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
    x_BxPxD = x_BxPxD + self.attn(h_BxLxD, pos_BxL, mask_BxLxL, rows_BxP)
    return x_BxPxD + self.mlp(self.mlp_norm(x_BxPxD).astype(self.dtype))


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
    allowed_BxLxL &= pos_BxL[:, :, None] - pos_BxL[:, None, :] < sliding_window
  allowed_BxLxL |= (seg_BxL == 0)[:, :, None] & jnp.eye(l, dtype=bool)[None]
  return pos_BxL, allowed_BxLxL


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
    self.final_norm = _rmsnorm(cfg, rngs)

  def __call__(self, tokens_BxL: jax.Array, mask_BxL: jax.Array, rows_BxP=None, *,
               parts_BxL=None) -> jax.Array:
    """Final-norm states; ``mask`` and ``parts`` as in ``positions_and_mask``."""
    return self.run_from(self.embed(tokens_BxL), mask_BxL, 0, rows_BxP, parts_BxL=parts_BxL)

  def run_from(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, layer: int, rows_BxP=None, *,
               parts_BxL=None) -> jax.Array:
    """Blocks ``layer``.. and the final norm, on ``x`` = the hidden states entering ``layer``.

    ``rows``: return only the states at these positions, [B, P, D]. The last block then computes
    its queries, MLP and norm at those rows alone (its keys and values still read every
    position) — all a loss that reads a few states needs, and the same numbers.
    """
    pos_BxL, mask_BxLxL = positions_and_mask(mask_BxL, self.cfg.sliding_window, parts_BxL)
    blocks = list(self.layers[layer:])
    last = blocks.pop() if rows_BxP is not None else None
    x_BxLxD = self._blocks(blocks, x_BxLxD, pos_BxL, mask_BxLxL)
    if last is not None:
      x_BxLxD = last(x_BxLxD, pos_BxL, mask_BxLxL, rows_BxP)
    return self.final_norm(x_BxLxD)

  def _blocks(self, blocks, x_BxLxD, pos_BxL, mask_BxLxL):
    if not self.cfg.scan_layers or len(blocks) < 2:
      for block in blocks:
        x_BxLxD = block(x_BxLxD, pos_BxL, mask_BxLxL)
      return x_BxLxD
    graphdef, first = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), first, *(nnx.state(b) for b in blocks[1:]))

    def body(x_BxLxD, state):
      # Nothing else pins the activations inside the loop: without this, XLA's partitioner keeps
      # the FSDP-sharded weights in place and shards the activations on D instead, so every chip
      # holds the whole batch's [B, L, F] MLP activations and all-reduces them.
      x_BxLxD = _batch_sharded(x_BxLxD)
      return _batch_sharded(nnx.merge(graphdef, state)(x_BxLxD, pos_BxL, mask_BxLxL)), None

    return jax.lax.scan(body, x_BxLxD, stacked)[0]

  def features(self, tokens_BxL: jax.Array, mask_BxL: jax.Array, layer: int, *,
               parts_BxL=None) -> jax.Array:
    """The hidden states entering block ``layer``; ``layer = num_layers``: the final-norm output
    (the last layer). ``run_from(features(t, m, k), m, k)`` equals ``self(t, m)``."""
    if layer == self.cfg.num_layers:
      return self(tokens_BxL, mask_BxL, parts_BxL=parts_BxL)
    pos_BxL, mask_BxLxL = positions_and_mask(mask_BxL, self.cfg.sliding_window, parts_BxL)
    return self._blocks(list(self.layers[:layer]), self.embed(tokens_BxL), pos_BxL, mask_BxLxL)
