"""Command line: ``python -m rmjax.main --config=configs/x.py[:arg] --workdir=DIR [--config.k=v]``.

An existing ``--workdir`` resumes its run from the newest good checkpoint. The same command runs
on every process of a multi-process job: TPU pods and SLURM steps are detected
(``--distributed=auto``); elsewhere pass ``--coordinator=host:port --num_processes=N
--process_id=i``. Only process 0 writes metrics and prints.
"""
from __future__ import annotations

import json
import logging
import os

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
  save_config(config, _WORKDIR.value, write=lead)
  final = train.train(config, _WORKDIR.value)
  if lead:
    print(json.dumps({"final_eval": final}))


def save_config(config, workdir: str, *, write: bool = True) -> None:
  """Writes ``workdir/config.json`` (atomically), which ``rmjax.evaluate`` and the exporter read.
  A run resumed with another model architecture than the one there is refused."""
  from rmjax import checkpoint, train
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("model", {})
    wrong = {k: (v, old[k]) for k, v in new["model"].items()
             if k not in train.ARCH_EXEMPT and k in old and v != old[k]}
    if wrong:
      raise ValueError(f"{path}: this workdir's run has another architecture: " + ", ".join(
          f"model.{k}={a!r} (config.json: {b!r})" for k, (a, b) in wrong.items())
          + "; use a new --workdir, or the run's config")
  if write:
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_json(path, new, indent=2)


if __name__ == "__main__":
  app.run(main)
