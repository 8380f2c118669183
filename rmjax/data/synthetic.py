"""Embedded synthetic preference data mimicking the paper's math setting (no download).

Each problem is a chain of additions/subtractions; the *chosen* solution works it step by step,
the *rejected* one makes an error at a known step and carries the wrong value on consistently
(as a model that slipped would), so its final answer is wrong too. Kinds of slip:
``carry`` (a step starts from a mis-copied value: `` 7+1=8`` then `` 9-6=3``), ``copy`` (an
operand misread from the question) and ``arith`` (a wrong result: ``8-6=3``). ``error_step`` and
``error_char`` (offset of the first wrong character in the response) are kept for
error-localisation studies. Examples are generated from (seed, split, index): random access,
deterministic, any size. Splits are disjoint by problem: a problem belongs to the split that a hash
of its prompt picks (``SPLIT_FRACTIONS``, whatever the seed), and a split redraws problems of the
others; ``problem_id`` is that hash, so the by-problem bootstrap groups repeats of a problem.

Every number written stays in 0..max_value (single digits by default), so no slip is given away
by a number's size. How fast a tiny model from scratch learns to spot each kind differs a lot:
``carry`` needs an equality check between neighbouring lines, ``arith`` needs the addition
table (measured numbers: docs/data.md, The demo data).
"""
from __future__ import annotations

import hashlib

import numpy as np

from rmjax.data.readers import SPLIT_FRACTIONS

SPLITS = {"train": 0, "validation": 1, "test": 2}
MAX_DRAWS = 10_000  # of problems for one example before the split is declared (nearly) empty
ERROR_KINDS = ("carry", "copy", "arith")


def _problem(rng: np.random.Generator, min_steps: int, max_steps: int, max_value: int):
  """A start value and (sign, operand) steps; every intermediate result stays in 0..max_value."""
  n = int(rng.integers(min_steps, max_steps + 1))
  start = int(rng.integers(0, max_value + 1))
  ops, value = [], start
  for _ in range(n):
    sign = "+" if value == 0 or (value < max_value and rng.random() < 0.5) else "-"
    a = int(rng.integers(1, (max_value - value if sign == "+" else value) + 1))
    ops.append((sign, a))
    value = value + a if sign == "+" else value - a
  return start, ops


def problem_id(prompt: str) -> int:
  """A stable 63-bit hash of the prompt: the problem's id (an int64) and, scaled, its split."""
  return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") >> 1


def split_of(pid: int) -> str:
  """The split a problem belongs to: ``pid`` scaled to [0, 1) against ``SPLIT_FRACTIONS``."""
  edges = np.cumsum(list(SPLIT_FRACTIONS.values()))[:-1]
  return list(SPLIT_FRACTIONS)[int(np.searchsorted(edges, pid / 2**63, side="right"))]


def _solve(start: int, ops, wrong_at: int = -1, kind: str = "arith", delta: int = 0):
  """Step lines, final answer and every number written; step ``wrong_at`` slips by ``delta``."""
  lines, value, numbers = [], start, [start]
  for k, (sign, a) in enumerate(ops):
    if k == wrong_at and kind == "carry":
      value = value + delta
      numbers.append(value)
    if k == wrong_at and kind == "copy":
      a = a + delta
    result = value + a if sign == "+" else value - a
    if k == wrong_at and kind == "arith":
      result += delta
    lines.append(f"{value}{sign}{a}={result}")
    value = result
    numbers += [a, result]
  return lines, value, numbers


class SyntheticMath:
  """Random-access source of preference pairs ``{prompt, chosen, rejected, error_step, ...}``."""

  def __init__(self, size: int, split: str = "train", seed: int = 0, min_steps: int = 2,
               max_steps: int = 4, max_value: int = 9, error_kinds=("carry",)):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    if not error_kinds or set(error_kinds) - set(ERROR_KINDS):
      raise ValueError(f"error_kinds={error_kinds!r}: expected a non-empty subset of {ERROR_KINDS}")
    self.error_kinds = tuple(error_kinds)
    self.size, self.split, self.seed = size, split, seed
    self.min_steps, self.max_steps, self.max_value = min_steps, max_steps, max_value

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(index)
    # A problem depends only on (seed, split, index); problems of other splits are redrawn, as
    # (rarely) are problems with no slip that keeps every number in range.
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    for _ in range(MAX_DRAWS):
      start, ops = _problem(rng, self.min_steps, self.max_steps, self.max_value)
      prompt = f"Q: {start}" + "".join(f"{s}{a}" for s, a in ops) + "\nA:"
      pid = problem_id(prompt)
      if split_of(pid) != self.split:
        continue
      good, answer, _ = _solve(start, ops)
      slip = self._slip(rng, start, ops)
      if slip is not None:
        break
    else:
      raise ValueError(f"SyntheticMath: no {self.split!r} problem with a slip in {MAX_DRAWS} "
                       f"draws (min_steps={self.min_steps}, max_steps={self.max_steps}, "
                       f"max_value={self.max_value}): too few problems; allow more steps")
    kind, step, bad, wrong_answer = slip
    chosen = "".join(f" {l}\n" for l in good) + f" answer {answer}\n"
    rejected = "".join(f" {l}\n" for l in bad) + f" answer {wrong_answer}\n"
    error_char = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "error_step": step,
            "error_kind": kind, "error_char": error_char, "id": f"{self.split}-{index}",
            "problem_id": pid}

  def _slip(self, rng, start, ops):
    """A random (kind, step, delta) whose wrong solution keeps every number in 0..max_value, so
    no number's size gives the slip away; ``None`` when there is none."""
    candidates = [(kind, step, delta) for kind in self.error_kinds for step in range(len(ops))
                  for delta in (-2, -1, 1, 2)]
    for i in rng.permutation(len(candidates)):
      kind, step, delta = candidates[i]
      bad, wrong_answer, numbers = _solve(start, ops, step, kind, delta)
      if all(0 <= x <= self.max_value for x in numbers):
        return kind, step, bad, wrong_answer
    return None
