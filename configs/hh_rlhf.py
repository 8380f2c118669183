"""Helpful-harmless reward model on Anthropic HH-RLHF (harmless-base) pairs.

  python -m rmjax.main --config=configs/hh_rlhf.py --workdir=runs/hh
Variants (``:arg``, comma-separated): ``paper`` (default), ``bt``, ``infonce``; ``tiny`` for a CPU
smoke run. Everything but the data is ``configs/gsm8k.py`` (fields documented there).
Sized for one accelerator with 64 GiB or more (an 80 GB H100, an H200): rmjax.memory plans 60 GiB
per device at the 1024-token bucket (fp32, no remat). On a 2-core / 24 GiB CPU host use ``tiny``
(XLA:CPU needs 153 GiB at 1024 tokens; ``rmjax.main`` stops before training and names the
levers: docs/scale.md). The prompt
is the dialogue both responses share, so contrastive states come only from the final responses.
"""
from ml_collections import ConfigDict

from configs import gsm8k


def get_config(arg: str | None = None) -> ConfigDict:
  c = gsm8k.get_config(arg)
  c.data.name = "hh_rlhf"  # shared dialogue prefix = prompt; the final assistant turns = responses
  c.data.max_len = 1024  # the longest pair is 997 SmolLM2 tokens (p99: ~650)
  c.data.buckets = (128, 256, 384, 512, 768, 1024)  # batch lengths (one compiled step each)
  c.data.sort_window = 32  # batches sorted by length together: dialogue lengths vary more
  c.train.steps = 500  # ~4 epochs of the 1,846 training pairs at batch 16
  if "tiny" in (arg or "").split(","):
    c.data.max_len, c.data.buckets = 512, (128, 256, 512)
    c.train.steps = 8
  return c
