"""Command line: ``python -m rmjax.main --config=configs/x.py[:arg] --workdir=DIR [--config.k=v]``.

An existing ``--workdir`` resumes its run from the newest good checkpoint. The same command runs
on every process of a multi-process job: TPU pods and SLURM steps are detected
(``--distributed=auto``); elsewhere pass ``--coordinator=host:port --num_processes=N
--process_id=i``. Only process 0 writes metrics and prints.

A run's config is fixed at its first start (``workdir/config.json``, which evaluation and export
read): a resume whose config differs is refused with the differing fields, unless
``--allow_config_change`` is passed. Then ``config.json`` becomes the new config, the start is
recorded in ``config_history.jsonl`` (a JSON line per start that changed it: ``time``, ``step``, the
newest checkpoint's when there is one, and ``changed``: ``{field: {"old": ..., "new": ...}}``),
and the first start's ``config.json`` is kept as ``config_original.json``. Fields that say where
and how the run runs (``RESUME_EXEMPT``) may change without the flag, and are recorded too.
Another model architecture is refused even with the flag.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file [:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "none", "explicit", "slurm", "tpu"],
    "How the processes of a job find each other (rmjax.sharding.init_distributed).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank, 0..num_processes-1.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume --workdir's run with a config that differs from its config.json (the architecture "
    "excepted): config.json becomes this config, the change is recorded in config_history.jsonl "
    "and the first config is kept as config_original.json.")
_MEMORY_CHECK = flags.DEFINE_enum(
    "memory_check", "compile", ["compile", "plan", "none"],
    "Before training, stop (naming the levers that fit) when the step at the longest batch length "
    "(data.buckets, data.max_len) exceeds the devices' memory: 'compile' compiles it here and "
    "reads XLA's bytes (the plan, calibrated by them, for the other lengths and the levers); "
    "'plan': rmjax.memory.plan only (no compile); 'none': no check.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # after flag parsing: a bad flag fails fast, without importing jax
  import jax
  from rmjax import sharding, train
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  sharding.init_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                            _PROCESS_ID.value)
  lead = jax.process_index() == 0  # the only process that logs, prints and writes metrics
  logging.getLogger("rmjax").setLevel(logging.INFO if lead else logging.WARNING)
  config = _CONFIG.value
  if _MEMORY_CHECK.value != "none":  # before config.json: a lever taken must not block a resume
    check_memory(config, config_flags.get_config_filename(flags.FLAGS["config"]),
                 compile_=_MEMORY_CHECK.value == "compile")
  save_config(config, _WORKDIR.value, write=lead,
              allow_change=_ALLOW_CONFIG_CHANGE.value)
  final = train.train(config, _WORKDIR.value)
  if lead:
    print(json.dumps({"final_eval": final}))


def check_memory(config, where: str, compile_: bool = True) -> None:
  """Stops before training when the step at the longest batch length the pipeline produces
  (``data.buckets``, ``data.max_len``) exceeds this process's devices' memory, with the figures
  and the levers that fit (``rmjax.memory.check_fits``), instead of an out-of-memory error when
  that batch arrives. ``compile_``: XLA's bytes for that step (compiled here, nothing allocated)
  rather than the plan alone (which XLA:CPU exceeds: docs/scale.md)."""
  import jax
  from rmjax import memory, sharding
  mesh = sharding.make_mesh(tuple(config.mesh.shape), dcn_shape=config.mesh.get("dcn_shape"))
  device = jax.local_devices()[0]
  budget, source = memory.device_bytes(device)

  def measure(c) -> int:
    s = memory.compiled(c, mesh)
    return (s.argument_size_in_bytes + s.output_size_in_bytes - s.alias_size_in_bytes
            + s.temp_size_in_bytes + s.generated_code_size_in_bytes)

  try:
    need = memory.check_fits(config, mesh.devices.shape, budget, f"{where}: ",
                             backend=device.platform,
                             measure=measure if compile_ else None)
  except memory.DoesNotFit as e:
    raise SystemExit(f"{e}\n(available: {source})") from None
  logging.getLogger("rmjax").info(
      "memory: %.1f MiB per device at %d tokens (%s), %.1f MiB available (%s)",
      need[max(need)] / 2 ** 20, max(need), "XLA" if compile_ else "plan", budget / 2 ** 20, source)


# config fields that may differ on any resume of a run: where it runs (the mesh, folders of the raw
# data) and how the model runs (models.llama.RUN_ONLY_FIELDS); a change is still recorded
RESUME_EXEMPT = ("mesh", "data.source_dir", "data.tfds_dir")
# fields added after runs were written, with the value that means what a run without them did
# (model fields: models.llama.LlamaConfig's defaults); an absent field with that value is no change
ADDED_FIELDS = {"data.convention": "rmjax", "data.layout": "pairs", "data.pack_len": 0,
                "loss.center_rewards": 0.0}


def _with_added_fields(old_flat: dict, new_flat: dict) -> dict:
  """``old_flat`` plus the fields only ``new_flat`` has, at the values that mean the old behaviour
  (a model field set to None means its default)."""
  from rmjax.models.llama import LlamaConfig
  added = {**ADDED_FIELDS, **{f"model.{f.name}": f.default
                              for f in dataclasses.fields(LlamaConfig)}}
  return {**{k: None if k.startswith("model.") and new_flat[k] is None else added[k]
             for k in new_flat.keys() - old_flat.keys() if k in added}, **old_flat}


def save_config(config, workdir: str, *, write: bool = True, allow_change: bool = False) -> None:
  """Writes ``workdir/config.json`` (atomically), which ``rmjax.evaluate`` and the exporter read.

  A resume with another config is refused, unless ``allow_change`` (``--allow_config_change``):
  then the change is appended to ``config_history.jsonl`` and the first config kept as
  ``config_original.json`` (module docstring). Another architecture is always refused.
  """
  from rmjax import checkpoint, config_tools, train_state
  from rmjax.models.llama import RUN_ONLY_FIELDS
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if "convention" in new.get("data", {}):  # recorded resolved: '' follows model.init_from
    from rmjax.data.tokenizer import resolve_convention
    new["data"]["convention"] = resolve_convention(new["data"]["convention"],
                                                   new.get("model", {}).get("init_from", ""))
  changed = {}
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    old = json.loads(text)
    old_model = old.get("model", {})
    wrong = {k: (v, old_model[k]) for k, v in new["model"].items()
             if k not in train_state.ARCH_EXEMPT and k in old_model and v != old_model[k]}
    if wrong:
      raise ValueError(f"{path}: this workdir's run has another architecture: " + ", ".join(
          f"model.{k}={a!r} (config.json: {b!r})" for k, (a, b) in wrong.items())
          + "; use a new --workdir, or the run's config")
    new_flat = config_tools.flatten(new)
    old_flat = _with_added_fields(config_tools.flatten(old), new_flat)
    changed = {k: {side: flat[k] for side, flat in (("old", old_flat), ("new", new_flat))
                   if k in flat}
               for k in sorted(old_flat.keys() | new_flat.keys())
               if k not in old_flat or k not in new_flat or old_flat[k] != new_flat[k]}
    exempt = (*RESUME_EXEMPT, *(f"model.{k}" for k in RUN_ONLY_FIELDS))
    refused = [k for k in changed if not any(k == e or k.startswith(e + ".") for e in exempt)]
    if refused and not allow_change:
      absent = "(absent)"
      raise ValueError(
          f"{path}: this workdir's run was started with another config:\n" + "".join(
              f"  {k}: {changed[k].get('old', absent)!r} (config.json) -> "
              f"{changed[k].get('new', absent)!r} (now)\n" for k in refused)
          + "Resume with the run's config, use a new --workdir, or pass --allow_config_change "
          "to change it (recorded in config_history.jsonl)")
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  if changed:
    original = os.path.join(workdir, "config_original.json")
    if not os.path.exists(original):
      checkpoint.write_text(original, text)
    history = os.path.join(workdir, "config_history.jsonl")
    step = _latest_checkpoint(workdir)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **({} if step is None else {"step": step}), "changed": changed}
    previous = ""
    if os.path.exists(history):
      with open(history) as f:
        previous = f.read()
    checkpoint.write_text(history, previous + json.dumps(record) + "\n")
  checkpoint.write_json(path, new, indent=2)


def _latest_checkpoint(workdir: str) -> int | None:
  """The newest checkpoint's step (where a resume starts), without reading it."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return None
  return max((int(name) for name in os.listdir(folder) if name.isdigit()), default=None)


if __name__ == "__main__":
  app.run(main)
