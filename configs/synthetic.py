"""Demo recipe: a tiny byte-level Llama reward model on the embedded synthetic math pairs.

  python -m rmjax.main --config=configs/synthetic.py --workdir=/tmp/rm_demo
  python -m rmjax.main --config=configs/synthetic.py:bt --workdir=/tmp/rm_bt   # BT only
  python -m rmjax.main --config=configs/synthetic.py:infonce --workdir=...      # in-batch negatives
Variants (``:arg``): ``paper`` (default, BT + paper contrastive), ``bt``, ``infonce``; append
``,tiny`` (e.g. ``paper,tiny``) for a seconds-long smoke run.
"""
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from rmjax.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ConfigDict:
  variant, *flags = (arg or "paper").split(",")
  c = ConfigDict()
  c.seed = 0  # model init, data order and contrastive sampling all derive from it

  c.data = ConfigDict()
  c.data.name = "synthetic"  # dataset: 'synthetic' (embedded, generated)
  c.data.tokenizer = "byte"  # 'byte': UTF-8 bytes, pad id 0
  c.data.seed = 1234  # which problems are generated (independent of the training seed)
  c.data.train_size = 20_000  # generated training pairs
  c.data.eval_size = 1024  # held-out pairs (the 'validation' split: disjoint problems)
  c.data.min_steps = 2  # arithmetic steps per problem, at least
  c.data.max_steps = 3  # ... and at most
  c.data.max_value = 9  # every number written lies in 0..max_value
  c.data.error_kinds = "carry"  # slips in rejected solutions, comma-separated: carry, copy, arith
  c.data.max_len = 48  # tokens per sequence (prompt + response); prompts are cut from the left
  c.data.padding_side = "right"  # 'right' or 'left': rewards do not depend on it
  c.data.buckets = ()  # batch lengths (one compiled step each); () = max_len only
  c.data.sort_window = 1  # batches sorted by length together (1 = no sorting)
  c.data.num_threads = 0  # threads reading + tokenising ahead of the train step (0 = none)
  c.data.num_workers = 0  # worker processes (grain mp_prefetch); 0 = in the main process

  c.model = ConfigDict()  # rmjax.models.LlamaConfig fields
  c.model.init_from = ""  # HF folder or .gguf to start from ("" = random init); see README
  c.model.vocab_size = 256
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2  # grouped-query attention
  c.model.head_dim = None  # None: dim // num_heads
  c.model.mlp_dim = 256
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-5
  c.model.qkv_bias = False  # True for Qwen2-style models
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (weights stay param_dtype)
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
  c.loss.contrastive.num_samples = 16  # S: source (and negative) states per sequence
  c.loss.contrastive.num_goal_samples = 4  # future states averaged per goal when goal='avg'
  c.loss.contrastive.temperature = 1.0  # τ: similarities are cos/τ
  c.loss.contrastive.reduction = "mean_log"  # paper mode: 'mean_log', or the official 'log_mean'
  # with only BT and contrastive terms, run the last block at just the rows they read (the last
  # token, the sampled states): the same loss and gradients for a fraction of its cost
  c.loss.sparse_last_block = True

  c.optim = ConfigDict()
  c.optim.lr = 3e-3  # peak learning rate
  c.optim.warmup_steps = 50  # linear warmup from 0
  c.optim.final_lr_fraction = 0.1  # cosine decays to lr * this at the last step
  c.optim.weight_decay = 0.01  # AdamW decay (matrices only)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.clip_norm = 1.0  # global gradient-norm clipping
  # non-finite updates are skipped; this many in a row stop the run with an error
  c.optim.max_consecutive_nonfinite = 10

  c.train = ConfigDict()
  c.train.steps = 2000  # optimiser steps
  c.train.batch_size = 16  # pairs per step (global, over all devices and processes)
  c.train.accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.train.trainable_top_layers = -1  # -1: train everything; k >= 0: only the top k blocks (+ final
  # norm when k > 0) and the head, the rest frozen
  c.train.log_every = 50  # steps between train metrics lines
  c.train.eval_every = 500  # steps between held-out evaluations (and at the end)
  c.train.ckpt_every = 500  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.async_checkpointing = True  # save in the background while training continues

  c.mesh = ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  # multi-slice: slices spanned by each axis over the data-centre network, e.g. '(2,1,1)' for
  # data parallelism across 2 TPU slices; mesh.shape is then the mesh within one slice
  c.mesh.dcn_shape = placeholder(tuple)
  c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes (rmjax.sharding)

  if variant == "bt":
    c.loss.beta = 0.0
  elif variant == "infonce":
    c.loss.contrastive.mode = "infonce"
    c.loss.contrastive.temperature = 0.1
  elif variant != "paper":
    raise ValueError(f"configs/synthetic.py: unknown variant {variant!r} (paper, bt, infonce)")
  if "tiny" in flags:
    c.data.train_size, c.data.eval_size = 256, 64
    c.model.dim, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
    c.train.steps, c.train.batch_size = 8, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 4, 4
    c.optim.warmup_steps = 2
  return c
