"""Embedded synthetic preference data mimicking the paper's math setting (no download).

Each problem is a chain of additions/subtractions; the *chosen* solution works it step by step,
the *rejected* one makes an error at a known step and carries the wrong value on consistently
(as a model that slipped would), so its final answer is wrong too. Two kinds of slip:
``arith`` (a wrong result, e.g. ``12-3=8``) and ``copy`` (an operand misread from the question).
``error_step`` and ``error_char`` (offset of the first wrong character in the response) are kept
for error-localisation studies. Examples are generated from (seed, split, index): random access,
deterministic, any size.
"""
from __future__ import annotations

import zlib

import numpy as np

SPLITS = {"train": 0, "validation": 1, "test": 2}


def _problem(rng: np.random.Generator, min_steps: int, max_steps: int, max_operand: int):
  n = int(rng.integers(min_steps, max_steps + 1))
  start = int(rng.integers(1, 10))
  ops, value = [], start
  for _ in range(n):
    a = int(rng.integers(1, max_operand + 1))
    sign = "-" if value - a >= 0 and rng.random() < 0.5 else "+"
    ops.append((sign, a))
    value = value + a if sign == "+" else value - a
  return start, ops


def _solve(start: int, ops, wrong_at: int = -1, kind: str = "arith", delta: int = 0):
  """Step lines, final answer and smallest number written; step ``wrong_at`` slips by ``delta``."""
  lines, value, smallest = [], start, start
  for k, (sign, a) in enumerate(ops):
    if k == wrong_at and kind == "copy":
      a = a + delta
    result = value + a if sign == "+" else value - a
    if k == wrong_at and kind == "arith":
      result += delta
    lines.append(f"{value}{sign}{a}={result}")
    value, smallest = result, min(smallest, a, result)
  return lines, value, smallest


class SyntheticMath:
  """Random-access source of preference pairs ``{prompt, chosen, rejected, error_step, ...}``."""

  def __init__(self, size: int, split: str = "train", seed: int = 0, min_steps: int = 2,
               max_steps: int = 4, max_operand: int = 9):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    self.size, self.split, self.seed = size, split, seed
    self.min_steps, self.max_steps, self.max_operand = min_steps, max_steps, max_operand

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(index)
    # A problem depends only on (seed, split, index); splits never share a generator stream.
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    start, ops = _problem(rng, self.min_steps, self.max_steps, self.max_operand)
    question = f"{start}" + "".join(f"{s}{a}" for s, a in ops)
    prompt = f"Q: {question}\nA:"
    good, answer, _ = _solve(start, ops)
    kind = "arith" if rng.random() < 0.5 else "copy"
    step = int(rng.integers(len(ops)))
    bad, smallest = good, -1
    while bad == good or smallest < 0:  # a slip never writes a negative number
      delta = int(rng.choice([-2, -1, 1, 2]))
      bad, wrong_answer, smallest = _solve(start, ops, step, kind, delta)
    chosen = "".join(f" {l}\n" for l in good) + f" answer {answer}\n"
    rejected = "".join(f" {l}\n" for l in bad) + f" answer {wrong_answer}\n"
    error_char = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "error_step": step,
            "error_kind": kind, "error_char": error_char, "id": f"{self.split}-{index}"}
