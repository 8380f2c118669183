"""From a batch of pairs to the training objective: one forward pass, then the weighted terms.

# B: batch of pairs, L: sequence length, D: model dim

The terms come from ``config.loss``: ``bt_weight`` x Bradley-Terry, ``beta`` x the goal-conditioned
contrastive term, and any user terms ``"package.module:function=weight"`` (comma-separated in
``loss.custom``), each called as ``fn(out: PairOutputs, key)``.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rmjax import losses

Term = tuple[str, float, Callable]


def load_function(spec: str) -> Callable:
  """``package.module:function`` -> the function, with an error that names what is missing."""
  module_name, sep, fn_name = spec.partition(":")
  if not sep or not module_name or not fn_name:
    raise ValueError(f"loss term {spec!r}: expected 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"loss term {spec!r}: cannot import {module_name!r}: {e}") from None
  if not callable(fn := getattr(module, fn_name, None)):
    raise ValueError(f"loss term {spec!r}: {module_name} has no function {fn_name!r}")
  return fn


def build_terms(loss_cfg) -> list[Term]:
  """``(name, weight, fn)`` for every term with a non-zero weight."""
  terms: list[Term] = []
  if loss_cfg.bt_weight:
    terms.append(("bt", float(loss_cfg.bt_weight), losses.bt_term))
  if loss_cfg.beta:
    c = loss_cfg.contrastive
    terms.append(("contrastive", float(loss_cfg.beta), functools.partial(
        losses.contrastive_term, mode=c.mode, goal=c.goal, num_samples=c.num_samples,
        num_goal_samples=c.num_goal_samples, temperature=c.temperature, reduction=c.reduction)))
  for item in filter(None, (s.strip() for s in loss_cfg.custom.split(","))):
    spec, sep, weight = item.rpartition("=")
    if not sep:
      raise ValueError(f"loss.custom item {item!r}: expected 'package.module:function=weight'")
    terms.append((spec.rpartition(":")[2], float(weight), load_function(spec)))
  if not terms:
    raise ValueError("config.loss: every term has weight 0; nothing to train")
  return terms


def forward_pairs(model, batch, start_layer: int = 0) -> losses.PairOutputs:
  """Runs chosen and rejected sequences through the model in one pass of 2B sequences.

  A batch from the loss lab carries ``features`` [B, 2, L, D] (the cached hidden states entering
  block ``start_layer``) instead of ``tokens``; the rest of the model runs on them.
  """
  b, _, l = batch["mask"].shape
  mask_2BxL = batch["mask"].reshape(2 * b, l)
  if "features" in batch:
    reward_2B, h_2BxLxD = model.from_features(
        batch["features"].reshape(2 * b, l, -1), mask_2BxL, start_layer)
  else:
    reward_2B, h_2BxLxD = model(batch["tokens"].reshape(2 * b, l), mask_2BxL)
  reward_Bx2 = reward_2B.reshape(b, 2)
  h_Bx2xLxD = h_2BxLxD.reshape(b, 2, l, -1)
  return losses.PairOutputs(
      reward_chosen_B=reward_Bx2[:, 0], reward_rejected_B=reward_Bx2[:, 1],
      h_chosen_BxLxD=h_Bx2xLxD[:, 0], h_rejected_BxLxD=h_Bx2xLxD[:, 1],
      mask_chosen_BxL=batch["mask"][:, 0], mask_rejected_BxL=batch["mask"][:, 1],
      response_chosen_BxL=batch["response"][:, 0], response_rejected_BxL=batch["response"][:, 1],
      margin_B=batch["margin"])


def objective(model, batch, key, terms: list[Term], start_layer: int = 0):
  """Total loss and a flat metrics dict (``<term>_loss``, ``<term>/<metric>``, ...)."""
  out = forward_pairs(model, batch, start_layer)
  total = jnp.zeros((), jnp.float32)
  metrics = losses.pair_metrics(out.reward_chosen_B, out.reward_rejected_B)
  for i, (name, weight, fn) in enumerate(terms):
    result = fn(out, jax.random.fold_in(key, i))
    value, extra = result if isinstance(result, tuple) else (result, {})
    total = total + weight * value
    metrics[f"{name}_loss"] = value
    metrics.update({f"{name}/{k}": v for k, v in extra.items()})
  metrics["loss"] = total
  return total, metrics
