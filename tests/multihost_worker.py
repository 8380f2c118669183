"""One process of ``tests/test_multihost.py``: joins the others, then trains each requested run.

  python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID RUNS_JSON

``RUNS_JSON``: ``[[workdir, {"train.steps": 8, ...}], ...]``, overrides of the tiny demo config,
trained one after the other with ``rmjax.train.train`` (what ``python -m rmjax.main`` runs), so
one process start-up serves several runs.
"""
import json
import logging
import sys

from rmjax import sharding


def main(port: str, num_processes: str, process_id: str, runs_json: str) -> None:
  sharding.init_distributed("explicit", f"127.0.0.1:{port}", int(num_processes), int(process_id))
  from configs import synthetic
  from rmjax import train
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("rmjax").setLevel(logging.INFO if int(process_id) == 0 else logging.WARNING)
  for workdir, overrides in json.loads(runs_json):
    config = synthetic.get_config("paper,tiny")
    config.update_from_flattened_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    final = train.train(config, workdir)
    if int(process_id) == 0:
      print(json.dumps({"workdir": workdir, "final_eval": final}))


if __name__ == "__main__":
  main(*sys.argv[1:])
