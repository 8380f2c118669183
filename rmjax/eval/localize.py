"""Error localisation: where a per-token trace (``Q_t``, or the reward of each prefix) drops.

# N: solutions, T: response tokens of one solution

All positions are *response-token* indices (0 = first response token). A trace ``v_T`` is
``Q_t = cos(h_t, goal)`` or the reward of the prefix ending at token t (for a causal model that is
the reward head on ``h_t``). Predicted error position, two rules:

* ``largest_drop`` (primary, threshold-free): ``argmax_{t >= 1} (v_{t-1} - v_t)``, the token at
  which the trace falls most; the earliest such token on ties.
* ``below``: the first ``t >= 1`` with ``v_t < threshold`` (the paper's filtering rule, threshold
  0); -1 (no prediction, a miss) when the trace never falls below it.

A prediction is a *hit* when it lies in the known error window ``[start, end)``: e.g. the first
wrong token up to the end of its step (line), or the first wrong token and the ``k - 1`` after it.
A model cannot see an error before it is written, so earlier predictions are misses. The baseline
is the exact expected hit rate of a position drawn uniformly from the eligible tokens ``1..T-1``.
"""
from __future__ import annotations

import numpy as np

from rmjax.data.tokenizer import ByteTokenizer, HFTokenizer

METHODS = ("largest_drop", "below")


def byte_offsets(text: str) -> np.ndarray:
  """``(start, end)`` character span of each UTF-8 byte (the byte tokenizer's tokens)."""
  return np.asarray([(i, i + 1) for i, c in enumerate(text) for _ in c.encode("utf-8")],
                    np.int64).reshape(-1, 2)


def response_offsets(tokenizer, text: str) -> np.ndarray:
  """Character span of each token of ``tokenizer.encode(text)``: one per byte for
  ``ByteTokenizer``, the fast tokenizer's offset mapping for ``HFTokenizer``."""
  if isinstance(tokenizer, ByteTokenizer):
    return byte_offsets(text)
  if isinstance(tokenizer, HFTokenizer) and tokenizer.hf.is_fast:
    enc = tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  raise ValueError(f"{type(tokenizer).__name__}: no character offsets (a fast HF tokenizer has "
                   "them), so error positions cannot be mapped to tokens")


def char_to_token(offsets_Tx2, char: int) -> int:
  """Index of the token holding character ``char`` (the first token ending after it)."""
  ends_T = np.asarray(offsets_Tx2)[:, 1]
  if not 0 <= char < ends_T[-1]:
    raise ValueError(f"character {char} lies outside the text (0..{ends_T[-1] - 1})")
  return int(np.argmax(ends_T > char))


def first_below(trace_T, threshold: float, min_tokens: int = 0) -> int:
  """First ``t >= min_tokens`` with ``trace_T[t] < threshold``; -1 when there is none."""
  below_T = np.asarray(trace_T, np.float64) < threshold
  below_T[:min_tokens] = False
  return int(np.argmax(below_T)) if below_T.any() else -1


def largest_drop(trace_T) -> int:
  """``argmax_{t >= 1} (v_{t-1} - v_t)`` (earliest on ties); -1 for a trace of < 2 tokens."""
  v_T = np.asarray(trace_T, np.float64)
  if len(v_T) < 2:
    return -1
  return int(np.argmax(v_T[:-1] - v_T[1:])) + 1


def predict(traces, method: str = "largest_drop", threshold: float = 0.0) -> np.ndarray:
  """Predicted error position of each trace (a list of 1-D arrays of any lengths)."""
  if method == "largest_drop":
    return np.asarray([largest_drop(v) for v in traces], np.int64)
  if method == "below":
    return np.asarray([first_below(v, threshold, min_tokens=1) for v in traces], np.int64)
  raise ValueError(f"method={method!r}: expected one of {METHODS}")


def hit_rate(pred_N, start_N, end_N) -> float:
  """Share of predictions inside their window ``[start, end)``."""
  pred_N, start_N, end_N = (np.asarray(x) for x in (pred_N, start_N, end_N))
  return float(np.mean((pred_N >= start_N) & (pred_N < end_N)))


def random_hit_rate(length_N, start_N, end_N) -> float:
  """Expected hit rate of a position drawn uniformly from ``1..T-1`` (``T = length``)."""
  length_N, start_N, end_N = (np.asarray(x, np.int64) for x in (length_N, start_N, end_N))
  if np.any(length_N < 2):
    raise ValueError("random_hit_rate: every trace needs at least 2 tokens")
  inside_N = np.clip(np.minimum(end_N, length_N) - np.maximum(start_N, 1), 0, None)
  return float(np.mean(inside_N / (length_N - 1)))


def localization_metrics(traces, windows: dict[str, tuple], method: str = "largest_drop",
                         threshold: float = 0.0) -> dict:
  """Hit rate and random baseline per named window ``{name: (start_N, end_N)}``."""
  pred_N = predict(traces, method, threshold)
  length_N = [len(v) for v in traces]
  out = {"method": method, "n": len(pred_N), "n_no_prediction": int(np.sum(pred_N < 0))}
  if method == "below":
    out["threshold"] = threshold
  for name, (start_N, end_N) in windows.items():
    out[f"hit_rate_{name}"] = hit_rate(pred_N, start_N, end_N)
    out[f"random_hit_rate_{name}"] = random_hit_rate(length_N, start_N, end_N)
  return out
