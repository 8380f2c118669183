"""Random-weight reward models shaped like public LLMs, for sizing TPU pods (``rmjax.aot``).

  python -m rmjax.aot --config=configs/pod.py:8b --topology=v5p-128
  python -m rmjax.aot --config=configs/pod.py:70b,bt --topology=v5p-128 \
      --config.train.batch_size=64 --config.data.max_len=4096
Variants (``:arg``, comma-separated): the shape, ``1b`` (Llama-3.2-1B, default), ``8b``
(Llama-3.1-8B), ``32b`` (Qwen2.5-32B) or ``70b`` (Llama-3.1-70B); the objective, ``paper``
(default), ``bt`` or ``infonce``; ``tiny`` for a 2-layer d-64 model that trains on a CPU.
Sized for TPU pods: bf16 compute with fp32 master weights, ``remat=full``, ``scan_layers``,
sequences of 2048 tokens, FSDP over every chip (``mesh.shape=(1,-1,1)``), 256 pairs: 4 per chip
on v5p-128's 64 chips. ``train.batch_size`` is pairs per chip x chips. FSDP gathers every weight
once per step, so 1 pair per chip is a small batch: on v5p-128 the 8b's estimated MFU is 59.3% at 1
pair per chip and 70.3% at 4 (24 of 95 GiB). Where HBM is smaller, fewer: the 8b on v5e-256 was
compiled at 1 pair per chip (5.8 of 16 GiB). On TPUs ``--config.model.attention=splash`` (the
defaults stay ``xla``, which every backend runs, so that the published commands reproduce) keeps no
L x L logits: the 8b then fits ``remat=dots_saveable`` at 4 pairs per chip (51 of 95 GiB, 92.1%).
docs/scale.md has the measured rows; ``rmjax.aot --search`` finds the largest per-chip batch that
fits. The data are the embedded synthetic pairs (byte tokens): shapes and memory, not a task.
"""
from ml_collections import ConfigDict

from configs import common, synthetic

# (vocab, dim, layers, heads, kv heads, head dim, mlp, rope theta, qkv bias): the HF configs
SHAPES = {
    "1b": (128256, 2048, 16, 32, 8, 64, 8192, 500_000.0, False),
    "8b": (128256, 4096, 32, 32, 8, 128, 14336, 500_000.0, False),
    "32b": (152064, 5120, 64, 40, 8, 128, 27648, 1_000_000.0, True),
    "70b": (128256, 8192, 80, 64, 8, 128, 28672, 500_000.0, False),
}


def get_config(arg: str | None = None) -> ConfigDict:
  a = common.parse_arg(arg, "configs/pod.py", shape=tuple(SHAPES), loss=common.LOSSES,
                       flags=("tiny",))
  c = synthetic.get_config(a.loss)
  vocab, dim, layers, heads, kv, hd, mlp, theta, bias = SHAPES[a.shape]
  c.model = common.model(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads,
                         num_kv_heads=kv, head_dim=hd, mlp_dim=mlp, rope_theta=theta,
                         qkv_bias=bias, dtype="bfloat16", remat="full", scan_layers=True)
  c.data.max_len = 2048
  c.train.batch_size = 256
  c.mesh.shape = (1, -1, 1)
  if a.tiny:  # the same code path, small enough for this CPU (rmjax.main, a few seconds)
    c.model = common.model(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=128, remat="full", scan_layers=True)
    c.data.max_len, c.data.train_size, c.data.eval_size = 48, 256, 64
    c.train.steps, c.train.batch_size = 4, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 4, 4
    c.optim.warmup_steps = 2
  return c
