"""Pod scale without a pod: the trainer's step compiled for a TPU topology on this host (libtpu).

  python -m rmjax.aot --config=configs/synthetic.py:paper,tiny --topology=v5e:2x2 \
      --config.mesh.shape='(1,4,1)'
  python -m rmjax.aot --config=... --topology=v5p-128 --num_slices=2 --config.mesh.dcn_shape='(2,1,1)'
  python -m rmjax.aot --config=... --topology=v5litepod-256 --search   # largest batch, cheapest remat

Compiles ``rmjax.train.jit_train_step`` (``rmjax.memory.compile_step``: the trainer's function and
shardings) for the topology's devices, and prints per chip: XLA's argument / output / temp bytes
against the chip's HBM, the compiler's FLOPs and bytes, the collectives of one step in the
optimised HLO, a roofline step time with MFU and tokens/s/chip, and ``rmjax.memory.plan`` beside
them; the last line is one JSON object. Needs libtpu: ``pip install -e '.[tpu]'``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

from absl import app, flags
from ml_collections import config_flags

from rmjax import hlo as hlo_lib

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system architecture pages, docs.cloud.google.com/tpu/
  docs/v5e, /v5p, /v6e): HBM, bf16 peak, HBM bandwidth, bidirectional ICI bandwidth, DCN
  bandwidth (v5e: 2 x 100 Gbps per 8-chip host; v5p: 50 Gbps per chip; v6e: 4 x 200 Gbps per
  8-chip host)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bw: float  # bytes/s
  ici_bw: float  # bytes/s, bidirectional, all links of a chip
  dcn_bw: float  # bytes/s per chip


CHIPS = {
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, 400e9, 200e9 / 8 / 8),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, 1200e9, 50e9 / 8),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, 800e9, 800e9 / 8 / 8),
}
# chips -> topology of the slice shapes Cloud TPU offers (accelerator types v5litepod-N / v6e-N:
# N chips; v5p-N: N TensorCores, N/2 chips)
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
       6144: "16x16x24"}
ACCELERATORS = {**{f"v5litepod-{n}": ("v5e", t) for n, t in _2D.items()},
                **{f"v5e-{n}": ("v5e", t) for n, t in _2D.items()},
                **{f"v6e-{n}": ("v6e", t) for n, t in _2D.items()},
                **{f"v5p-{2 * n}": ("v5p", t) for n, t in _3D.items()}}
# XLA:TPU flags of MaxText's v5p recipes (configs/v5p/32b.sh, llama2_70b.sh: async collective
# fusion, all-gathers fused and overlapped with compute, data-parallel all-reduce optimisation)
MAXTEXT_ARGS = " ".join(f"--xla_{f}=true" for f in (
    "tpu_enable_async_collective_fusion_fuse_all_gather", "enable_async_collective_permute",
    "tpu_enable_ag_backward_pipelining", "tpu_enable_data_parallel_all_reduce_opt",
    "tpu_data_parallel_opt_different_sized_ops", "tpu_enable_async_collective_fusion",
    "tpu_enable_async_collective_fusion_multiple_steps", "tpu_overlap_compute_collective_tc",
    "enable_async_all_gather")) + " --xla_tpu_megacore_fusion_allow_ags=false"
INSTALL = "pip install -e '.[tpu]' (jax[tpu] at the installed jax's version: brings libtpu)"


def parse_topology(name: str) -> tuple[str, str]:
  """``v5p:4x4x4`` or an accelerator type ``v5p-128`` -> (chip generation, JAX topology name)."""
  if name in ACCELERATORS:
    gen, shape = ACCELERATORS[name]
    return gen, f"{gen}:{shape}"
  m = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
  if m is None or (m.group(1) == "v5p") != (m.group(2).count("x") == 2):
    examples = ", ".join(["v5e:2x2", "v5e:16x16", "v5p:4x4x4", "v6e:8x8"])
    raise ValueError(f"unknown TPU topology {name!r}: give a JAX topology name (v5e/v6e: AxB, "
                     f"v5p: AxBxC; e.g. {examples}) or a Cloud TPU accelerator type, one of "
                     f"{', '.join(ACCELERATORS)}")
  return m.group(1), name


def topology_devices(name: str, num_slices: int = 1):
  """(Chip, JAX topology name, the topology's devices) for ``name`` (``parse_topology``)."""
  gen, topo = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(f"compiling for TPU topology {name!r} needs libtpu, not installed: "
                       f"{INSTALL}")
  # compiling only, never running: let several processes load libtpu (else its lockfile refuses)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(topology_name=topo, platform="tpu", num_slices=num_slices)
  return CHIPS[gen], topo, list(desc.devices)


def mesh_for(config, devices, num_slices: int):
  """The trainer's mesh (``config.mesh``) over the topology's devices; several slices without
  ``mesh.dcn_shape`` are data parallel across slices (``dcn_shape=(num_slices, 1, 1)``)."""
  from rmjax import sharding
  dcn = config.mesh.get("dcn_shape")
  if dcn is None and num_slices > 1:
    dcn = (num_slices, 1, 1)
  try:
    return sharding.make_mesh(config.mesh.shape, devices, dcn_shape=dcn), dcn
  except ValueError as e:
    raise ValueError(f"{e} (the topology has {len(devices)} chips in {num_slices} slice(s); "
                     "set --config.mesh.shape, and --config.mesh.dcn_shape for slices)") from e


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of the dense model (6 x matmul weights + 12 x layers x attention
  width x sequence, as PaLM's MFU); embeddings excluded, the sparse last block not credited."""
  hd = cfg.head_dim or cfg.dim // cfg.num_heads
  per_layer = cfg.dim * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * cfg.dim * cfg.mlp_dim
  return 6 * (cfg.num_layers * per_layer + cfg.dim) + 12 * cfg.num_layers * cfg.num_heads * hd * seq_len


def _oom_bytes(message: str) -> int | None:
  m = re.search(r"[Ee]xceeded hbm capacity by ([\d.]+)([KMGT]?)", message)
  if m is None:
    return None
  return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def analyse(config, topology: str, num_slices: int = 1, hlo_out: str | None = None) -> dict:
  """Compiles the step for ``topology`` and returns the report's figures (``REPORT_KEYS``);
  ``hlo_out``: also write the optimised HLO text there (to re-read its collectives later)."""
  from rmjax import memory, train_state
  chip, topo, devices = topology_devices(topology, num_slices)
  mesh, dcn = mesh_for(config, devices, num_slices)
  shape = tuple(int(s) // int(d) for s, d in zip(mesh.devices.shape, dcn or (1, 1, 1)))
  plan = memory.plan(config, shape, dcn, backend="tpu")
  out = {"topology": topo, "chip": chip.name, "num_slices": num_slices, "num_chips": len(devices),
         "mesh_shape": list(shape), "dcn_shape": list(dcn) if dcn else None,
         "hbm_bytes_per_chip": chip.hbm_bytes, "plan_bytes": plan.total,
         "plan": dataclasses.asdict(plan), "libtpu_args": os.environ.get("LIBTPU_INIT_ARGS")}
  start = time.perf_counter()
  try:
    compiled = memory.compile_step(config, mesh)
  except Exception as e:  # XLA:TPU refuses a program over the HBM at compile time
    if "RESOURCE_EXHAUSTED" not in str(e) and "hbm" not in str(e).lower():
      raise
    over = _oom_bytes(str(e))
    out.update(fits=False, compile_s=time.perf_counter() - start, error=str(e).splitlines()[0],
               over_bytes=over)
    return out
  out["compile_s"] = time.perf_counter() - start
  stats, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  used = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)
  hlo = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo)
  colls = hlo_lib.collectives(hlo, num_slices)
  for row in colls:  # at the chip's ICI (all links, one direction) or DCN bandwidth
    row["est_s"] = row["moved_bytes"] / (chip.dcn_bw if row["network"] == "dcn" else chip.ici_bw / 2)
  params = hlo_lib.entry_parameters(hlo)
  flops, bytes_accessed = float(cost.get("flops", 0)), float(cost.get("bytes accessed", 0))
  tokens = config.train.batch_size * 2 * config.data.max_len
  model_flops = tokens * model_flops_per_token(train_state.model_config(config), config.data.max_len)
  # XLA's cost analysis counts a loop body once (model.scan_layers): never below the FLOPs the
  # chip runs, the model's plus remat='full''s second forward pass (6 -> 8 per weight and token)
  recompute = 8 / 6 if config.model.remat == "full" else 1.0
  compute_s = max(flops, recompute * model_flops / len(devices)) / chip.peak_flops
  hbm_s = bytes_accessed / chip.hbm_bw
  coll_s = sum(c["est_s"] for c in colls)
  step_s = max(compute_s, hbm_s) + coll_s
  out.update(
      model_flops_per_chip=model_flops / len(devices),
      fits=used <= chip.hbm_bytes, used_bytes=used, margin_bytes=chip.hbm_bytes - used,
      argument_bytes=stats.argument_size_in_bytes,
      argument_unpadded_bytes=sum(p[2] for p in params), output_bytes=stats.output_size_in_bytes,
      alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
      code_bytes=stats.generated_code_size_in_bytes, flops_per_chip=flops,
      bytes_accessed_per_chip=bytes_accessed, collectives=colls,
      collective_bytes=sum(c["bytes"] for c in colls),
      dcn_collective_bytes=sum(c["bytes"] for c in colls if c["network"] == "dcn"),
      compute_s=compute_s, hbm_s=hbm_s, collective_s=coll_s, est_step_s=step_s,
      est_mfu=model_flops / len(devices) / step_s / chip.peak_flops,
      tokens_per_s_per_chip=tokens / len(devices) / step_s)
  if not out["fits"]:
    out["over_bytes"] = used - chip.hbm_bytes
  return out


def levers(config, out: dict) -> list[tuple[str, int]]:
  """(lever, bytes per chip it saves by ``rmjax.memory.plan``) for the usual memory levers."""
  from rmjax import memory
  dcn = out["dcn_shape"]
  return [(flag, out["plan_bytes"] - memory.plan(c, shape, dcn, backend="tpu").total)
          for flag, c, shape in memory.levers(config, tuple(out["mesh_shape"]))]


def _gib(b) -> str:
  if b is None:
    return "        ?    "
  power = max(0, min(3, int(math.log(max(abs(b), 1), 1024))))
  return f"{b / 1024 ** power:9.3f} {('B', 'KiB', 'MiB', 'GiB')[power]:<3}"


def report(config, out: dict) -> str:
  """The readable table of ``analyse``'s figures."""
  lines = [f"{out['chip']} {out['topology']} x {out['num_slices']} slice(s): {out['num_chips']} "
           f"chips, mesh {tuple(out['mesh_shape'])}"
           + (f" x dcn {tuple(out['dcn_shape'])}" if out["dcn_shape"] else "")
           + f"; compiled in {out['compile_s']:.1f} s",
           "", "memory per chip          XLA            plan (rmjax.memory)"]
  p = out["plan"]
  if "argument_bytes" in out:
    lines += [f"  arguments      {_gib(out['argument_bytes'])}  {_gib(p['params'] + p['optimizer'] + p['batch'])}  params+optimizer+batch",
              f"   (unpadded)    {_gib(out['argument_unpadded_bytes'])}  (XLA pads to its tiled layouts)",
              f"  outputs        {_gib(out['output_bytes'])}  (aliased to arguments: {_gib(out['alias_bytes'])})",
              f"  temp           {_gib(out['temp_bytes'])}  {_gib(p['gradients'] + p['activations'] + p['weights_in_flight'])}  gradients+activations+weights in flight",
              f"  code           {_gib(out['code_bytes'])}",
              f"  total          {_gib(out['used_bytes'])}  {_gib(out['plan_bytes'])}"]
  else:
    lines.append(f"  XLA refused the program: {out['error'][:300]}")
  lines.append(f"  HBM            {_gib(out['hbm_bytes_per_chip'])}")
  if out["fits"]:
    lines.append(f"  FITS, margin {_gib(out['margin_bytes'])} "
                 f"({out['margin_bytes'] / out['hbm_bytes_per_chip']:.0%} of HBM)")
  else:
    lines.append(f"  DOES NOT FIT: over by {_gib(out.get('over_bytes'))}; levers (saving per chip "
                 "by the plan; * = enough alone):")
    for flag, saved in levers(config, out):
      enough = out.get("over_bytes") is not None and saved >= out["over_bytes"]
      lines.append(f"    {'*' if enough else ' '} {flag:<48} {_gib(saved)}")
  if "flops_per_chip" not in out:
    return "\n".join(lines)
  lines += ["", f"cost per chip: {out['flops_per_chip'] / 1e12:.3f} TFLOP (model: "
            f"{out['model_flops_per_chip'] / 1e12:.3f}), {out['bytes_accessed_per_chip'] / GiB:.3f} "
            "GiB accessed (XLA counts a loop body once: low with scan_layers)",
            "", "collectives of one step   network  count        bytes    est. s"]
  for c in out["collectives"]:
    lines.append(f"  {c['kind']:<22}  {c['network']:<6} {c['count']:>6} {c['bytes'] / 2**20:>10.2f} MiB "
                 f"{c['est_s']:.2e}")
  lines += ["", f"roofline: compute {out['compute_s']:.4f} s, HBM {out['hbm_s']:.4f} s, "
            f"collectives {out['collective_s']:.4f} s (not overlapped) -> step {out['est_step_s']:.4f} s",
            f"  est. MFU {out['est_mfu']:.1%}, {out['tokens_per_s_per_chip']:.0f} tokens/s/chip"]
  return "\n".join(lines)


REMAT_BY_COST = ("none", "dots_saveable", "full")  # cheapest recompute first


def search(config, topology: str, num_slices: int = 1, max_per_chip: int = 1024, log=None) -> dict:
  """For each remat policy (cheapest first): the largest per-chip batch (pairs, a multiple of
  ``train.accum_steps``) whose step fits, by doubling then bisecting over compiles; and the
  cheapest policy that fits the configured batch."""
  import numpy as np

  from rmjax import memory
  _, _, devices = topology_devices(topology, num_slices)
  mesh, _ = mesh_for(config, devices, num_slices)
  table = dict((k, v) for k, v in config.mesh.rules)
  shards = math.prod(mesh.shape[a] for a in np.atleast_1d(table.get("batch") or ()))
  accum = config.train.accum_steps
  step = shards * accum  # global batch granularity
  results, memo = {}, {}

  def fits(remat: str, k: int) -> bool:
    if (remat, k) not in memo:
      out = analyse(memory.with_fields(config, model__remat=remat, train__batch_size=k * step), topology,
                    num_slices)
      memo[remat, k] = out["fits"]
      if log:
        log(f"  remat={remat:<14} batch/chip {k * accum:>5}: "
            f"{'fits' if out['fits'] else 'does not fit'} ({out['compile_s']:.0f} s compile)")
    return memo[remat, k]

  lo = 0  # more recompute never needs more memory: start from the cheaper policy's batch
  for remat in REMAT_BY_COST:
    hi = max(1, 2 * lo)  # lo fits (0: nothing known), hi to try
    while hi * accum <= max_per_chip and fits(remat, hi):
      lo, hi = hi, 2 * hi
    hi = min(hi, max_per_chip // accum + 1)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(remat, mid) else (lo, mid)
    results[remat] = lo * accum
  wanted = math.ceil(config.train.batch_size / shards)
  cheapest = next((r for r in REMAT_BY_COST if results[r] >= wanted), None)
  return {"topology": parse_topology(topology)[1], "num_slices": num_slices,
          "num_chips": len(devices), "batch_shards": shards,
          "max_batch_per_chip": results, "configured_batch_per_chip": wanted,
          "cheapest_remat": cheapest,
          "max_batch_per_chip_cheapest": results[cheapest] if cheapest else None}


def search_table(out: dict) -> str:
  lines = [f"{out['topology']} x {out['num_slices']}: largest per-chip batch (pairs) that fits",
           *(f"  remat={r:<14} {b}" for r, b in out["max_batch_per_chip"].items())]
  if out["cheapest_remat"]:
    lines.append(f"cheapest remat for {out['configured_batch_per_chip']} pairs/chip: "
                 f"{out['cheapest_remat']} (up to {out['max_batch_per_chip_cheapest']} pairs/chip)")
  else:
    lines.append(f"no remat policy fits {out['configured_batch_per_chip']} pairs/chip")
  return "\n".join(lines)


REPORT_KEYS = ("topology", "num_chips", "fits", "hbm_bytes_per_chip", "argument_bytes",
               "output_bytes", "temp_bytes", "flops_per_chip", "collective_bytes", "est_step_s",
               "est_mfu", "plan_bytes")


def summary(out: dict) -> dict:
  """The JSON line: ``REPORT_KEYS`` (None where XLA refused the program) and the rest."""
  return {**{k: out.get(k) for k in REPORT_KEYS}, **out}


def _define_flags() -> dict:
  """The command line's flags, defined only when run as ``python -m rmjax.aot``: importing this
  module (tests, other tools) must not claim ``--config`` next to ``rmjax.main``'s."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Path to a config file [:arg].",
                                                lock_config=True),
      "topology": flags.DEFINE_string(
          "topology", None, "TPU topology: v5e:2x2, v5p:4x4x4, v6e:16x16, or an accelerator "
          "type: v5p-128, v5litepod-256, v6e-256."),
      "num_slices": flags.DEFINE_integer("num_slices", 1,
                                         "Slices of the topology (multi-slice over DCN)."),
      "search": flags.DEFINE_bool(
          "search", False, "Find the largest per-chip batch that fits for each remat policy, and "
          "the cheapest policy that fits the configured batch (binary search over compiles)."),
      "hlo_out": flags.DEFINE_string("hlo_out", None,
                                     "Also write the compiled step's optimised HLO text here."),
      "max_batch": flags.DEFINE_integer("max_batch_per_chip", 1024,
                                        "--search: largest per-chip batch (pairs) tried."),
      "libtpu_args": flags.DEFINE_string(
          "libtpu_args", None, "Flags for XLA:TPU, set as LIBTPU_INIT_ARGS before libtpu loads "
          "(as a TPU VM's launch would); 'maxtext': MaxText's v5p recipes' flags (MAXTEXT_ARGS)."),
  }


_FLAGS: dict = {}


def main(argv):
  del argv
  import logging
  logging.getLogger("jax").setLevel(logging.ERROR)
  config, topology, num_slices = (_FLAGS[k].value for k in ("config", "topology", "num_slices"))
  if (args := _FLAGS["libtpu_args"].value) is not None:
    os.environ["LIBTPU_INIT_ARGS"] = MAXTEXT_ARGS if args == "maxtext" else args
  try:
    if _FLAGS["search"].value:
      out = search(config, topology, num_slices, _FLAGS["max_batch"].value, log=print)
      print(search_table(out))
      print(json.dumps(out))
      return
    out = analyse(config, topology, num_slices, _FLAGS["hlo_out"].value)
  except (ValueError, RuntimeError) as e:
    raise app.UsageError(str(e)) from None
  print(report(config, out))
  print(json.dumps(summary(out)))


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
