"""The training recipe: data, model & optimiser, one pure jitted step, eval, checkpoints, metrics.

# B: batch of pairs, A: gradient-accumulation micro-batches
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from rmjax import objective, sharding
from rmjax.checkpoint import Checkpointer, write_json, write_text
from rmjax.data import sources
from rmjax.data.pipeline import encode_pair, eval_batches, train_dataset
from rmjax.eval.metrics import preference_metrics, reward_stats, unique_solutions
from rmjax.train_state import abstract_state, create_state, merge, model_config, trainable_filter

log = logging.getLogger(__name__)


# --- steps ---

def jit_train_step(graphdef, config, state_sharding):
  """The trainer's step for ``config``: ``make_train_step``, jitted with the state's shardings in
  and out and the state donated (``rmjax.memory.compiled`` analyses this same step)."""
  terms = objective.build_terms(config.loss)
  return jax.jit(make_train_step(graphdef, terms, accum_steps=config.train.accum_steps,
                                 seed=config.seed, trainable=trainable_filter(config)),
                 in_shardings=(state_sharding, None), out_shardings=(state_sharding, None),
                 donate_argnums=0)


def make_train_step(graphdef, terms, *, accum_steps: int, seed: int, trainable=nnx.Param,
                    start_layer: int = 0):
  """``train_step(state, batch) -> (state, metrics)``: pure; randomness from (seed, step).
  Gradients flow to the ``trainable`` parameters only (``trainable_filter``); ``start_layer``:
  batches of cached features entering that block (``rmjax.loss_lab``)."""
  if accum_steps < 1:
    raise ValueError(f"train.accum_steps={accum_steps}: must be at least 1")
  base_key = jax.random.key(seed)

  def train_step(state, batch):
    model, opt = merge(graphdef, state)
    key = jax.random.fold_in(base_key, opt.step[...])
    model_def, params, rest = nnx.split(model, trainable, ...)

    def loss_fn(params, micro_batch, key, scales=None):
      return objective.objective(nnx.merge(model_def, params, rest), micro_batch, key, terms,
                                 start_layer, scales)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, key)
    else:
      if batch["mask"].shape[0] % accum_steps:
        raise ValueError(f"train.batch_size={batch['mask'].shape[0]} does not split into "
                         f"train.accum_steps={accum_steps} equal micro-batches")
      # micro-batch a takes rows a, a+A, a+2A, ...: every device keeps an equal share
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)
      # a term that averages over its valid samples (contrastive) weighs micro-batch a by its
      # share of them, so the sum is the big batch's mean; the others weigh each the same
      counts = jax.vmap(lambda mb: objective.sample_counts(mb, terms))(micro)
      scales = {name: accum_steps * c_A / jnp.maximum(jnp.sum(c_A), 1)
                for name, c_A in counts.items()}

      def accumulate(grads_sum, xs):
        micro_batch, a, scale = xs
        (_, m), g = grad_fn(params, micro_batch, jax.random.fold_in(key, a), scale)
        return jax.tree.map(jnp.add, grads_sum, g), m

      grads, metrics = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                    (micro, jnp.arange(accum_steps), scales))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      metrics = jax.tree.map(jnp.mean, metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["skipped"] = (~jnp.isfinite(metrics["grad_norm"])).astype(jnp.int32)
    opt.update(model, grads)
    metrics["skipped_total"] = opt.opt_state.total_notfinite[...]
    metrics["skipped_in_a_row"] = opt.opt_state.notfinite_count[...]
    return nnx.state({"model": model, "optimizer": opt}), metrics

  return train_step


def make_eval_step(graphdef, start_layer: int = 0):
  def eval_step(state, batch):
    model, _ = merge(graphdef, state)
    no_states = jnp.zeros((batch["mask"].shape[0], 2, 0), jnp.int32)  # the rewards only
    out = objective.forward_pairs(model, batch, start_layer, no_states)
    return out.reward_chosen_B, out.reward_rejected_B
  return eval_step


def distinct_solutions(source, tokenizer, config) -> np.ndarray:
  """Rows (pair i: 2i chosen, 2i + 1 rejected) of the distinct solutions of ``source``'s pairs, by
  ``problem_id`` and tokens: a solution in several pairs counts once in the AUROC."""
  examples = [source[i] for i in range(len(source))]
  tokens = [encode_pair(ex, tokenizer, config.data.max_len, config.data.padding_side)["tokens"]
            for ex in examples]
  return unique_solutions(np.stack(tokens),
                          np.repeat([ex.get("problem_id", i) for i, ex in enumerate(examples)], 2))


def padded_batches(rows: dict, batch_size: int):
  """``(batch, n_real)`` of ``rows`` (host arrays, one row per example; one process): one shape
  (one compile), the last batch filled up with the final row, as ``pipeline.eval_batches``."""
  n = len(next(iter(rows.values())))
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)
    yield {k: v[idx] for k, v in rows.items()}, min(batch_size, n - start)


def batch_outputs(fn, state, batches, mesh, rules=sharding.DEFAULT_RULES):
  """``fn(state, batch)``'s outputs (a tree of arrays, rows first) over ``batches`` of ``(host
  batch, n_real)``, put on ``mesh`` and read back once each, the rows after ``n_real`` dropped:
  the one evaluation loop (the trainer's, the loss lab's, ``rmjax.evaluate``'s)."""
  outs = [jax.tree.map(lambda x: np.asarray(x)[:n_real],
                       jax.device_get(fn(state, sharding.host_to_global(batch, mesh, rules))))
          for batch, n_real in batches]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def evaluate(eval_step, state, source, tokenizer, config, mesh, rules,
             solutions=None) -> dict[str, float]:
  """Rewards of every held-out pair -> pairwise accuracy, and AUROC of reward vs correctness, mean
  and std (``reward_mean``, ``reward_std``) over the rows ``solutions`` (``distinct_solutions``;
  every row when None)."""
  batches = eval_batches(source, tokenizer, global_batch_size=config.train.batch_size,
                         max_len=config.data.max_len, padding_side=config.data.padding_side)
  chosen, rejected = batch_outputs(eval_step, state, batches, mesh, rules)
  rewards = np.stack([chosen, rejected], 1).reshape(-1)
  stats = reward_stats(rewards if solutions is None else rewards[solutions])
  return {**preference_metrics(chosen, rejected, solutions), "reward_mean": stats["mean"],
          "reward_std": stats["std"]}


# --- metrics output ---

class MetricsWriter:
  """``metrics.jsonl`` (one object per logged step) + TensorBoard events; process 0 only.

  A run resumed at step ``start`` redoes the steps after it: their lines are dropped from
  ``metrics.jsonl`` (and a last line cut short by a crash), and TensorBoard hides their events
  (``purge_step``: events from ``start + 1`` on; those of ``start`` are the checkpoint's).
  """

  def __init__(self, workdir: str, start: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path):
        self._drop_after(path, start)
      self._jsonl = open(path, "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)

  @staticmethod
  def _drop_after(path: str, start: int) -> None:
    """Rewrites ``path`` (atomically) without the lines of steps after ``start``."""
    with open(path) as f:
      lines = f.readlines()

    def keep(line: str) -> bool:
      if not line.endswith("\n"):
        return False  # cut short by a crash
      try:
        return json.loads(line)["step"] <= start
      except (ValueError, KeyError, TypeError):
        return True  # not a metrics line: not ours to drop
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
      write_text(path, "".join(kept))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


# --- the loop ---

def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, eval, checkpoint) runs after ``step``: every ``every`` steps
  and after the last one (big_vision's ``utils.itstime``, without its options)."""
  return step % every == 0 or step == total


def check_finite(step: int, skipped_in_a_row, limit: int | None) -> None:
  """A FloatingPointError once ``limit`` updates in a row were skipped (non-finite gradients;
  None: never). The streak is read explicitly: no implicit transfer."""
  if limit is not None and (n := int(jax.device_get(skipped_in_a_row))) >= limit:
    raise FloatingPointError(f"step {step}: {n} non-finite gradients in a row (updates skipped), "
                             f"optim.max_consecutive_nonfinite={limit}: training stopped")


def loop(train_step, state, batches, *, start: int, steps: int, every: dict[str, int],
         max_nonfinite: int | None, progress: bool = False):
  """The one training loop (``train``'s, the loss lab's): ``state, metrics = train_step(state,
  next(batches))`` for steps ``start + 1 .. steps``; yields ``(step, state, metrics, due)`` at the
  steps where actions of ``every`` (``{name: interval}``, ``itstime``) are due, ``metrics`` read
  from the device once. ``max_nonfinite`` skips in a row (``check_finite``) stop it before any
  action of that step but ``"log"``. The device runs ahead: between yields, a step's skip streak
  is read while the next step runs. ``progress``: a tqdm bar."""
  unchecked = None  # (step, its streak on the device) not yet checked
  bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", disable=not progress)
  for step in bar:
    state, metrics = train_step(state, next(batches))
    done = step + 1
    if unchecked is not None:
      check_finite(*unchecked, max_nonfinite)
    unchecked = done, metrics["skipped_in_a_row"]
    due = {name for name, n in every.items() if itstime(done, n, steps)}
    if not due:
      continue
    host, unchecked = jax.device_get(metrics), None
    if "log" in due:
      bar.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host['pairwise_accuracy']:.3f}")
    if max_nonfinite is not None and host["skipped_in_a_row"] >= max_nonfinite:
      due &= {"log"}  # logged, then stopped: nothing evaluated or saved past the limit
    if due:
      yield done, state, host, due
    check_finite(done, host["skipped_in_a_row"], max_nonfinite)


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes the run in ``workdir``) to ``config.train.steps``; returns final eval."""
  for field in ("log_every", "eval_every", "ckpt_every"):
    if config.train[field] < 1:
      raise ValueError(f"train.{field}={config.train[field]}: must be at least 1")
  os.makedirs(workdir, exist_ok=True)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mesh = sharding.make_mesh(tuple(config.mesh.shape), dcn_shape=config.mesh.get("dcn_shape"))
  shards = sharding.batch_shards(mesh, rules)
  if config.train.batch_size % shards:
    raise ValueError(f"train.batch_size={config.train.batch_size} does not split over the "
                     f"{shards} batch shards of mesh.shape={tuple(mesh.devices.shape)}")
  with sharding.use_mesh(mesh, rules):
    # --- data ---
    tokenizer = sources.make_tokenizer(config)
    vocab_size = model_config(config).vocab_size
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                       f"vocabulary ({tokenizer.vocab_size})")
    data_iter = iter(train_dataset(
        sources.make_source(config, "train"), tokenizer,
        global_batch_size=config.train.batch_size, max_len=config.data.max_len,
        seed=config.seed, padding_side=config.data.padding_side,
        pack_shards=max(1, shards // jax.process_count()),  # data.layout='packed' groups
        accum_steps=config.train.accum_steps, **sources.pipeline_options(config)))
    eval_source = sources.make_source(config, "validation")
    eval_solutions = distinct_solutions(eval_source, tokenizer, config)

    # --- model & optimiser (fresh, or restored with the data position) ---
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        max_to_keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpointing)
    graphdef, abstract = abstract_state(config, mesh)
    start, state = ckpt.restore_latest(abstract, data_iter)
    if state is None:
      start, (graphdef, state) = 0, create_state(config, mesh)
    else:
      log.info("resumed %s at step %d", workdir, start)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jit_train_step(graphdef, config, state_sharding)
    # rewards come back replicated: every process reads the whole global batch's
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(state_sharding, None),
                        out_shardings=sharding.replicated(mesh))

    # --- loop ---
    writer = MetricsWriter(workdir, start)
    steps, cfg = config.train.steps, config.train
    final, t0 = {}, time.perf_counter()
    try:
      for done, state, host, due in loop(
          train_step, state, (sharding.host_to_global(b, mesh, rules) for b in data_iter),
          start=start, steps=steps, max_nonfinite=config.optim.max_consecutive_nonfinite,
          every={"log": cfg.log_every, "eval": cfg.eval_every, "save": cfg.ckpt_every},
          progress=jax.process_index() == 0):
        if "log" in due:
          scalars = {f"train/{k}": v for k, v in host.items()}
          scalars["train/steps_per_s"] = (done - start) / (time.perf_counter() - t0)
          writer.write(done, scalars)
        if "eval" in due:
          final = evaluate(eval_step, state, eval_source, tokenizer, config, mesh, rules,
                           eval_solutions)
          writer.write(done, {f"eval/{k}": v for k, v in final.items()})
          log.info("step %d eval %s", done, final)
        if "save" in due:
          ckpt.save(done, state, data_iter)  # the data position: the next batch is not read yet
    except FloatingPointError as e:
      ckpt.wait()  # the last good checkpoint is complete
      raise FloatingPointError(f"{e}; newest checkpoint: step {ckpt.manager.latest_step()}"
                               ) from None
    if start >= steps and not final:  # already finished: report eval of the final state
      final = evaluate(eval_step, state, eval_source, tokenizer, config, mesh, rules,
                       eval_solutions)
    ckpt.wait()
    ckpt.close()
    writer.close()
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "eval.json"), {"step": steps, **final}, indent=2)
    # what ``(r - mean) / std`` normalisation reads (rmjax.score --normalize, exports)
    write_json(os.path.join(workdir, "reward_stats.json"), {
        "mean": final["reward_mean"], "std": final["reward_std"], "split": "validation",
        "n": int(len(eval_solutions)), "step": steps}, indent=2)
  return final
