"""Command line: ``python -m rmjax.main --config=configs/x.py[:arg] --workdir=DIR [--config.k=v]``.

An existing ``--workdir`` resumes its run from the newest good checkpoint.
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from rmjax import train  # after flag parsing: a bad flag fails fast, without importing jax
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  logging.getLogger("rmjax").setLevel(logging.INFO)
  config = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  final = train.train(config, _WORKDIR.value)
  print(json.dumps({"final_eval": final}))


if __name__ == "__main__":
  app.run(main)
