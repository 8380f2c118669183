"""Reward model = Llama backbone + linear head on the hidden state of the last real token.

# B: batch, L: sequence length, D: model dim
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rmjax.models.llama import Llama, LlamaConfig


def last_token_index(mask_BxL: jax.Array) -> jax.Array:
  """Index of the last real (mask=1) token: right, left or no padding alike."""
  pos_BxL = jnp.arange(mask_BxL.shape[1])[None, :]
  return jnp.max(jnp.where(mask_BxL.astype(bool), pos_BxL, -1), axis=1)


class RewardModel(nnx.Module):
  """Returns ``(reward_B, h_BxLxD)``; ``h`` is the fp32 last-layer (final-norm) hidden state.

  The head has no bias and is initialised N(0, std=1/(D+1)) as in the paper's official code
  (OpenRLHF's value head), so initial rewards are near zero.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.backbone = Llama(cfg, rngs=rngs)
    init = nnx.initializers.normal(1.0 / (cfg.dim + 1))
    self.head = nnx.Linear(cfg.dim, 1, use_bias=False, dtype=jnp.float32,
                           kernel_init=nnx.with_partitioning(init, ("embed", None)), rngs=rngs)

  def __call__(self, tokens_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.score(self.backbone(tokens_BxL, mask_BxL), mask_BxL)

  def from_features(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, layer: int
                    ) -> tuple[jax.Array, jax.Array]:
    """Same outputs from cached ``backbone.features(tokens, mask, layer)`` (the loss lab)."""
    if layer == self.backbone.cfg.num_layers:
      return self.score(x_BxLxD, mask_BxL)
    return self.score(self.backbone.run_from(x_BxLxD, mask_BxL, layer), mask_BxL)

  def score(self, h_BxLxD: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(reward_B, h_BxLxD)`` from last-layer hidden states: the head at the last real token."""
    h_BxLxD = h_BxLxD.astype(jnp.float32)
    last_B = last_token_index(mask_BxL)
    h_last_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    return self.head(h_last_BxD)[:, 0], h_BxLxD
