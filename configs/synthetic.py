"""Demo recipe: a tiny byte-level Llama reward model on the embedded synthetic math pairs.

  python -m rmjax.main --config=configs/synthetic.py --workdir=/tmp/rm_demo
  python -m rmjax.main --config=configs/synthetic.py:bt --workdir=/tmp/rm_bt   # BT only
  python -m rmjax.main --config=configs/synthetic.py:infonce --workdir=...      # in-batch negatives
Variants (``:arg``): ``paper`` (default, BT + paper contrastive), ``bt``, ``infonce``; append
``,tiny`` (e.g. ``paper,tiny``) for a seconds-long smoke run. Sized for any CPU (a few MiB).
"""
from ml_collections import ConfigDict

from configs import common


def get_config(arg: str | None = None) -> ConfigDict:
  a = common.parse_arg(arg or "paper", "configs/synthetic.py", loss=common.LOSSES, flags=("tiny",))
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
  c.data.convention = ""  # 'rmjax' (EOS appended), 'hf'; '': hf iff init_from is a classifier
  c.data.buckets = ()  # batch lengths (one compiled step each); () = max_len only
  # 'pairs': a row per sequence (one compiled shape: the tiny runs' compile time dominates);
  # 'shared_prompt': a row per pair, the common prefix once; 'packed': several such pairs per
  # row (data.pack_len); same loss (docs/data.md)
  c.data.layout = "pairs"
  c.data.sort_window = 1  # batches sorted by length together (1 = no sorting)
  c.data.num_threads = 0  # threads reading + tokenising ahead of the train step (0 = none)
  c.data.num_workers = 0  # worker processes (grain mp_prefetch); 0 = in the main process

  c.model = common.model(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=256)
  c.loss = common.loss(a.loss)
  c.optim = common.optim(lr=3e-3, warmup_steps=50, b2=0.98)
  c.train = common.train(steps=2000, log_every=50, eval_every=500, ckpt_every=500)
  c.mesh = common.mesh()

  if a.tiny:
    c.data.train_size, c.data.eval_size = 256, 64
    c.model.dim, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
    c.train.steps, c.train.batch_size = 8, 8
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 4, 4
    c.optim.warmup_steps = 2
  return c
