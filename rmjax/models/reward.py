"""Reward model = Llama backbone + linear head on the hidden state of the last real token.

# B: batch, L: sequence length, D: model dim
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rmjax.indexing import ReadRows, gather_rows, last_token_index
from rmjax.models.llama import Llama, LlamaConfig, jitted_init


def _head(cfg: LlamaConfig, *, rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.normal(1.0 / (cfg.dim + 1))
  return nnx.Linear(cfg.dim, 1, use_bias=False, dtype=jnp.float32,
                    kernel_init=nnx.with_partitioning(init, ("embed", None)), rngs=rngs)


class RewardModel(nnx.Module):
  """Returns ``(reward_B, h_BxLxD)``; ``h`` is the fp32 last-layer (final-norm) hidden state.

  The head has no bias and is initialised N(0, std=1/(D+1)) as in the paper's official code
  (OpenRLHF's value head), so initial rewards are near zero.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.backbone = Llama(cfg, rngs=rngs)
    self.head = jitted_init(_head, cfg)(rngs)  # jitted: the same rounding as a jitted init

  def __call__(self, tokens_BxL: jax.Array, mask_BxL: jax.Array, rows: ReadRows | None = None,
               *, parts_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(reward_B, h)``: ``h`` is ``h_BxLxD``. With ``rows``: ``(reward_BxR, h)``, the rewards
    at ``rows.reward_BxR`` and only the states at ``rows.states_BxP`` ([B, P, D]; the last block
    runs at ``rows`` alone: ``Llama.run_from``), or all of them when it is None. ``mask`` and
    ``parts``: segments and responses, as in ``llama.positions_and_mask``."""
    return self._read(lambda pos: self.backbone(tokens_BxL, mask_BxL, pos, parts_BxL=parts_BxL),
                      mask_BxL, rows)

  def from_features(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, layer: int,
                    rows: ReadRows | None = None) -> tuple[jax.Array, jax.Array]:
    """Same outputs from cached ``backbone.features(tokens, mask, layer)`` (the loss lab)."""
    if layer == self.backbone.cfg.num_layers:  # the cache holds the final-norm output
      run = lambda pos: x_BxLxD if pos is None else gather_rows(x_BxLxD, pos)
    else:
      run = lambda pos: self.backbone.run_from(x_BxLxD, mask_BxL, layer, pos)
    return self._read(run, mask_BxL, rows)

  def score(self, h_BxLxD: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(reward_B, h_BxLxD)`` from last-layer hidden states: the head at the last real token."""
    h_BxLxD = h_BxLxD.astype(jnp.float32)
    h_last_BxD = gather_rows(h_BxLxD, last_token_index(mask_BxL)[:, None])[:, 0]
    return self.head(h_last_BxD)[:, 0], h_BxLxD

  def _read(self, run, mask_BxL, rows: ReadRows | None):
    """``run(positions)``: last-layer states at those positions (every one when None)."""
    if rows is None:
      return self.score(run(None), mask_BxL)
    if rows.states_BxP is None:
      h_BxLxD = run(None).astype(jnp.float32)
      return self.head(gather_rows(h_BxLxD, rows.reward_BxR))[..., 0], h_BxLxD
    p = rows.states_BxP.shape[1]
    h_BxQxD = run(jnp.concatenate([rows.states_BxP, rows.reward_BxR], axis=1))
    h_BxQxD = h_BxQxD.astype(jnp.float32)
    return self.head(h_BxQxD[:, p:])[..., 0], h_BxQxD[:, :p]
