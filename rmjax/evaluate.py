"""Evaluate a trained reward model: ``eval.json``, ``eval.md`` and PNG plots.

  python -m rmjax.evaluate --checkpoint=runs/demo --config=configs/synthetic.py [--out=DIR]

``--checkpoint`` is a workdir (its newest checkpoint), its ``checkpoints/`` folder, or one step
folder (``runs/demo/checkpoints/1500``). Over the held-out (``validation``) pairs, the chosen
response counts as a correct solution and the rejected one as incorrect, grouped by the pair's
``problem_id`` (each pair its own problem when the data has none). Computed: pairwise accuracy,
AUROC of reward vs correctness over the distinct solutions (one in several pairs counts once, as in
``rmjax.loss_lab``) with a bootstrap interval resampled by problem, the goal state (saved as
``goal.npy`` in the step folder) from the chosen responses of the first ``--goal_examples``
*training* pairs, Q_t traces, and error localisation (``rmjax.eval.localize``) against
``error_char`` when the data records it. Majority voting needs several sampled solutions per
problem with final answers (``rmjax.eval.voting``); pair data has one correct and one incorrect per
problem, so eval.json says it was skipped. ``--layout=shared_prompt`` (default) runs each pair's
prompt once, its responses in one row as ``rmjax.score`` packs best-of-N lines; ``sequences``: a
row per response. Both give the same rewards, final states and Q_t.

  python -m rmjax.evaluate --model=M --solutions=FILE.jsonl [--threshold=0] [--normalize] \
      [--out=DIR]

evaluates any labelled single solutions instead (``rmjax.eval.solutions``: one line per solution,
each scored once with ``rmjax.score``, ``--layout`` as there): ``--model`` is whatever
``rmjax.score`` reads (an rmjax run, an exported loss-lab run, a Hugging Face folder, a ``.gguf``).
Written: ``scored.jsonl``, ``eval.json``, ``eval.md``, ``reward_hist.png``, ``roc.png``.

# N: sequences, L: sequence length, D: model dim
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from tqdm import tqdm

from rmjax import score, sharding, train
from rmjax.checkpoint import resolve_run, restore_state, write_json
from rmjax.data import sources
from rmjax.data.pipeline import encode_pair, encode_sequence, kept_prefix
from rmjax.data.readers import iter_jsonl
from rmjax.eval import goal as goal_lib, localize, plots
from rmjax.eval import solutions as solutions_lib
from rmjax.eval.metrics import (auroc, auroc_ci, markdown_table, preference_metrics,
                                unique_solutions)
from rmjax.indexing import ReadRows, gather_rows
from rmjax.train_state import merge, model_config

LAYOUTS = score.LAYOUTS
VOTING_SKIPPED = ("pair data has one correct and one incorrect solution per problem, not several "
                  "sampled solutions with final answers; see rmjax.eval.voting")


# --- model ---

def make_forward(graphdef):
  """``forward(state, batch, goal_D)`` over single sequences ``batch = {tokens, mask}_NxL``:
  reward, final-token state, ``Q_t`` and the reward of every prefix (the head on each ``h_t``).
  Over packed rows ``batch = {tokens, mask, parts}_BxL, reads_BxR`` (``rmjax.score.row_arrays``):
  reward and final state at each read ([B, R]), ``Q_t`` and prefix reward at each row position."""

  def forward(state, batch, goal_D):
    model, _ = merge(graphdef, state)
    if "parts" in batch:
      reward_BxR, h_BxLxD = model(batch["tokens"], batch["mask"],
                                  ReadRows(None, batch["reads"]), parts_BxL=batch["parts"])
      return {"reward": reward_BxR, "h_final": gather_rows(h_BxLxD, batch["reads"]),
              "q": goal_lib.q_values(h_BxLxD, goal_D, batch["mask"]),
              "prefix_reward": model.head(h_BxLxD)[..., 0]}
    reward_N, h_NxLxD = model(batch["tokens"], batch["mask"])
    return {"reward": reward_N,
            "h_final": goal_lib.final_token_states(h_NxLxD, batch["mask"]),
            "q": goal_lib.q_values(h_NxLxD, goal_D, batch["mask"]),
            "prefix_reward": model.head(h_NxLxD)[..., 0]}
  return forward


def run_sequences(forward, state, rows: dict, goal_D, *, batch_size: int, mesh, rules,
                  desc: str) -> dict:
  """``forward`` over ``rows = {tokens, mask}_NxL`` in fixed-shape batches (one compile):
  ``train.batch_outputs`` over ``train.padded_batches``."""
  seqs = {k: rows[k] for k in ("tokens", "mask")}
  batches = tqdm(train.padded_batches(seqs, batch_size), desc=desc,
                 total=-(-len(seqs["tokens"]) // batch_size))
  return train.batch_outputs(lambda s, batch: forward(s, batch, goal_D), state, batches, mesh,
                             rules)


def pack_shared_prompt(rows: dict, row_len: int) -> list[score.Row]:
  """``rows = {tokens, mask, response}_NxL`` as ``rmjax.score`` packs lines
  (``score.pack_rows``): the sequences with one prompt (the same prompt tokens) share rows of at
  most ``row_len`` tokens, their common token prefix once."""
  real_NxL, resp_NxL = rows["mask"].astype(bool), rows["response"].astype(bool)
  seqs = [t[m].tolist() for t, m in zip(rows["tokens"], real_NxL)]
  keys = [t[m & ~r].tobytes() for t, m, r in zip(rows["tokens"], real_NxL, resp_NxL)]
  return score.pack_rows(seqs, keys, row_len, "shared_prompt")


def shared_prompt_batches(rows: dict, row_len: int, batch_size: int):
  """``({length: rows}, reads)``: the packed rows (``pack_shared_prompt``) sorted by length, cut
  ``batch_size`` per pass, each pass at the bucket of its longest (``score.bucket_length``) and
  grouped by that length; every row reads as many positions as the fullest (one compiled shape
  per length)."""
  packed, groups = sorted(pack_shared_prompt(rows, row_len), key=lambda r: len(r.ids)), {}
  for start in range(0, len(packed), batch_size):
    batch = packed[start:start + batch_size]
    groups.setdefault(score.bucket_length(len(batch[-1].ids), row_len), []).extend(batch)
  return groups, score.row_shape(packed, row_len)[1]


def run_shared_prompt(forward, state, rows: dict, goal_D, *, batch_size: int, mesh, rules,
                      desc: str, row_len: int = 0) -> dict:
  """``run_sequences``' outputs (padding: ``q`` NaN, ``prefix_reward`` 0) from packed rows
  (``pack_shared_prompt``) of at most ``row_len`` tokens (0: ``2 * L``, as training's
  shared-prompt rows: a pair always fits), ``train.batch_outputs`` over the batches of each
  length of ``shared_prompt_batches``; then each sequence's values are read back from its row:
  the shared positions, then its own part's."""
  real_NxL = rows["mask"].astype(bool)
  row_len = row_len or 2 * real_NxL.shape[1]
  (groups, n_reads), out = shared_prompt_batches(rows, row_len, batch_size), {}
  for length, group in tqdm(sorted(groups.items()), desc=desc):
    arrays = score.row_arrays(group, length, n_reads, 0)
    res = train.batch_outputs(lambda s, batch: forward(s, batch, goal_D), state,
                              train.padded_batches(arrays, batch_size), mesh, rules)
    if not out:
      n, l = real_NxL.shape
      out = {"reward": np.zeros(n, res["reward"].dtype),
             "h_final": np.zeros((n, res["h_final"].shape[-1]), res["h_final"].dtype),
             "q": np.full((n, l), np.nan, res["q"].dtype),
             "prefix_reward": np.zeros((n, l), res["prefix_reward"].dtype)}
    for b, row in enumerate(group):
      parts_L = np.asarray(row.parts)
      shared_S = np.flatnonzero(parts_L == 0)
      for r, (i, _) in enumerate(row.reads):
        at = np.concatenate([shared_S, np.flatnonzero(parts_L == r + 1)])
        to = np.flatnonzero(real_NxL[i])
        out["reward"][i], out["h_final"][i] = res["reward"][b, r], res["h_final"][b, r]
        out["q"][i, to], out["prefix_reward"][i, to] = res["q"][b, at], res["prefix_reward"][b, at]
  return out


def run_layout(layout: str, *args, **kwargs) -> dict:
  """``run_sequences`` (``layout='sequences'``) or ``run_shared_prompt``: the same outputs."""
  if layout not in LAYOUTS:
    raise ValueError(f"--layout={layout!r}: expected one of {LAYOUTS}")
  return (run_sequences if layout == "sequences" else run_shared_prompt)(*args, **kwargs)


def encode_pairs(source, tokenizer, config, n: int) -> dict:
  """The first ``n`` pairs of ``source`` as rows ``2i`` (chosen) and ``2i + 1`` (rejected)."""
  pairs = [encode_pair(source[i], tokenizer, config.data.max_len, config.data.padding_side)
           for i in range(n)]
  return {k: np.concatenate([p[k] for p in pairs]) for k in ("tokens", "mask", "response")}


def encode_solutions(solutions, tokenizer, config) -> dict:
  """Rows ``{tokens, mask, response}`` of single solutions ``{prompt, response}`` (for voting:
  several sampled solutions per problem, e.g. GSM8K's model solutions)."""
  rows = []
  for s in solutions:
    prompt_ids, response_ids = tokenizer.encode_prompt_response(s["prompt"], s["response"])
    rows.append(encode_sequence(prompt_ids, response_ids, config.data.max_len, tokenizer.pad_id,
                                config.data.padding_side, kept_prefix(tokenizer, prompt_ids)))
  return {k: np.stack(x) for k, x in zip(("tokens", "mask", "response"), zip(*rows))}


def voting_inputs(solutions, rows: dict, res: dict) -> list[dict]:
  """``rmjax.eval.voting`` solutions: each one's fields plus ``q``, its Q_t over response tokens."""
  return [{**s, "q": q_L[m_L.astype(bool)]}
          for s, q_L, m_L in zip(solutions, res["q"], rows["response"])]


# --- metrics ---

def error_windows(examples, tokenizer, response_lengths, k: int):
  """Token windows of each rejected response's first error, and which examples have one.

  ``start`` is the token holding ``error_char``; windows: ``step`` (to the end of its line) and
  ``within_<k>`` (that token and the ``k - 1`` after it). ``response_lengths``: response tokens
  in each encoded row. A response cut to fit ``max_len`` (its row holds fewer tokens than the
  tokenizer gives it, an appended EOS included) is left out. Returns ``(windows, keep_N)``.
  """
  start, step_end, keep = [], [], []
  for ex, length in zip(examples, response_lengths):
    text = ex["rejected"]
    offsets = localize.response_offsets(tokenizer, text)
    keep.append(len(tokenizer.encode_prompt_response("", text)[1]) <= length)
    if keep[-1]:
      start.append(localize.char_to_token(offsets, ex["error_char"]))
      newline = text.find("\n", ex["error_char"])
      step_end.append(len(offsets) if newline < 0 else localize.char_to_token(offsets, newline) + 1)
  start = np.asarray(start, np.int64)
  return {"step": (start, np.asarray(step_end, np.int64)), f"within_{k}": (start, start + k)}, \
      np.asarray(keep)


def evaluate(config, checkpoint: str, out_dir: str | None = None, *, goal_examples: int = 512,
             n_boot: int = 1000, hit_k: int = 3, threshold: float = 0.0,
             num_traces: int = 6, layout: str = "shared_prompt") -> dict:
  """Evaluates the checkpoint; writes ``eval.json``, ``eval.md`` and plots; returns the dict.
  ``layout``: ``shared_prompt`` (a pair's prompt runs once: ``run_shared_prompt``) or
  ``sequences`` (a row per response: ``run_sequences``); the same outputs."""
  if jax.process_count() > 1:
    raise RuntimeError("rmjax.evaluate runs in a single process")
  out_dir = out_dir or os.path.join(resolve_run(checkpoint)[2], "evaluate")
  os.makedirs(out_dir, exist_ok=True)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  with sharding.use_mesh(mesh, rules):
    tokenizer = sources.make_tokenizer(config)
    step, step_dir, graphdef, state = restore_state(config, mesh, checkpoint)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    forward = jax.jit(make_forward(graphdef), in_shardings=(state_sharding, None, None))
    run = lambda rows, goal_D, desc: run_layout(  # the same token slots per pass
        layout, forward, state, rows, goal_D, mesh=mesh,
        batch_size=(1 if layout == "shared_prompt" else 2) * config.train.batch_size,
        rules=rules, desc=desc)
    d = model_config(config).dim  # the checkpoint's with model.init_from

    # --- goal: correct (chosen) training solutions ---
    train_source = sources.make_source(config, "train")
    n_goal = min(goal_examples, len(train_source))
    goal_rows = encode_pairs(train_source, tokenizer, config, n_goal)
    chosen = {k: v[0::2] for k, v in goal_rows.items()}
    goal_D = goal_lib.goal_state(run(chosen, np.zeros(d, np.float32), "goal")["h_final"])
    goal_path = goal_lib.save_goal(step_dir, goal_D)

    # --- held-out pairs: chosen = correct, rejected = incorrect ---
    eval_source = sources.make_source(config, "validation")
    examples = [eval_source[i] for i in range(len(eval_source))]
    rows = encode_pairs(eval_source, tokenizer, config, len(examples))
    res = run(rows, goal_D, "eval")

  labels = np.tile([True, False], len(examples))
  groups = np.repeat([ex.get("problem_id", i) for i, ex in enumerate(examples)], 2)
  solutions = unique_solutions(rows["tokens"], groups)  # AUROCs count a solution once
  resp = rows["response"].astype(bool)
  q_traces = [q[m] for q, m in zip(res["q"], resp)]
  r_traces = [r[m] for r, m in zip(res["prefix_reward"], resp)]
  q_final = np.asarray([t[-1] for t in q_traces])
  result = {
      "step": int(step), "checkpoint": step_dir, "n_pairs": len(examples), "layout": layout,
      **preference_metrics(res["reward"][0::2], res["reward"][1::2], solutions),
      "n_solutions": len(solutions),
      "auroc_ci": auroc_ci(res["reward"][solutions], labels[solutions], groups[solutions],
                           n_boot=n_boot, seed=config.seed),
      "goal": {"path": goal_path, "n_correct_train_solutions": n_goal},
      "q": {"auroc_final_token": auroc(q_final[solutions], labels[solutions]),
            "mean_correct": float(np.mean(np.concatenate(q_traces[0::2]))),
            "mean_incorrect": float(np.mean(np.concatenate(q_traces[1::2]))),
            "flagged_correct_share": float(np.mean(
                localize.predict(q_traces[0::2], "below", threshold) >= 0))},
      "voting": {"skipped": VOTING_SKIPPED},
  }
  if "error_char" in examples[0]:
    windows, keep = error_windows(examples, tokenizer, [len(t) for t in q_traces[1::2]], hit_k)
    wrong_q = [t for t, kept in zip(q_traces[1::2], keep) if kept]
    wrong_r = [t for t, kept in zip(r_traces[1::2], keep) if kept]
    result["localization"] = {
        "n_truncated_left_out": int(np.sum(~keep)),
        "q_largest_drop": localize.localization_metrics(wrong_q, windows),
        "q_below": localize.localization_metrics(wrong_q, windows, "below", threshold),
        "prefix_reward_largest_drop": localize.localization_metrics(wrong_r, windows)}
    trace_errors = np.full(len(examples), -1)
    trace_errors[keep] = windows["step"][0]
  else:
    trace_errors = np.full(len(examples), -1)
    result["localization"] = {"skipped": "the data records no error_char"}

  # --- outputs ---
  reward, label = res["reward"][solutions], labels[solutions]
  result["plots"] = [
      plots.reward_histogram(os.path.join(out_dir, "reward_hist.png"), reward, label),
      plots.roc_curve(os.path.join(out_dir, "roc.png"), reward, label, result["auroc"]),
      _plot_traces(os.path.join(out_dir, "q_traces.png"), q_traces, trace_errors, num_traces,
                   threshold)]
  ci, loc = result["auroc_ci"], result["localization"].get("q_largest_drop", {})
  table = markdown_table([{
      "dataset": f"{config.data.name}/validation", "pairs": len(examples),
      "pairwise acc.": result["pairwise_accuracy"],
      "AUROC [95% CI]": f"{ci['auroc']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]",
      "Q_t loc. hit (step)": loc.get("hit_rate_step", "-"),
      "random (step)": loc.get("random_hit_rate_step", "-")}])
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write(table)
  write_json(os.path.join(out_dir, "eval.json"), result, indent=2)
  return result


def evaluate_solutions(model: str, solutions_path: str, out_dir: str | None = None, *,
                       threshold: float = 0.0, normalize: bool = False, n_boot: int = 1000,
                       seed: int = 0, batch_size: int = 16, max_len: int = 2048,
                       layout: str = "shared_prompt") -> dict:
  """Scores every labelled solution of ``solutions_path`` once with ``model`` (``rmjax.score``)
  and reports ``rmjax.eval.solutions.solution_metrics``; ``normalize``: rewards ``(r - mean) /
  std`` with the stats stored with the model (``rmjax.score.reward_stats``), so that threshold 0
  is the stored mean. ``layout``: ``rmjax.score``'s (the solutions of one prompt share rows, or a
  row each; the same rewards). Writes ``scored.jsonl``, ``eval.json``, ``eval.md`` and plots."""
  labels, problems = solutions_lib.read_labels(solutions_path)  # bad lines before any model
  stats = score.reward_stats(model) if normalize else None
  out_dir = out_dir or os.path.splitext(solutions_path)[0] + "_eval"
  os.makedirs(out_dir, exist_ok=True)
  scored = os.path.join(out_dir, "scored.jsonl")
  mesh = sharding.make_mesh((-1, 1, 1))
  with sharding.use_mesh(mesh):
    rm, tokenizer = score.load_model(model, mesh)
    score.score_file(rm, tokenizer, solutions_path, scored, batch_size=batch_size,
                     max_len=max_len, mesh=mesh, stats=stats, layout=layout)
  rewards = np.asarray([r["reward"] for _, r in iter_jsonl(scored)], np.float64)
  result = {"model": model, "solutions": solutions_path, "scored": scored, "normalized": normalize,
            **solutions_lib.solution_metrics(rewards, labels, problems, threshold=float(threshold),
                                             n_boot=n_boot, seed=seed)}
  result["plots"] = [
      plots.reward_histogram(os.path.join(out_dir, "reward_hist.png"), rewards, labels),
      plots.roc_curve(os.path.join(out_dir, "roc.png"), rewards, labels, result["auroc"])]
  ci = result["auroc_ci"]
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write(markdown_table([{
        "solutions": os.path.basename(solutions_path), "n": result["n_solutions"],
        "problems": result["n_problems"],
        "AUROC [95% CI]": f"{ci['auroc']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]",
        f"accuracy (reward > {result['threshold']:.3g})": result["accuracy"]}]))
  write_json(os.path.join(out_dir, "eval.json"), result, indent=2)
  return result


def _plot_traces(path, q_traces, error_N, num_traces: int, threshold: float) -> str:
  """The first ``num_traces // 2`` pairs: correct (chosen) and incorrect (first error marked)."""
  n = min(max(num_traces // 2, 1), len(error_N))
  errors = [e for i in range(n) for e in (-1, int(error_N[i]))]
  names = [f"pair {i} {side}" for i in range(n) for side in ("correct", "incorrect")]
  return plots.q_traces(path, q_traces[:2 * n], [i % 2 == 0 for i in range(2 * n)], errors, names,
                        threshold)


# --- command line ---

def _cli():
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Training config file [:arg].",
                                           lock_config=True)
  checkpoint = flags.DEFINE_string("checkpoint", None, "Workdir, its checkpoints/ or a step dir.")
  model = flags.DEFINE_string("model", None, "With --solutions: an rmjax run, HF folder or .gguf.")
  solutions = flags.DEFINE_string("solutions", None, "JSONL of labelled single solutions: "
                                  "prompt+response, text or messages, with label (and problem_id).")
  out = flags.DEFINE_string("out", None, "Output folder (default <workdir>/evaluate; with "
                            "--solutions, <FILE>_eval).")
  goal_examples = flags.DEFINE_integer(
      "goal_examples", 512, "Training pairs whose chosen (correct) responses define the goal.")
  n_boot = flags.DEFINE_integer("n_boot", 1000, "Bootstrap draws for the AUROC interval.")
  hit_k = flags.DEFINE_integer("hit_k", 3, "Localisation window: the first error + k-1 tokens.")
  threshold = flags.DEFINE_float("threshold", 0.0, "Q_t threshold of the 'below' rule; with "
                                 "--solutions, the reward above which a solution counts as "
                                 "correct.")
  normalize = flags.DEFINE_bool("normalize", False, "With --solutions: rewards (r - mean) / std "
                                "with the stats stored with --model (threshold 0 = the mean).")
  batch_size = flags.DEFINE_integer("batch_size", 16, "With --solutions: sequences per pass.")
  max_len = flags.DEFINE_integer("max_len", 2048, "With --solutions: longest sequence.")
  layout = flags.DEFINE_enum(
      "layout", "shared_prompt", LAYOUTS, "shared_prompt: the responses of one prompt share a "
      "row, the prompt once (the same outputs); sequences: a row per response.")

  def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it reads at INFO
    if solutions.value:
      if not model.value or checkpoint.value:
        raise app.UsageError("--solutions scores with --model (not --checkpoint)")
      result = evaluate_solutions(
          model.value, solutions.value, out.value, n_boot=n_boot.value, threshold=threshold.value,
          normalize=normalize.value, batch_size=batch_size.value, max_len=max_len.value,
          layout=layout.value)
      keys = ("n_solutions", "n_problems", "auroc", "auroc_ci", "threshold", "accuracy")
    else:
      if config.value is None or not checkpoint.value:
        raise app.UsageError("give --config and --checkpoint (held-out pairs), or --model and "
                             "--solutions (a labelled solutions file)")
      result = evaluate(config.value, checkpoint.value, out.value,
                        goal_examples=goal_examples.value, n_boot=n_boot.value,
                        hit_k=hit_k.value, threshold=threshold.value, layout=layout.value)
      keys = ("step", "pairwise_accuracy", "auroc", "auroc_ci")
    print(json.dumps({k: result[k] for k in keys}))

  app.run(main)


if __name__ == "__main__":
  _cli()
