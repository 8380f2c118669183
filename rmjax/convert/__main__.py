"""``python -m rmjax.convert export-hf --checkpoint=<run dir | checkpoints/ | step dir> --out=DIR``

Writes a Hugging Face ``*ForSequenceClassification`` folder (num_labels=1, float32) with the run's
tokenizer, made to encode as the run reads (HF tokenizers only; byte-level demo models are written
without one, pad id 0), and the run's ``reward_stats.json`` (when training wrote it) as
``config.json`` ``rmjax_reward_mean`` / ``rmjax_reward_std``.
"""
from __future__ import annotations

import argparse
import json
import os

from absl import logging as absl_logging


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rmjax.convert")
  sub = parser.add_subparsers(dest="command", required=True)
  export = sub.add_parser("export-hf", help="rmjax checkpoint -> HF sequence-classifier folder")
  export.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ or a step dir")
  export.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)

  import jax

  from rmjax import sharding
  from rmjax.checkpoint import load_trained, resolve_run
  from rmjax.convert.export import export_reward_model
  from rmjax.data.sources import make_tokenizer
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    config, model = load_trained(args.checkpoint, mesh)
    tokenizer = make_tokenizer(config)
    stats_path = os.path.join(resolve_run(args.checkpoint)[2], "reward_stats.json")
    stats = None
    if os.path.exists(stats_path):
      with open(stats_path) as f:
        stats = json.load(f)
    export_reward_model(model, args.out, tokenizer=tokenizer if hasattr(tokenizer, "hf") else None,
                        pad_token_id=tokenizer.pad_id, reward_stats=stats)
  print(json.dumps({"exported": args.out}))


if __name__ == "__main__":
  main()
