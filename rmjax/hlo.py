"""Reading XLA's optimised HLO text: the collectives of one step (with loop trip counts) and the
compiled program's arguments with their layout padding (``rmjax.aot``).
"""
from __future__ import annotations

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\) -> .*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(KINDS) + r")(-start)?\(")
_CALLS = re.compile(r"\b(calls|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%[\w.-]+)")


def _bytes(types: str) -> int:
  return sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+fn)?)\[([\d,]*)\]", types))


def _group_size(line: str) -> int:
  if m := re.search(r"replica_groups=\{\{([\d,]+)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
    return int(m.group(2))
  return 2


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
  """A while loop's trip count: XLA's ``known_trip_count``, else its condition's
  ``counter < constant(N)`` (XLA:TPU's widened scans carry no known_trip_count), else 1."""
  if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', line):
    return int(m.group(1))
  cond = re.search(r"condition=%([\w.-]+)", line)
  body = comps.get(cond.group(1), ()) if cond else ()
  consts = dict(re.findall(r"%(\S+) = s32\[\]\S* constant\((\d+)\)", "\n".join(body)))
  for l in body:  # the counter starts at 0 (lax.scan)
    if (m := re.search(r"ROOT .*compare\(%\S+, %([^,\s)]+)\), direction=LT", l)) and m.group(1) in consts:
      return int(consts[m.group(1)])
  return 1


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per step (while bodies: their trip count)."""
  mult: dict[str, int] = {}

  def visit(name: str, times: int):
    mult[name] = mult.get(name, 0) + times
    for line in comps.get(name, ()):
      trip = _trip_count(line, comps) if " while(" in line else 1
      for key, callees in _CALLS.findall(line):
        n = trip if key in ("body", "condition") else 1
        for callee in re.findall(r"%([\w.-]+)", callees):
          visit(callee, times * n)

  visit(entry, 1)
  return mult


def entry_parameters(hlo: str) -> list[tuple[str, tuple[int, ...], int, int]]:
  """(dtype, per-chip shape, bytes, bytes padded to the layout's first tile) of each argument of
  the compiled program (its ENTRY parameters); the padded sum is XLA's argument bytes."""
  out = []
  for line in hlo.split("\nENTRY", 1)[1].splitlines():
    param = re.match(r"\s*%\S+ = (.*?) parameter\(", line)  # an array, or a tuple of them
    for m in re.finditer(r"(\w+)\[([\d,]*)\]\{([\d,]*):?([^}]*)\}", param.group(1) if param else ""):
      out.append(_parameter(m))
  return out


def _parameter(m: re.Match) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype, shape, bytes, bytes padded to the layout's first tile) of one array type."""
  dtype, dims = m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)
  size = _DTYPE_BYTES[dtype]
  padded = [dims[int(i)] for i in reversed(m.group(3).split(",")) if i]  # major to minor
  if tile := re.search(r"T\(([\d,]+)\)", m.group(4)):
    t = [int(x) for x in tile.group(1).split(",")]
    padded = [1] * (len(t) - len(padded)) + padded
    for j, tj in enumerate(t, start=len(padded) - len(t)):
      padded[j] = -(-padded[j] // tj) * tj
  return dtype, dims, math.prod(dims) * size, math.prod(padded) * size


def collectives(hlo: str, num_slices: int) -> list[dict]:
  """Per (kind, network): count, bytes (full buffers, per chip, per step) and the bytes a chip
  moves on a ring. Multi-slice programs are per slice: their cross-slice collectives are
  megascale transfers (network ``dcn``); the rest is ``ici``."""
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    if m := _COMP.match(line):
      name = m.group(1)
      comps[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif name is not None:
      comps[name].append(line)
  mult = _multipliers(comps, entry)
  rows: dict[tuple[str, str], dict] = {}
  for comp, lines in comps.items():
    for line in lines:
      if m := _OP.match(line):
        kind, size, group = m.group(2), _bytes(m.group(1)), _group_size(line)
        if m.group(3):  # async start: (operands, results)
          size //= 2
        if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
          kind = "reduce-scatter"  # XLA:TPU's fused all-reduce + slice
        network = "ici"
      elif m := re.search(r'send\(.*_xla_megascale_transfer_type="(\w+)"', line):
        kind = m.group(1).lower().replace("_", "-")
        first = re.search(r"= \((\w+\[[\d,]*\])", line).group(1)  # the sent array: (data, u32, token)
        size, group, network = _bytes(first), num_slices, "dcn"
      else:
        continue
      ring = {"all-reduce": 2 * (group - 1) / group, "collective-permute": 1.0}.get(
          kind, (group - 1) / group)
      row = rows.setdefault((kind, network), {"kind": kind, "network": network, "count": 0,
                                              "bytes": 0, "moved_bytes": 0.0})
      times = mult.get(comp, 0)
      row["count"] += times
      row["bytes"] += times * size
      row["moved_bytes"] += times * size * ring
  return sorted(rows.values(), key=lambda r: (r["network"], r["kind"]))
