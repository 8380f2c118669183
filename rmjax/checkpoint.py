"""Orbax checkpoints of the train state *and* the grain iterator, with a safe fallback on restore.

A save is atomic (Orbax writes to a temporary folder and renames it when complete), so a run killed
mid-save leaves no half checkpoint behind as "latest". A checkpoint that still fails to restore
(truncated or edited files) is renamed ``<step>.corrupt-<n>`` (never deleted) with a warning once
an older one restores; when none restores (a changed config), nothing is renamed and restore fails
with the newest one's error. A checkpoint restores under any process count (the data position is
shared by all processes).
"""
from __future__ import annotations

import glob
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rmjax import train_state

log = logging.getLogger(__name__)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file, then a rename), so that a crash
  mid-write leaves the previous file, never a truncated one."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_json(path: str, obj, **dump_kwargs) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (``write_text``)."""
  write_text(path, json.dumps(obj, **{"indent": 1, **dump_kwargs}))


def data_state_of_another_process_count(data_dir: str) -> str | None:
  """A data-iterator state file in ``data_dir`` when it was saved under another process count
  (this process has no file of its own), else None: grain's restore applies.

  grain's ``CheckpointHandler`` reads only the file of the current process index and count and
  has no public API for another count, so this mirrors its private file naming
  (``process_<index>-of-<count>.json``, grain/_src/python/checkpoint/handler.py); the only place
  here that knows it.
  """
  own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
  saved = sorted(glob.glob(os.path.join(data_dir, "process_*.json")))
  return None if os.path.exists(own) or not saved else saved[0]


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
    to the saved position in place. Checkpoints newer than the restored one are set aside. When
    none restores, nothing is renamed and the newest one's error is raised: the likely cause is
    the run's config, not the files (another architecture, or data options that change the
    iterator state such as ``data.num_workers``).
    """
    failed = []  # (step, error), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, abstract_state, data_iterator)
      except Exception as e:  # any failure to read means this checkpoint is unusable
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        self._set_aside(bad_step, error)
      return step, state
    if failed:
      step, error = failed[0]
      raise RuntimeError(
          f"{self.directory}: none of the {len(failed)} checkpoints restores (newest, step "
          f"{step}: {type(error).__name__}: {str(error)[:500]}). Has the config changed since "
          "they were saved? Resume with the run's config (config.json in its workdir) or start "
          "in a new workdir; nothing was renamed.") from error
    return None, None

  def _restore(self, step: int, abstract_state, data_iterator):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    foreign = data_state_of_another_process_count(os.path.join(self.directory, str(step), "data"))
    if foreign is None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    if foreign is not None:
      # every process's iterator holds the same position (the number of global batches read;
      # see rmjax.data.pipeline), so any process's file will do
      with open(foreign) as f:
        data_iterator.set_state(json.load(f))
    return restored["state"]

  def _set_aside(self, step: int, error: Exception) -> None:
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0:
      n = 0
      while os.path.exists(f"{path}.corrupt-{n}"):
        n += 1
      os.rename(path, f"{path}.corrupt-{n}")
      log.warning("checkpoint %s cannot be restored (%s: %s) but an older one can; kept as "
                  "%s.corrupt-%d", path, type(error).__name__, str(error)[:300], path, n)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"rmjax_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def resolve_run(path: str) -> tuple[str, int | None, str]:
  """``(checkpoint folder, step or None for the newest, workdir)`` for a workdir, its
  ``checkpoints/`` folder or one step folder (``runs/demo/checkpoints/1500``)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None, path
  if os.path.basename(path).isdigit():
    parent = os.path.dirname(path)
    return parent, int(os.path.basename(path)), os.path.dirname(parent)
  return path, None, os.path.dirname(path)


def restore_state(config, mesh, path: str):
  """``(step, step folder, graphdef, state)`` of a run's checkpoint (model and optimiser),
  sharded over ``mesh``; no data iterator needed."""
  directory, step, _ = resolve_run(path)
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{directory}: no checkpoint{'' if step is None else f' {step}'}")
  graphdef, abstract = train_state.abstract_state(config, mesh)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  manager.close()
  return step, os.path.join(directory, str(step)), graphdef, restored["state"]


LAB_EXPORT = ("a loss-lab run's saved top: export it with the features it trained on, python -m "
              "rmjax.lab_export --features=FEATURES_DIR --params={npz} --out=RUN_DIR, then use "
              "RUN_DIR")


def check_run_path(path: str) -> None:
  """A FileNotFoundError saying what to do when ``path`` is not a run: a loss-lab ``.npz`` (or a
  folder of them), any other file, or a folder with no checkpoints."""
  if os.path.isfile(path):
    what = LAB_EXPORT.format(npz=path) if path.endswith(".npz") else "not a folder"
    raise FileNotFoundError(f"{path}: not an rmjax run ({what})")
  directory, step, _ = resolve_run(path)
  if step is None and directory == os.path.abspath(path) and not any(
      name.isdigit() for name in os.listdir(directory)):
    npz = sorted(f for f in os.listdir(directory) if f.endswith(".npz"))
    what = (f"it holds {LAB_EXPORT.format(npz=os.path.join(path, npz[0]))}" if npz else
            "expected a workdir with config.json and checkpoints/, its checkpoints/ or a step "
            "folder; or a Hugging Face folder with *.safetensors")
    raise FileNotFoundError(f"{path}: not an rmjax run, no checkpoints in it ({what})")


def load_trained(path: str, mesh):
  """``(config, model)`` of the run at ``path``; the config is the run's ``config.json``."""
  import ml_collections
  check_run_path(path)
  workdir = resolve_run(path)[2]
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: missing (rmjax.main writes it next to checkpoints/)")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  _, _, graphdef, state = restore_state(config, mesh, path)
  return config, train_state.merge(graphdef, state)[0]
