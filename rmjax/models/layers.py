"""The decoder's configuration and small parts: linear layers, RMSNorm, RoPE, soft-capped attention.

# B: batch, L: sequence length, P: query rows, D: model dim, N: query heads, K: kv heads,
# G: query heads per kv head, H: head dim

One ``LlamaConfig`` describes every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2): a
family is a set of switches (``qkv_bias``, ``qk_norm``, ``norm_plus_one``, ...), not a copy of
the model. Numerics follow Hugging Face ``transformers`` (RoPE with the rotate-half layout,
RMSNorm in fp32), so imported checkpoints reproduce its hidden states.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {"none": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)  # HF's gelu_pytorch_tanh


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


# the gated MLP's activation (module-level functions: equal in every model's graph definition)
MLP_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": gelu_tanh, "gelu": gelu}

# LlamaConfig.attention's kernels (rmjax.models.attention says what runs where)
ATTENTION_KERNELS = ("xla", "cudnn", "splash")
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
  # the layers the window applies to (Gemma 2: every other one; Qwen: HF's layer_types);
  # None = every layer
  sliding_layers: tuple[int, ...] | None = None
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before RoPE
  # Gemma: every RMSNorm scales by (1 + w); w is stored as HF stores it (initialised to 0)
  norm_plus_one: bool = False
  # Gemma 2: RMSNorm on the attention and MLP outputs too, before each joins the residual
  sandwich_norms: bool = False
  embed_scale: bool = False  # Gemma: embeddings times sqrt(dim), rounded to the compute dtype
  mlp_act: str = "silu"  # gated MLP activation: 'silu', 'gelu_tanh' (Gemma) or 'gelu' (erf)
  attn_softcap: float = 0.0  # Gemma 2: attention logits -> c * tanh(logits / c); 0 = off
  # softmax scale 1/sqrt(this) (Gemma 2's query_pre_attn_scalar); 0 = 1/sqrt(head dim)
  query_pre_attn_scalar: float = 0.0
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype: float32 or bfloat16
  # per-block rematerialisation (memory for compute): 'none', 'dots_saveable' (keep matmul
  # outputs, recompute the rest in the backward pass) or 'full' (keep only each block's input)
  remat: str = "none"
  # run the blocks as one jax.lax.scan (one block in the compiled program instead of
  # num_layers); the weights stay per block and are stacked on the fly (one transient copy)
  scan_layers: bool = False
  # attention kernel (rmjax.models.attention): 'xla' (any backend and dtype), 'cudnn' (cuDNN
  # flash attention on NVIDIA GPUs; bf16/fp16 compute; the causal mask lets it skip the upper
  # triangle) or 'splash' (Pallas splash attention on TPUs; the mask from segment ids and parts)
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
    if self.mlp_act not in MLP_ACTIVATIONS:
      raise ValueError(f"model.mlp_act={self.mlp_act!r}: expected one of "
                       f"{sorted(MLP_ACTIVATIONS)}")
    if self.sliding_layers is not None:  # lists (JSON) -> a hashable tuple
      object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))
      bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
      if bad:
        raise ValueError(f"model.sliding_layers: layers {bad} out of range for num_layers="
                         f"{self.num_layers}")
    if self.attn_softcap < 0 or self.query_pre_attn_scalar < 0:
      raise ValueError("model.attn_softcap and model.query_pre_attn_scalar must be >= 0")
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f"model.attention={self.attention!r}: expected one of "
                       f"{', '.join(map(repr, ATTENTION_KERNELS))}")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' or 'float16' "
                       "(cuDNN flash attention has no float32 kernel)")
    if self.attention != "xla" and self.attn_softcap:
      raise ValueError(f"model.attention={self.attention!r} has no attention soft-capping "
                       f"(model.attn_softcap={self.attn_softcap}): use model.attention='xla'")
    if self.attention == "splash" and self.sliding_window and self.sliding_layers is not None:
      raise ValueError("model.attention='splash' takes a sliding window on every layer only "
                       f"(model.sliding_layers={self.sliding_layers}): use model.attention='xla'")

  @property
  def hd(self) -> int:
    return self.head_dim or self.dim // self.num_heads

  def windowed(self, layer: int) -> bool:
    """Whether block ``layer`` attends through the sliding window."""
    return bool(self.sliding_window) and (self.sliding_layers is None
                                          or layer in self.sliding_layers)


def linear(cfg: LlamaConfig, n_in: int, n_out: int, axes, rngs, *, bias=False):
  # Fan-in scaling (variance 1/n_in): a fixed std such as 0.02 leaves a small model's attention
  # logits near zero, and it then learns positional patterns very slowly from scratch.
  init = nnx.initializers.lecun_normal()
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=DTYPES[cfg.dtype],
                    param_dtype=DTYPES[cfg.param_dtype],
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:]), rngs=rngs)


class PlusOneRMSNorm(nnx.RMSNorm):
  """RMSNorm scaling by ``1 + scale`` (Gemma), in fp32 as HF's ``Gemma2RMSNorm``."""

  def __call__(self, x, mask=None):
    del mask
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    scale = 1.0 + self.scale[...].astype(jnp.float32)
    return y * scale.reshape((1,) * (y.ndim - 1) + scale.shape)


def rmsnorm(cfg: LlamaConfig, n: int, rngs):
  """fp32 RMSNorm over the last ``n`` features; the scale is ``w`` or ``1 + w`` (Gemma)."""
  cls, init = ((PlusOneRMSNorm, nnx.initializers.zeros) if cfg.norm_plus_one
               else (nnx.RMSNorm, nnx.initializers.ones))
  return cls(n, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=DTYPES[cfg.param_dtype],
             scale_init=nnx.with_partitioning(init, ("norm",)), rngs=rngs)


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


def softcapped_attention(q_BxPxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxPxL, scale: float,
                         softcap: float) -> jax.Array:
  """Attention whose logits are soft-capped, ``c * tanh(logits / c)``, before the mask (Gemma 2;
  ``jax.nn.dot_product_attention`` has no such option). Softmax in fp32, as HF's eager path."""
  b, p, n, h = q_BxPxNxH.shape
  k = k_BxLxKxH.shape[2]
  q_BxPxKxGxH = q_BxPxNxH.reshape(b, p, k, n // k, h)  # query head n reads kv head n // G
  logits_BxKxGxPxL = jnp.einsum("bpkgh,blkh->bkgpl", q_BxPxKxGxH, k_BxLxKxH) * scale
  logits_BxKxGxPxL = softcap * jnp.tanh(logits_BxKxGxPxL / softcap)
  logits_BxKxGxPxL = jnp.where(mask_BxPxL[:, None, None], logits_BxKxGxPxL.astype(jnp.float32),
                               jnp.finfo(jnp.float32).min)
  probs_BxKxGxPxL = jax.nn.softmax(logits_BxKxGxPxL, axis=-1).astype(v_BxLxKxH.dtype)
  out_BxPxKxGxH = jnp.einsum("bkgpl,blkh->bpkgh", probs_BxKxGxPxL, v_BxLxKxH)
  return out_BxPxKxGxH.reshape(b, p, n, h)
