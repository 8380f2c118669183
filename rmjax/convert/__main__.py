"""``python -m rmjax.convert export-hf --checkpoint=<run dir | checkpoints/ | step dir> --out=DIR``

Writes a Hugging Face ``*ForSequenceClassification`` folder (num_labels=1, float32) with the run's
tokenizer (HF tokenizers only; byte-level demo models are written without one, pad id 0).
"""
from __future__ import annotations

import argparse
import json

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
  from rmjax.checkpoint import load_trained
  from rmjax.convert.export import export_reward_model
  from rmjax.data.sources import make_tokenizer
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    config, model = load_trained(args.checkpoint, mesh)
    tokenizer = make_tokenizer(config)
    hf_tokenizer = getattr(tokenizer, "hf", None)
    export_reward_model(model, args.out, tokenizer=hf_tokenizer, pad_token_id=tokenizer.pad_id)
  print(json.dumps({"exported": args.out}))


if __name__ == "__main__":
  main()
