"""Positions in padded rows: the small indexing helpers that models and losses share.

Real tokens of a row are contiguous (right, left or no padding); ``mask`` is 1 on them.
# B: batch, L: sequence length, D: model dim, P: positions asked for
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ReadRows(NamedTuple):
  """The positions a loss reads (a pytree): the model's last block runs at these alone."""
  states_BxP: jax.Array | None  # the hidden states it returns (None: every state, dense)
  # where the head reads rewards: each sequence's last real token (R = 1; a shared-prompt row
  # holds two sequences, R = 2)
  reward_BxR: jax.Array

  @classmethod
  def at(cls, states_BxP: jax.Array | None, mask_BxL: jax.Array) -> "ReadRows":
    """``states`` and the reward's row of each sequence of ``mask`` (R = 1)."""
    return cls(states_BxP, last_token_index(mask_BxL)[:, None])


def gather_rows(x_BxLxD: jax.Array, rows_BxP: jax.Array) -> jax.Array:
  """``x[b, rows[b, p]]``: the states at given positions of each sequence, [B, P, D]."""
  return jnp.take_along_axis(x_BxLxD, rows_BxP[..., None], axis=1)


def first_token_index(mask_BxL: jax.Array) -> jax.Array:
  """Index of the first real (mask=1) token (0 for a row without one)."""
  return jnp.argmax(mask_BxL.astype(bool), axis=1)


def last_token_index(mask_BxL: jax.Array) -> jax.Array:
  """Index of the last real (mask=1) token: right, left or no padding alike."""
  pos_1xL = jnp.arange(mask_BxL.shape[1])[None, :]
  return jnp.max(jnp.where(mask_BxL.astype(bool), pos_1xL, -1), axis=1)
