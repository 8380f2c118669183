"""Orbax checkpoints of the train state *and* the grain iterator, with a safe fallback on restore.

A save is atomic (Orbax writes to a temporary folder and renames it when complete), so a run killed
mid-save leaves no half checkpoint behind as "latest". A checkpoint that still fails to restore
(truncated or edited files) is renamed ``<step>.corrupt-<n>`` (never deleted) with a warning, and
the previous one is tried.
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest good checkpoint into ``abstract_state``'s shardings.

    Returns ``(step, state)``, or ``(None, None)`` when there is none; ``data_iterator`` is moved
    to the saved position in place.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return step, restored["state"]
      except Exception as e:  # any failure to read means this checkpoint is unusable
        self._set_aside(step, e)
    return None, None

  def _set_aside(self, step: int, error: Exception) -> None:
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0:
      n = 0
      while os.path.exists(f"{path}.corrupt-{n}"):
        n += 1
      os.rename(path, f"{path}.corrupt-{n}")
      log.warning("checkpoint %s cannot be restored (%s: %s); kept as %s.corrupt-%d, trying the "
                  "previous one", path, type(error).__name__, str(error)[:300], path, n)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"rmjax_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
