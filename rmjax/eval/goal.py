"""The goal state and per-token Q-values ``Q_t = cos(h_t, goal)`` (paper, section "uses").

# N: solutions, B: batch, L: sequence length, D: model dim

The goal is the mean last-layer hidden state at the final token of *correct* training solutions,
the paper's choice. It is saved as ``goal.npy`` inside the checkpoint step folder it was computed
from (``<workdir>/checkpoints/<step>/goal.npy``), so it is deleted together with its checkpoint.
Functions take numpy or jax arrays and work under ``jax.jit``.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from rmjax.losses import cosine
from rmjax.indexing import last_token_index

GOAL_FILE = "goal.npy"


def final_token_states(h_BxLxD, mask_BxL):
  """Hidden state at each row's last real token (right, left or no padding alike)."""
  last_B = last_token_index(jnp.asarray(mask_BxL))
  return jnp.take_along_axis(jnp.asarray(h_BxLxD), last_B[:, None, None], axis=1)[:, 0]


def goal_state(h_final_NxD, is_correct_N=None):
  """Mean final-token state over the correct solutions (all rows when ``is_correct_N`` is None)."""
  h_final_NxD = np.asarray(h_final_NxD, np.float64)
  if is_correct_N is not None:
    h_final_NxD = h_final_NxD[np.asarray(is_correct_N, bool)]
  if not len(h_final_NxD):
    raise ValueError("goal_state: no correct solutions to average")
  return h_final_NxD.mean(axis=0).astype(np.float32)


def q_values(h_BxLxD, goal_D, mask_BxL):
  """``Q_t = cos(h_t, goal)`` for every token; NaN where ``mask_BxL`` is 0 (padding)."""
  h_BxLxD = jnp.asarray(h_BxLxD, jnp.float32)
  q_BxL = cosine(h_BxLxD, jnp.broadcast_to(jnp.asarray(goal_D, jnp.float32), h_BxLxD.shape))
  return jnp.where(jnp.asarray(mask_BxL).astype(bool), q_BxL, jnp.nan)


def save_goal(step_dir: str, goal_D) -> str:
  """Writes ``goal.npy`` into a checkpoint step folder; returns its path."""
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"save_goal: checkpoint folder {step_dir} does not exist")
  path = os.path.join(step_dir, GOAL_FILE)
  np.save(path, np.asarray(goal_D, np.float32))
  return path


def load_goal(step_dir: str) -> np.ndarray:
  """Reads the goal saved by ``save_goal`` (run ``python -m rmjax.evaluate`` to create it)."""
  path = os.path.join(step_dir, GOAL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: `python -m rmjax.evaluate` computes and saves it")
  return np.load(path)
