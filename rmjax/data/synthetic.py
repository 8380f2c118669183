"""Embedded synthetic preference data mimicking the paper's math setting (no download).

Each problem is a chain of additions/subtractions; the *chosen* solution works it step by step,
the *rejected* one makes an error at a known step and carries the wrong value on consistently
(as a model that slipped would), so its final answer is wrong too. Kinds of slip:
``carry`` (a step starts from a mis-copied value: `` 7+1=8`` then `` 9-6=3``), ``copy`` (an
operand misread from the question) and ``arith`` (a wrong result: ``8-6=3``). ``error_step`` and
``error_char`` (offset of the first wrong character in the response) are kept for
error-localisation studies. Examples are generated from (seed, split, index): random access,
deterministic, any size.

Every number written stays in 0..max_value (single digits by default), so no slip is given away
by a number's size. How fast a tiny model from scratch learns to spot each kind differs a lot:
``carry`` needs an equality check between neighbouring lines, ``arith`` needs the addition
table (see README for measured numbers).
"""
from __future__ import annotations

import numpy as np

SPLITS = {"train": 0, "validation": 1, "test": 2}
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
    # A problem depends only on (seed, split, index); splits never share a generator stream.
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    while True:  # rarely, no slip of a problem stays in range: draw another
      start, ops = _problem(rng, self.min_steps, self.max_steps, self.max_value)
      good, answer, _ = _solve(start, ops)
      slip = self._slip(rng, start, ops)
      if slip is not None:
        break
    kind, step, bad, wrong_answer = slip
    prompt = f"Q: {start}" + "".join(f"{s}{a}" for s, a in ops) + "\nA:"
    chosen = "".join(f" {l}\n" for l in good) + f" answer {answer}\n"
    rejected = "".join(f" {l}\n" for l in bad) + f" answer {wrong_answer}\n"
    error_char = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "error_step": step,
            "error_kind": kind, "error_char": error_char, "id": f"{self.split}-{index}"}

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
