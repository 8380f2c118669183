"""Cache a frozen backbone's hidden states once, for the loss lab (``rmjax.loss_lab``).

  python -m rmjax.cache_features --config=configs/gsm8k.py --layer=28 --out=features/gsm8k_l28 \
      [--splits=train,validation] [--limit=N] [--checkpoint=RUN_DIR]

For every pair of each split it stores the hidden states *entering* block ``--layer`` (``layer =
num_layers``: the final-norm output, for head-only training) of the chosen and rejected sequence,
with the tokens (to tell identical solutions apart), masks, response masks, margins and problem
ids. The backbone is the config's
(``model.init_from`` or random init) or a trained run's (``--checkpoint``); ``meta["backbone"]``
says which, so that ``rmjax.lab_export`` can join its lower blocks to a lab run's trained top.
Also saved: the parameters from block ``layer`` up (and the head), which the lab trains, and
``meta.json``.

Layout: ``OUT/meta.json``, ``OUT/top_params.npz``, ``OUT/<split>/<shard:05d>/<field>.npy``. Each
shard is written to a temporary folder and renamed when complete: a killed run resumes at the
first missing shard and never leaves a partial one; it refuses a cache of another layer, model
(architecture or weights: ``meta["weights_sha256"]``), data or tokenizer. A run that caches other
splits into the same folder adds them to ``meta["splits"]`` (the earlier ones stay). The disk size
is printed before it starts.

# N: pairs, L: sequence length, D: model dim
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading

import grain
import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from rmjax import sharding
from rmjax.checkpoint import write_json
from rmjax.data import sources
from rmjax.data.pipeline import eval_batches
from rmjax.models.llama import RUN_ONLY_FIELDS

FIELDS = ("features", "tokens", "mask", "response", "margin", "problem_id")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# data.* fields that do not change a split's examples (synthetic sizes: example i is the same)
DATA_EXEMPT = (*sources.PIPELINE_DEFAULTS, "train_size", "eval_size", "tfds_dir")


def top_param_paths(flat_params: dict, layer: int) -> list[str]:
  """Parameters the lab can train on features entering ``layer``: blocks >= layer, the final
  norm (when ``layer`` < num_layers) and the head."""
  num_layers = 1 + max(int(p.split("/")[2]) for p in flat_params if p.startswith("backbone/layers"))
  def keep(p):
    parts = p.split("/")
    return (parts[0] == "head" or (layer < num_layers and parts[1] == "final_norm")
            or (parts[1] == "layers" and int(parts[2]) >= layer))
  return [p for p in flat_params if keep(p)]


def weights_sha256(flat_params: dict) -> str:
  """A hash of every parameter's path, dtype, shape and bytes: which weights made the states."""
  h = hashlib.sha256()
  for path in sorted(flat_params):
    x = np.ascontiguousarray(jax.device_get(flat_params[path]))
    h.update(f"{path}:{x.dtype}:{x.shape};".encode())
    h.update(x.tobytes())
  return h.hexdigest()


class FeatureSource:
  """Random access to one cached split: ``source[i]`` is one pair's arrays (grain-compatible)."""

  def __init__(self, directory: str, split: str):
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    if split not in self.meta["splits"]:
      raise ValueError(f"{directory}: no cached split {split!r}; it has "
                       f"{sorted(self.meta['splits'])}")
    self.root = os.path.join(directory, split)
    self.shard_size = self.meta["shard_size"]
    self.n = self.meta["splits"][split]
    self._open: dict[int, dict] = {}
    self._lock = threading.Lock()  # grain reads from threads; np.load's header parse is not
    # thread-safe on CPython 3.11 ("AST constructor recursion depth mismatch")

  @staticmethod
  def splits(directory: str) -> dict[str, int]:
    """The cached splits of ``directory`` and their sizes in pairs."""
    with open(os.path.join(directory, "meta.json")) as f:
      return json.load(f)["splits"]

  def __getstate__(self):  # for grain worker processes: reopen the shards there
    return {**self.__dict__, "_open": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self) -> int:
    return self.n

  def shard(self, s: int) -> dict[str, np.ndarray]:
    with self._lock:
      if s not in self._open:
        folder = os.path.join(self.root, f"{s:05d}")
        if not os.path.isdir(folder):
          raise FileNotFoundError(f"{folder}: shard missing; rerun rmjax.cache_features to "
                                  "finish")
        self._open[s] = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r")
                         for k in FIELDS}
      return self._open[s]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < self.n:
      raise IndexError(i)
    arrays = self.shard(i // self.shard_size)
    return {k: np.asarray(v[i % self.shard_size]) for k, v in arrays.items()}

  def arrays(self) -> dict[str, np.ndarray]:
    """The whole split in memory (for evaluation)."""
    shards = [self.shard(s) for s in range(-(-self.n // self.shard_size))]
    return {k: np.concatenate([sh[k] for sh in shards])[:self.n] for k in FIELDS}


def backbone_record(checkpoint: str = "") -> dict:
  """Where the cached backbone comes from (``meta["backbone"]``): the config's model
  (``model.init_from``, or random init with ``seed``; both in ``meta["config"]``) or a trained
  run (its folder, as given to ``--checkpoint``)."""
  return {"checkpoint": os.path.abspath(checkpoint)} if checkpoint else {"config": True}


def cache(config, model, layer: int, out: str, splits=("train", "validation"), *,
          limit: int | dict = 0, batch_size: int = 8, dtype: str = "float32", mesh=None,
          checkpoint: str = "") -> dict:
  """Writes (or completes) the cache in ``out``; returns ``meta``. ``model`` is the frozen
  ``RewardModel``: the config's, or the run's at ``checkpoint`` (``backbone_record``); ``limit``
  > 0 keeps only the first ``limit`` pairs of each split (a dict: per split, 0 = all)."""
  cfg = model.backbone.cfg
  if not 0 <= layer <= cfg.num_layers:
    raise ValueError(f"--layer={layer}: expected 0..{cfg.num_layers} (num_layers = last layer)")
  tokenizer = sources.make_tokenizer(config)
  split_sources = {s: sources.make_source(config, s) for s in splits}
  limits = limit if isinstance(limit, dict) else {s: limit for s in splits}
  counts = {s: min(len(src), limits.get(s, 0)) if limits.get(s, 0) else len(src)
            for s, src in split_sources.items()}
  max_len, itemsize = config.data.max_len, np.dtype(DTYPES[dtype]).itemsize
  total = sum(counts.values()) * 2 * max_len * (cfg.dim * itemsize + 8)
  print(f"cache_features: {counts} pairs x 2 x {max_len} tokens x {cfg.dim} dims ({dtype}) "
        f"= {total / 2**30:.2f} GiB in {out}", flush=True)
  os.makedirs(out, exist_ok=True)
  flat = {"/".join(map(str, p)): v[...]
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  data = {k: v for k, v in config.data.to_dict().items() if k not in DATA_EXEMPT}
  meta = {"layer": layer, "max_len": max_len, "dtype": dtype, "shard_size": batch_size,
          "splits": counts, "model": dataclasses.asdict(cfg),
          "weights_sha256": weights_sha256(flat), "backbone": backbone_record(checkpoint),
          "data": data, "config": config.to_dict()}
  meta_path = os.path.join(out, "meta.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    # split sizes may change; how the backbone runs (remat, scan, attention kernel) does not
    # change its states
    same = ("layer", "max_len", "dtype", "shard_size", "model", "weights_sha256", "data")
    key = lambda m: {k: ({f: v for f, v in m[k].items() if f not in RUN_ONLY_FIELDS}
                         if k == "model" else m.get(k)) for k in same}
    new = json.loads(json.dumps(key(meta), default=str))  # as meta.json stores it
    differ = sorted(k for k in same if key(old)[k] != new[k])
    if differ:
      raise ValueError(f"{out}: holds a cache made with other settings ({', '.join(differ)} "
                       "differ); use another --out")
    meta["splits"] = {**old["splits"], **counts}  # splits cached by earlier runs stay readable
  write_json(meta_path, meta, default=str)

  np.savez(os.path.join(out, "top_params.tmp.npz"),
           **{p: np.asarray(jax.device_get(flat[p])) for p in top_param_paths(flat, layer)})
  os.replace(os.path.join(out, "top_params.tmp.npz"), os.path.join(out, "top_params.npz"))

  features = jax.jit(lambda t, m: model.backbone.features(t, m, layer))
  for split, src in split_sources.items():
    n = counts[split]
    subset = grain.MapDataset.source(src)[:n]
    batches = eval_batches(subset, tokenizer, global_batch_size=batch_size, max_len=max_len,
                           padding_side=config.data.padding_side)
    for s, (batch, n_real) in enumerate(tqdm(batches, total=-(-n // batch_size),
                                             desc=f"features[{split}]")):
      folder = os.path.join(out, split, f"{s:05d}")
      if os.path.isdir(folder):
        if len(np.load(os.path.join(folder, "mask.npy"), mmap_mode="r")) == n_real:
          continue  # finished by an earlier run
        shutil.rmtree(folder)  # the last shard of a run with another --limit
      b, _, l = batch["tokens"].shape
      tokens, mask = batch["tokens"].reshape(2 * b, l), batch["mask"].reshape(2 * b, l)
      if mesh is not None:
        tokens, mask = (sharding.host_to_global({"x": x}, mesh)["x"] for x in (tokens, mask))
      x = np.asarray(jax.device_get(features(tokens, mask)), np.float32)
      arrays = {"features": x.reshape(b, 2, l, -1).astype(DTYPES[dtype]),
                "tokens": batch["tokens"], "mask": batch["mask"], "response": batch["response"],
                "margin": batch["margin"],
                "problem_id": np.asarray([_problem(subset, s * batch_size + i)
                                          for i in range(b)], np.int64)}
      tmp = folder + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
      for k, v in arrays.items():
        np.save(os.path.join(tmp, f"{k}.npy"), v[:n_real] if n_real < b else v)
      os.replace(tmp, folder)
  return meta


def _problem(source, i: int) -> int:
  """The pair's problem id (for per-problem bootstrap); the pair index when there is none."""
  i = min(i, len(source) - 1)
  return int(source[i].get("problem_id", i))


def _cli():
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", None, "Config file [:arg].",
                                                lock_config=True)
  layer = flags.DEFINE_integer("layer", None, "Cache the states entering this block "
                               "(num_layers = the last layer's output).")
  out = flags.DEFINE_string("out", None, "Output folder.")
  splits = flags.DEFINE_list("splits", ["train", "validation"], "Splits to cache.")
  limit = flags.DEFINE_string("limit", "0", "At most this many pairs per split (0 = all), or "
                              "per split: 'train=400,validation=200'.")
  batch = flags.DEFINE_integer("batch_size", 8, "Pairs per forward pass (and per shard).")
  dtype = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Storage dtype of the states.")
  checkpoint = flags.DEFINE_string("checkpoint", "", "A trained run's backbone instead.")
  flags.mark_flags_as_required(["config", "layer", "out"])

  def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    from rmjax import train_state
    from rmjax.checkpoint import load_trained
    config = config_flag.value
    mesh = sharding.make_mesh((-1, 1, 1))
    with sharding.use_mesh(mesh):
      if checkpoint.value:
        _, model = load_trained(checkpoint.value, mesh)
      else:
        model, _ = train_state.merge(*train_state.create_state(config, mesh))
      limits = (int(limit.value) if "=" not in limit.value else
                {k: int(v) for k, v in (i.split("=") for i in limit.value.split(","))})
      meta = cache(config, model, layer.value, out.value, tuple(splits.value), limit=limits,
                   batch_size=batch.value, dtype=dtype.value, mesh=mesh,
                   checkpoint=checkpoint.value)
    print(json.dumps({"out": out.value, "layer": meta["layer"], "pairs": meta["splits"]}))

  app.run(main)


if __name__ == "__main__":
  _cli()
