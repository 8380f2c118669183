"""Training throughput: rmjax vs PyTorch ``transformers``, MFU, and the contrastive term's cost.

  python scripts/bench_train.py                      # SmolLM2-135M shape, 4 of its 30 layers
  python scripts/bench_train.py --layers=30 --losses=bt --steps=2    # the whole 135M model
  python scripts/bench_train.py --layers=2 --seq=64 --steps=1 --no_torch   # smoke run
  python scripts/bench_train.py --profile            # + where one rmjax step's time goes (CPU)
  python scripts/bench_train.py --layers=30 --pairs=16 --seq=1024 --dtype=bfloat16 \
      --attention=cudnn --steps=20                   # on an NVIDIA GPU: bf16, flash attention
  python scripts/bench_train.py --losses=bt --no_torch --vs=remat=full,scan_layers=true
                                                     # settings against the BT step, same rounds

# B: pairs, L: sequence length

One process times every contestant once per round (the rmjax train step with BT only, BT + paper
contrastive (beta=0.5) and BT + InfoNCE (beta=0.5); the PyTorch step; a large matmul for the peak),
so that all of them see the same load on a shared machine; it reports medians, and medians of
per-round ratios for the comparisons. Each contestant is compiled and warmed up before round 1.

The rmjax step is ``rmjax.train.make_train_step`` exactly as ``rmjax.main`` runs it (jitted,
state donated, AdamW + global-norm clipping + apply_if_finite). The PyTorch step is
``LlamaForSequenceClassification`` with the same shapes (num_labels=1, SDPA attention), the same
BT loss on the chosen/rejected rewards, ``clip_grad_norm_`` and ``torch.optim.AdamW`` (fused),
eager mode, on the device JAX uses (CPU: ``torch.set_num_threads(os.cpu_count())``; GPU: CUDA).
With ``--dtype=bfloat16`` both keep fp32 weights, gradients and Adam state and compute in bf16
(rmjax: ``model.dtype``; PyTorch: ``torch.autocast``, where SDPA picks flash attention).

Model FLOPs per token (PaLM, appendix B): ``6 * N + 12 * layers * heads * head_dim * L`` where N
counts the non-embedding parameters (the input embedding is a gather, not a matmul) and the second
term is the attention scores and values, forward + backward, without causal savings (XLA and SDPA
compute the full L x L block). MFU = achieved model FLOP/s / peak, per round, then the median; the
peak is that round's FLOP/s of a jitted square matmul in the compute dtype (best of 3; 2048² on
CPU, 8192² on an accelerator), or ``--peak_tflops`` for a named accelerator.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import numpy as np
from absl import app, flags

from bench_measure import PeakMatmul, machine, profile, xla_cost  # beside this file

_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers (SmolLM2-135M has 30).")
_SEQ = flags.DEFINE_integer("seq", 256, "L: tokens per sequence.")
_PAIRS = flags.DEFINE_integer("pairs", 4, "B: preference pairs per step (2B sequences).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed rounds (one step of every contestant each).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "rmjax compute dtype.")
_VOCAB = flags.DEFINE_integer("vocab", 49152, "Vocabulary size.")
_DIM = flags.DEFINE_integer("dim", 576, "Model dim.")
_HEADS = flags.DEFINE_integer("heads", 9, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 3, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim.")
_MLP = flags.DEFINE_integer("mlp", 1536, "MLP hidden dim.")
_ROPE_THETA = flags.DEFINE_float("rope_theta", 1e5, "RoPE base.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "Named accelerator peak (TFLOP/s) instead of the measured one.")
_PEAK_N = flags.DEFINE_integer("peak_n", None, "Size of the square matmul that measures the "
                               "peak (default 2048 on CPU, 8192 on an accelerator).")
_LOSSES = flags.DEFINE_list("losses", ["bt", "paper", "infonce"],
                           "rmjax objectives to time: bt (BT only), paper (+ beta=0.5 paper "
                           "contrastive), infonce (+ beta=0.5 in-batch InfoNCE); bt is required.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the PyTorch comparison.")
_SPARSE = flags.DEFINE_bool("sparse_last_block", True,
                            "loss.sparse_last_block, on by default as in rmjax.main (the last "
                            "block runs at the last token and the sampled states only); MFU "
                            "counts the full model's FLOPs either way.")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "cudnn"],
                                "model.attention: 'cudnn' = flash attention (NVIDIA GPU, bf16).")
_SCAN = flags.DEFINE_bool("scan_layers", False, "model.scan_layers (prints the compile time).")
_VS = flags.DEFINE_list("vs", [], "Model settings to set against the BT step in the same rounds, "
                        "each field=value (e.g. attention=xla,scan_layers=true): one more BT "
                        "contestant per entry, reported by compile time and tokens/s ratio.")
_PROFILE = flags.DEFINE_bool("profile", False,
                             "Trace one rmjax BT step (jax.profiler) and print where its time "
                             "goes: matmuls, layout copies, the rest.")


def config_for(variant: str, **model_fields):
  from configs import synthetic
  c = synthetic.get_config(variant)
  c.model.update(vocab_size=_VOCAB.value, dim=_DIM.value, num_layers=_LAYERS.value,
                 num_heads=_HEADS.value, num_kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
                 mlp_dim=_MLP.value, rope_theta=_ROPE_THETA.value, dtype=_DTYPE.value,
                 scan_layers=_SCAN.value, attention=_ATTENTION.value)
  c.model.update(model_fields)
  c.loss.sparse_last_block = _SPARSE.value
  c.train.batch_size = _PAIRS.value
  c.mesh.shape = (1, 1, 1)
  return c


def parse_vs(entries: list[str]) -> dict[str, dict]:
  """``--vs`` entries -> {contestant name: model fields}; values parse as ``--config.model.k=v``
  does (``rmjax.config_tools.override``), checked against the model config's fields and types."""
  from rmjax.config_tools import override
  model = config_for("bt").model
  out = {}
  for entry in entries:
    key, sep, raw = entry.partition("=")
    if not sep or key not in model:
      raise app.UsageError(f"--vs entry {entry!r}: expected field=value with a model field "
                           f"({', '.join(sorted(model.keys()))})")
    try:
      value = override(config_for("bt").model, {key: raw})[key]
      c = config_for("bt", **{key: value})
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"--vs entry {entry!r}: {e}") from e
    out[f"rmjax bt {key}={c.model[key]}"] = {key: value}
  return out


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length pairs of random tokens (never the pad id 0); the first quarter is the prompt."""
  b, l = _PAIRS.value, _SEQ.value
  rng = np.random.default_rng(seed)
  response_L = (np.arange(l) >= l // 4).astype(np.int32)
  return {"tokens": rng.integers(1, _VOCAB.value, size=(b, 2, l), dtype=np.int32),
          "mask": np.ones((b, 2, l), np.int32),
          "response": np.broadcast_to(response_L, (b, 2, l)).copy(),
          "margin": np.zeros((b,), np.float32)}


def flops_per_token(n_nonembed: int) -> float:
  return 6 * n_nonembed + 12 * _LAYERS.value * _HEADS.value * _HEAD_DIM.value * _SEQ.value


def host_random_state(config, mesh):
  """The train state with weights drawn on the host (N(0, 0.02²); norm scales 1; optimiser
  state 0) and placed with the state's shardings. Timing does not need rmjax's initialisers
  (create_state's random init times: docs/performance.md, Initialisation)."""
  import jax

  from rmjax import train_state
  graphdef, abstract = train_state.abstract_state(config, mesh)
  rng = np.random.default_rng(0)

  def fill(path, x):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys[0] != "model" or x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
      value = np.zeros(x.shape, x.dtype)
    elif any("norm" in k for k in keys):
      value = np.ones(x.shape, x.dtype)
    else:
      value = (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)
    return jax.device_put(value, x.sharding)
  return graphdef, jax.tree.map_with_path(fill, abstract)


class JaxStep:
  """One jitted, donated rmjax train step; calling it runs a step and returns its seconds."""

  def __init__(self, variant: str, batch, mesh, **model_fields):
    import jax
    from flax import nnx

    from rmjax import train
    config = config_for(variant, **model_fields)
    self.graphdef, self.state = host_random_state(config, mesh)
    step = train.jit_train_step(self.graphdef, config,
                                jax.tree.map(lambda x: x.sharding, self.state))
    self.batch = jax.device_put(batch)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    params = nnx.state(nnx.merge(self.graphdef, self.state)["model"], nnx.Param)
    self.n_params = sum(x.size for x in jax.tree.leaves(params))
    self.n_embed = params["backbone"]["embed"]["embedding"].size

  def __call__(self) -> float:
    import jax
    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


class TorchStep:
  """The same step in PyTorch ``transformers``: LlamaForSequenceClassification, BT, AdamW."""

  def __init__(self, batch, device: str):
    import torch
    import transformers
    if device == "cpu":
      torch.set_num_threads(os.cpu_count())
    self.device = torch.device(device)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=_VOCAB.value, hidden_size=_DIM.value, intermediate_size=_MLP.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value,
        num_key_value_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
        rope_theta=_ROPE_THETA.value, rms_norm_eps=1e-5, tie_word_embeddings=True,
        num_labels=1, pad_token_id=0, attn_implementation="sdpa")
    self.torch = torch
    self.model = transformers.LlamaForSequenceClassification(cfg).to(self.device).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                   enabled=_DTYPE.value == "bfloat16")
    b, _, l = batch["tokens"].shape
    to = lambda x: torch.from_numpy(x.reshape(2 * b, l)).long().to(self.device)
    self.tokens_2BxL, self.mask_2BxL = to(batch["tokens"]), to(batch["mask"])

  def __call__(self) -> float:
    torch = self.torch
    t0 = time.perf_counter()
    with self.autocast:
      reward_Bx2 = self.model(input_ids=self.tokens_2BxL,
                              attention_mask=self.mask_2BxL).logits.reshape(-1, 2).float()
    loss = -torch.nn.functional.logsigmoid(reward_Bx2[:, 0] - reward_Bx2[:, 1]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv):
  del argv
  # JAX allocates on demand: PyTorch shares the accelerator, and on an H200 the 135M step was
  # slower with JAX's default preallocation (docs/performance.md, Preallocation)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  from rmjax import sharding
  if "bt" not in _LOSSES.value:
    raise app.UsageError("--losses must include bt (the baseline of every comparison)")
  vs = parse_vs(_VS.value)
  batch = random_batch()
  tokens_per_step = 2 * _PAIRS.value * _SEQ.value
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    contestants = {f"rmjax {v}": JaxStep(v, batch, mesh) for v in _LOSSES.value}
    contestants.update((name, JaxStep("bt", batch, mesh, **fields)) for name, fields in vs.items())
    print(f"built and compiled {len(contestants)} rmjax steps in {time.perf_counter() - t0:.1f} s "
          f"(the step compiles alone: " + ", ".join(f"{k} {c.compile_s:.1f} s" for k, c in
                                                      contestants.items()) + ")", flush=True)
    bt = contestants["rmjax bt"]
    on_cpu = jax.default_backend() == "cpu"
    if not _NO_TORCH.value:
      contestants["torch bt"] = TorchStep(batch, "cpu" if on_cpu else "cuda")
    peak_n = _PEAK_N.value or (2048 if on_cpu else 8192)
    if _PEAK_TFLOPS.value is None:
      contestants["peak"] = PeakMatmul(peak_n, _DTYPE.value)
    for run in contestants.values():  # warm-up: first-call allocations, fused AdamW state
      run()
    if _PROFILE.value:
      profile(bt)
    times = {name: [] for name in contestants}
    for r in range(_STEPS.value):
      for name, run in contestants.items():
        times[name].append(run())
      print(f"round {r + 1}/{_STEPS.value}: " +
            ", ".join(f"{n} {times[n][-1]:.3f} s" for n in contestants), flush=True)

  t = {name: np.asarray(ts) for name, ts in times.items()}
  med = {name: float(np.median(ts)) for name, ts in t.items()}
  n_nonembed = bt.n_params - bt.n_embed
  step_flops = flops_per_token(n_nonembed) * tokens_per_step
  xla = {name: xla_cost(c.compiled) for name, c in contestants.items() if name.startswith("rmjax")}
  if _PEAK_TFLOPS.value is None:  # per round, so that the step and its peak share the load
    peak_R = contestants["peak"].flops / t["peak"]
    peak_desc = f"jitted {peak_n}^2 {_DTYPE.value} matmul, best of 3 in each round"
  else:
    peak_R = np.full(_STEPS.value, _PEAK_TFLOPS.value * 1e12)
    peak_desc = "named with --peak_tflops"
  achieved_R = step_flops / t["rmjax bt"]
  mfu = float(np.median(achieved_R / peak_R))
  tok_s = tokens_per_step / med["rmjax bt"]

  print(f"\nmodel: {_LAYERS.value} layers, dim {_DIM.value}, {_HEADS.value}/{_KV_HEADS.value} "
        f"heads x {_HEAD_DIM.value}, mlp {_MLP.value}, vocab {_VOCAB.value}: "
        f"{bt.n_params / 1e6:.1f}M params ({n_nonembed / 1e6:.1f}M non-embedding); "
        f"{_PAIRS.value} pairs x 2 x {_SEQ.value} = {tokens_per_step} tokens/step; "
        f"{_DTYPE.value}; {machine()}")
  attn_per_token = step_flops / tokens_per_step - 6 * n_nonembed
  print(f"model FLOPs/token {step_flops / tokens_per_step / 1e6:.1f} M = 6 x "
        f"{n_nonembed / 1e6:.1f}M + attention {attn_per_token / 1e6:.1f}M (XLA counts "
        f"{xla['rmjax bt'][0] / tokens_per_step / 1e6:.1f} M in the compiled BT step)")
  width = max(map(len, contestants))
  for name in contestants:
    if name != "peak":
      print(f"{name:{width}s} step {med[name]:7.3f} s (min {t[name].min():.3f}, max "
            f"{t[name].max():.3f})  {tokens_per_step / med[name]:8.1f} tokens/s")
  print(f"peak {np.median(peak_R) / 1e9:.1f} GFLOP/s median, {np.max(peak_R) / 1e9:.1f} max "
        f"({peak_desc})")
  print(f"rmjax BT achieved {np.median(achieved_R) / 1e9:.1f} GFLOP/s; MFU {mfu:.1%} "
        f"(median over rounds of achieved / that round's peak)")
  overhead = {}
  for v in _LOSSES.value:
    if v != "bt":
      overhead[v] = float(np.median(t[f"rmjax {v}"] / t["rmjax bt"]) - 1)
      f, b = (x / y - 1 for x, y in zip(xla[f"rmjax {v}"], xla["rmjax bt"]))
      print(f"contrastive overhead, {v}: {overhead[v]:+.1%} step time (median of per-round "
            f"ratios); XLA FLOPs {f:+.2%}, bytes accessed {b:+.2%}")
  for name in vs:
    print(f"{name}: compiled in {contestants[name].compile_s:.1f} s (rmjax bt "
          f"{bt.compile_s:.1f} s); tokens/s {np.median(t['rmjax bt'] / t[name]):.2f}x rmjax bt's "
          "(median of per-round ratios)")
  summary = [f"`python scripts/bench_train.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             machine(), str(datetime.date.today()), f"rmjax {tok_s:.0f} tok/s"]
  if "torch bt" in t:
    ratio = float(np.median(t["torch bt"] / t["rmjax bt"]))
    print(f"rmjax / PyTorch tokens/s: {ratio:.2f}x (median of per-round ratios)")
    summary += [f"torch {tokens_per_step / med['torch bt']:.0f} tok/s", f"ratio {ratio:.2f}x"]
  summary.append(f"MFU {mfu:.0%} of {np.median(peak_R) / 1e9:.0f} GFLOP/s")
  summary += [f"contrastive {v} {o:+.0%}" for v, o in overhead.items()]
  print("README row: | " + " | ".join(summary) + " |")


if __name__ == "__main__":
  app.run(main)
