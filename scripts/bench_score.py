"""Scoring throughput by layout on a best-of-N file: ``sequences`` vs ``shared_prompt``.

  python scripts/bench_score.py                          # 64 GSM8K problems x 5 solutions
  python scripts/bench_score.py --prompts=16 --rounds=1  # quicker

The file: the first ``--prompts`` problems of ``example_model_solutions.jsonl`` (``--source_dir``)
with ``--responses`` (at most 5) of their solutions each (the four model solutions, then the
ground truth) as ``{"prompt", "response"}`` lines; without the file, synthetic problems with
``--responses`` solutions of different lengths. Bytes as tokens (vocab 256) on a
SmolLM2-135M-shaped model with random weights and ``--layers`` of its 30 blocks. Each layout runs
``rmjax.score.score_file`` once to compile every shape it needs, then ``--rounds`` rounds each
score the file once per layout, one after the other (the same load on a shared machine); figures
are medians over rounds. Printed: lines/s, tokens/s (the lines' real tokens), the padding share
and the rows per layout; the rewards of the two layouts are checked equal. The last line is one
JSON object with ``speedup`` (shared_prompt lines/s over sequences).

``--what=evaluate``: the same lines through ``rmjax.evaluate``'s forward instead (reward, final
state, Q_t and prefix reward of every token): ``run_sequences`` (a row per line, padded to
``--max_len``, as ``rmjax.evaluate --layout=sequences``) vs ``run_shared_prompt`` (rows of up to
``--row_len``, default ``2 * --max_len``), ``--batch_size`` rows per pass each; every output is
checked equal (relative norm error). E.g.
``--what=evaluate --prompts=16 --layers=2 --max_len=1024 --rounds=1`` (docs/evaluation.md).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_measure import machine  # noqa: E402  beside this file

_SOURCE_DIR = flags.DEFINE_string("source_dir", "../shared/data", "Holds gsm8k/.")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Prompts in the file.")
_RESPONSES = flags.DEFINE_integer("responses", 5, "Responses per prompt (GSM8K: at most 5).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder blocks (SmolLM2-135M has 30).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass (score --batch_size).")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "score --max_len (the longest row).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds.")
_ROW_LEN = flags.DEFINE_integer("row_len", 0, "--what=evaluate: run_shared_prompt's row_len "
                                "(0: 2 * --max_len).")
_WHAT = flags.DEFINE_enum("what", "score", ["score", "evaluate"],
                          "score: rmjax.score.score_file; evaluate: rmjax.evaluate's forward.")

SOLUTIONS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def best_of_n_lines() -> tuple[list[dict], str]:
  """``--prompts`` x ``--responses`` lines, and where they come from."""
  path = os.path.join(_SOURCE_DIR.value, "gsm8k", "example_model_solutions.jsonl")
  n, k = _PROMPTS.value, _RESPONSES.value
  if os.path.exists(path):
    if not 1 <= k <= 5:
      raise ValueError(f"--responses={k}: GSM8K has 5 solutions per problem (4 + ground truth)")
    lines = []
    with open(path) as f:
      for row in map(json.loads, f):
        texts = [row[s]["solution"] for s in SOLUTIONS] + [row["ground_truth"]]
        lines += [{"prompt": f"Q: {row['question']}\nA:", "response": " " + t}
                  for t in texts[:k]]
        if len(lines) == n * k:
          break
    return lines, f"{path} ({n} problems x {k} solutions)"
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    a, b = rng.integers(1, 99, 2)
    lines += [{"prompt": f"Q: what is {a} + {b}? Think step by step.\nA:",
               "response": " I add them." * int(rng.integers(2, 40)) + f" {a + b + j}"}
              for j in range(k)]
  return lines, f"synthetic ({n} prompts x {k} responses)"


def make_state():
  """``(config, graphdef, state, mesh)``: the bytes model on one device."""
  import jax

  from configs import gsm8k
  from rmjax import sharding, train_state
  c = gsm8k.get_config("bt")
  c.model.update(vocab_size=256, dim=576, num_layers=_LAYERS.value, num_heads=9, num_kv_heads=3,
                 head_dim=64, mlp_dim=1536, rope_theta=1e5)
  c.model.init_from = ""
  c.data.max_len = _MAX_LEN.value
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh):
    graphdef, state = train_state.create_state(c, mesh)
  return c, graphdef, state, mesh


def bench_evaluate(lines, source):
  """``--what=evaluate``: lines/s of ``rmjax.evaluate``'s forward in each layout."""
  import jax

  from rmjax import evaluate, sharding
  from rmjax.data.tokenizer import ByteTokenizer
  from tests.helpers import relative_errors
  c, graphdef, state, mesh = make_state()
  rows = evaluate.encode_solutions(lines, ByteTokenizer(), c)
  real_NxL = rows["mask"].astype(bool)
  forward = jax.jit(evaluate.make_forward(graphdef))
  goal_D = np.random.default_rng(0).standard_normal(c.model.dim).astype(np.float32)
  b, row_len = _BATCH.value, _ROW_LEN.value or 2 * c.data.max_len
  groups = evaluate.shared_prompt_batches(rows, row_len, b)[0]
  held = {"sequences": (real_NxL.sum(), real_NxL.size),  # (tokens, token slots the model runs)
          "shared_prompt": (sum(len(r.ids) for g in groups.values() for r in g),
                            sum(length * len(g) for length, g in groups.items()))}
  n_rows = {"sequences": len(lines), "shared_prompt": sum(map(len, groups.values()))}

  def run(layout):
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      kw = {"row_len": row_len} if layout == "shared_prompt" else {}
      out = evaluate.run_layout(layout, forward, state, rows, goal_D, batch_size=_BATCH.value,
                                mesh=mesh, rules=sharding.DEFAULT_RULES, desc=layout, **kw)
    return time.perf_counter() - t0, out

  stats, outs = {}, {}
  for layout in evaluate.LAYOUTS:  # compiles every shape
    stats[layout] = {"rows": n_rows[layout], "padding_share": 1 - held[layout][0] / held[layout][1],
                     "compile_s": run(layout)[0], "seconds": []}
  for _ in range(_ROUNDS.value):
    for layout in evaluate.LAYOUTS:
      seconds, outs[layout] = run(layout)
      stats[layout]["seconds"].append(seconds)
  pick = lambda o: {"reward": o["reward"], "h_final": o["h_final"], "q": o["q"][real_NxL],
                    "prefix_reward": o["prefix_reward"][real_NxL]}
  rel = max(relative_errors(pick(outs["shared_prompt"]), pick(outs["sequences"])).values())
  report(stats, len(lines), int(real_NxL.sum()), source, rel, "evaluate forward, outputs")


def report(stats, n_lines, real, source, rel, what):
  """Prints the table and, last, the JSON line."""
  print(f"{what}: {source}; {n_lines} lines, {real} real tokens; {_LAYERS.value} SmolLM2-135M "
        f"blocks, bytes; batch_size={_BATCH.value} max_len={_MAX_LEN.value} "
        f"row_len={_ROW_LEN.value or 2 * _MAX_LEN.value}; {machine()}; "
        f"{datetime.date.today()}")
  for layout, s in stats.items():
    sec = float(np.median(s["seconds"]))
    s.update(lines_per_s=n_lines / sec, tokens_per_s=real / sec, median_s=sec)
    print(f"{layout:>14}: {s['lines_per_s']:8.2f} lines/s {s['tokens_per_s']:9.0f} tokens/s  "
          f"rows {s['rows']:4d}  padding {s['padding_share']:.0%}  (first run with compiles "
          f"{s['compile_s']:.1f} s)")
  speedup = stats["shared_prompt"]["lines_per_s"] / stats["sequences"]["lines_per_s"]
  print(f"shared_prompt / sequences: {speedup:.2f}x lines/s; {what} agree to {rel:.1e} "
        "(relative)")
  print(json.dumps({"speedup": speedup, "rel_diff": rel, "what": _WHAT.value, "lines": n_lines,
                    "source": source, **stats}))


def main(argv):
  del argv
  from rmjax import sharding, train_state
  from rmjax.data.tokenizer import ByteTokenizer
  from rmjax.score import LAYOUTS, bucket_length, pack_rows, prompt_key, score_file
  lines, source = best_of_n_lines()
  if _WHAT.value == "evaluate":
    return bench_evaluate(lines, source)
  tok, max_len = ByteTokenizer(), _MAX_LEN.value
  _, graphdef, state, mesh = make_state()
  with sharding.use_mesh(mesh):
    model, _ = train_state.merge(graphdef, state)
  tmp = tempfile.mkdtemp()
  src = os.path.join(tmp, "in.jsonl")
  with open(src, "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in lines)
  seqs = [tok.encode(x["prompt"]) + tok.encode(x["response"]) for x in lines]
  real = sum(map(len, seqs))

  def run(layout):
    out = os.path.join(tmp, f"{layout}.jsonl")
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      score_file(model, tok, src, out, batch_size=_BATCH.value, max_len=max_len, layout=layout)
    seconds = time.perf_counter() - t0
    with open(out) as f:
      return seconds, np.array([json.loads(x)["reward"] for x in f])

  stats, rewards = {}, {}
  for layout in LAYOUTS:  # compiles every shape
    rows = pack_rows(seqs, [prompt_key(x) for x in lines], max_len, layout)
    rows.sort(key=lambda r: len(r.ids))
    b = _BATCH.value
    padded = sum(b * bucket_length(max(len(r.ids) for r in rows[i:i + b]), max_len)
                 for i in range(0, len(rows), b))  # what the model runs, batch fill included
    stats[layout] = {"rows": len(rows), "padding_share": 1 - sum(len(r.ids) for r in rows) / padded,
                     "compile_s": run(layout)[0], "seconds": []}
  for _ in range(_ROUNDS.value):
    for layout in LAYOUTS:
      seconds, rewards[layout] = run(layout)
      stats[layout]["seconds"].append(seconds)
  scale = np.max(np.abs(rewards["sequences"]))
  rel = float(np.max(np.abs(rewards["shared_prompt"] - rewards["sequences"])) / scale)
  report(stats, len(lines), real, source, rel, "score_file, rewards")


if __name__ == "__main__":
  app.run(main)
