"""Measuring tools of the benchmarks (``bench_train.py``): the machine's peak matmul rate, XLA's
cost analysis of a compiled step, a profile of one step by kind of op, and the machine's name."""
from __future__ import annotations

import os
import platform
import subprocess
import time

import numpy as np


class PeakMatmul:
  """A jitted ``n x n @ n x n`` matmul in the compute dtype; returns seconds per matmul."""

  def __init__(self, n: int, dtype: str):
    import jax
    import jax.numpy as jnp
    k1, k2 = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(k1, (n, n), dtype)
    self.b = jax.random.normal(k2, (n, n), dtype)
    self.mm = jax.jit(jnp.matmul)
    self.flops = 2 * n ** 3
    self.mm(self.a, self.b).block_until_ready()

  def __call__(self, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      self.mm(self.a, self.b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    return best


def xla_cost(compiled) -> tuple[float, float]:
  """XLA's count of FLOPs and bytes accessed by one execution of a compiled step."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", np.nan)), float(cost.get("bytes accessed", np.nan))


def profile(step) -> None:
  """Traces one call of ``step`` (a timed rmjax step; returns its seconds) and sums op time by
  kind: XLA:CPU's worker threads (ops run on several threads: sums exceed wall), or a GPU's
  kernels (the "XLA Ops" line, else every stream)."""
  import collections
  import glob
  import tempfile

  import jax
  from jax.profiler import ProfileData
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    wall = step()
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  on_cpu = jax.default_backend() == "cpu"
  lines = [(p.name, line) for p in data.planes for line in p.lines]
  if on_cpu:  # XLA's worker threads; not Python's
    lines = [line for _, line in lines if line.name.startswith("tf_XLA")]
  else:
    gpu = [(p, line) for p, line in lines if p.startswith("/device:GPU")]
    ops = [line for _, line in gpu if line.name == "XLA Ops"]
    lines = ops or [line for _, line in gpu if line.name.startswith("Stream")]
    if not lines:
      print("profile: no GPU op lines in the trace; lines seen: "
            + ", ".join(sorted({f"{p}/{line.name}" for p, line in gpu})))
      return
  by_op = collections.Counter()
  for line in lines:
    for e in line.events:
      if not e.name.startswith(("Threadpool", "end:", "Slinky", "ThunkExecutor")):
        by_op[e.name] += e.duration_ns / 1e9
  matmul = ("ynn_fusion", "dot", "gemm", "cublas", "matmul", "cutlass", "xmma", "nvjet")
  kind = lambda op: ("attention (cuDNN)" if any(k in op.lower() for k in ("fmha", "cudnn", "flash"))
                     else "matmul" if any(k in op.lower() for k in matmul) else
                     "layout copy / transpose" if "copy" in op or "transpose" in op else
                     "elementwise, reductions, rest")
  by_kind = collections.Counter()
  for op, t in by_op.items():
    by_kind[kind(op)] += t
  total = sum(by_kind.values())
  print(f"profile of one rmjax BT step ({wall * 1e3:.1f} ms wall, {total * 1e3:.1f} ms summed "
        "over ops):")
  for k, t in by_kind.most_common():
    print(f"  {k:30s} {t * 1e3:8.1f} ms  {t / total:6.1%}")
  print("  top ops: " + ", ".join(f"{op[:60]} {t * 1e3:.1f} ms" for op, t in by_op.most_common(8)))


def machine() -> str:
  import jax
  if jax.default_backend() != "cpu":
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})"
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.startswith("Model name")), platform.processor())
  return f"{name}, {os.cpu_count()} cores"
