"""The blocks every recipe shares, each field documented once here; a recipe states what differs.

  from configs import common
  def get_config(arg=None):
    a = common.parse_arg(arg, "configs/x.py", loss=common.LOSSES, flags=("tiny",))
    c = ConfigDict({"seed": 0, "data": ..., "model": common.model(dim=64, ...),
                    "loss": common.loss(a.loss), "optim": common.optim(lr=3e-3, b2=0.98),
                    "train": common.train(steps=2000), "mesh": common.mesh()})
"""
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from rmjax.sharding import DEFAULT_RULES

LOSSES = ("paper", "bt", "infonce")  # the objective variants every recipe offers


def _set(c: ConfigDict, block: str, overrides: dict) -> ConfigDict:
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise ValueError(f"config.{block}: no field {', '.join(unknown)} (fields: {', '.join(c)})")
  c.update(overrides)
  return c


def parse_arg(arg: str | None, where: str, *, flags=(), **groups) -> ConfigDict:
  """A recipe's ``:arg``, comma-separated words: at most one from each group (default: its
  first) and any of ``flags``. ``parse_arg("bt,tiny", "configs/x.py", loss=LOSSES,
  flags=("tiny",))`` -> ``{"loss": "bt", "tiny": True}``; an unknown word is an error naming
  ``where`` and every choice."""
  out = ConfigDict({name: choices[0] for name, choices in groups.items()})
  out.update({f: False for f in flags})
  for word in filter(None, (w.strip() for w in (arg or "").split(","))):
    group = next((name for name, choices in groups.items() if word in choices), None)
    if group is not None:
      out[group] = word
    elif word in flags:
      out[word] = True
    else:
      known = [w for choices in groups.values() for w in choices] + list(flags)
      raise ValueError(f"{where}: unknown variant {word!r} (expected: {', '.join(known)})")
  return out


def model(**fields) -> ConfigDict:
  """``config.model``: ``rmjax.models.LlamaConfig`` fields, the architecture from ``fields``."""
  c = ConfigDict()
  c.init_from = ""  # HF folder or .gguf to import weights from ("" = random init)
  c.vocab_size = placeholder(int)
  c.dim = placeholder(int)
  c.num_layers = placeholder(int)
  c.num_heads = placeholder(int)
  c.num_kv_heads = placeholder(int)  # grouped-query attention
  c.head_dim = None  # None: dim // num_heads
  c.mlp_dim = placeholder(int)
  c.rope_theta = 10_000.0
  c.norm_eps = 1e-5
  c.qkv_bias = False  # True for Qwen2-style models
  # Family switches (docs/interop.md, Families). None: off for a new model, the checkpoint's
  # value with init_from (which always supplies them).
  c.sliding_window = placeholder(int)  # attend to at most this many latest tokens
  c.sliding_layers = placeholder(tuple)  # the windowed layers (None: all)
  c.qk_norm = placeholder(bool)  # Qwen3: RMSNorm on each head's queries and keys
  c.norm_plus_one = placeholder(bool)  # Gemma: RMSNorm scales by 1 + w
  c.sandwich_norms = placeholder(bool)  # Gemma 2: norms on the attention and MLP outputs too
  c.embed_scale = placeholder(bool)  # Gemma: embeddings times sqrt(dim)
  c.mlp_act = placeholder(str)  # gated MLP activation: 'silu' (default), 'gelu_tanh', 'gelu'
  c.attn_softcap = placeholder(float)  # Gemma 2: logits -> c·tanh(logits / c)
  c.query_pre_attn_scalar = placeholder(float)  # Gemma 2: softmax scale 1/sqrt(this)
  c.param_dtype = "float32"
  c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (weights stay param_dtype)
  # 'xla' (any backend), 'cudnn' (flash attention on NVIDIA GPUs, bf16 dtype) or 'splash'
  # (Pallas splash attention on TPUs); what runs where: docs/performance.md, Attention kernels
  c.attention = "xla"
  c.remat = "none"  # recompute activations per block: 'none', 'dots_saveable', 'full'
  c.scan_layers = False  # blocks as one lax.scan (one block in the program; docs/scale.md)
  return _set(c, "model", fields)


def loss(variant: str = "paper") -> ConfigDict:
  """``config.loss`` for an objective variant: ``paper`` (BT + paper contrastive), ``bt`` (BT
  only) or ``infonce`` (BT + in-batch InfoNCE, τ 0.1)."""
  c = ConfigDict()
  c.bt_weight = 1.0  # weight of the Bradley-Terry term
  c.beta = 0.5  # weight of the contrastive term (0 = BT only); paper: 0.5
  c.center_rewards = 0.0  # weight of mean((r_c + r_r)²), TRL's center_rewards_coefficient
  c.custom = ""  # extra terms: 'pkg.module:function=weight,...' called as fn(out, key)
  c.contrastive = ConfigDict()
  c.contrastive.mode = "paper"  # 'paper' (binary, per pair) or 'infonce' (in-batch)
  c.contrastive.goal = "random"  # 'random' future state, 'avg' of future states, 'final'
  c.contrastive.num_samples = 16  # S: source (and negative) states per sequence; paper: 16
  c.contrastive.num_goal_samples = 4  # future states averaged per goal when goal='avg'
  c.contrastive.temperature = 1.0  # τ: similarities are cos/τ
  c.contrastive.reduction = "mean_log"  # paper mode: 'mean_log', or the official 'log_mean'
  # with only BT and contrastive terms, run the last block at just the rows they read (the last
  # token, the sampled states): the same loss and gradients for a fraction of its cost
  c.sparse_last_block = True
  if variant == "bt":
    c.beta = 0.0
  elif variant == "infonce":
    c.contrastive.mode = "infonce"
    c.contrastive.temperature = 0.1
  elif variant != "paper":
    raise ValueError(f"loss variant {variant!r}: expected one of {LOSSES}")
  return c


def optim(**overrides) -> ConfigDict:
  """``config.optim``: AdamW with warmup + cosine decay (``rmjax.train_state.make_optimizer``)."""
  c = ConfigDict()
  c.lr = placeholder(float)  # peak learning rate
  c.warmup_steps = placeholder(int)  # linear warmup from 0
  c.final_lr_fraction = 0.1  # cosine decays to lr * this at the last step
  c.weight_decay = 0.01  # AdamW decay (matrices only)
  c.b1 = 0.9
  c.b2 = 0.95
  c.clip_norm = 1.0  # global gradient-norm clipping
  # non-finite updates are skipped; this many in a row stop the run with an error
  c.max_consecutive_nonfinite = 10
  return _set(c, "optim", overrides)


def train(**overrides) -> ConfigDict:
  """``config.train``: steps, batch, what is trained, and how often to log, evaluate and save."""
  c = ConfigDict()
  c.steps = placeholder(int)  # optimiser steps
  c.batch_size = 16  # pairs per step (global, over all devices and processes)
  c.accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.trainable_top_layers = -1  # -1: train everything; k >= 0: only the top k blocks (+ final
  # norm when k > 0) and the head, the rest frozen
  c.log_every = placeholder(int)  # steps between train metrics lines
  c.eval_every = placeholder(int)  # steps between held-out evaluations (and at the end)
  c.ckpt_every = placeholder(int)  # steps between checkpoints (and at the end)
  c.keep_checkpoints = 3  # newest checkpoints kept
  c.async_checkpointing = True  # save in the background while training continues
  return _set(c, "train", overrides)


def mesh() -> ConfigDict:
  """``config.mesh``: the device mesh and the logical-axis rules (``rmjax.sharding``)."""
  c = ConfigDict()
  c.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  # multi-slice: slices spanned by each axis over the data-centre network, e.g. '(2,1,1)' for
  # data parallelism across 2 TPU slices; mesh.shape is then the mesh within one slice
  c.dcn_shape = placeholder(tuple)
  c.rules = DEFAULT_RULES  # logical axis -> mesh axes (rmjax.sharding)
  return c
