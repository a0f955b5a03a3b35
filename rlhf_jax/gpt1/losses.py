"""GPT-1 fine-tuning objective L3 = L2 + λ·L1 (Radford et al. 2018, eq. 5).

L2 is the task cross-entropy (classes, or options for multiple choice); L1 is the language-model
loss on the same input tokens (`losses.lm.lm_loss`, every real token after the first is a target,
including the delimiter and extract tokens); λ = `aux_lm_weight` (paper: 0.5). Both are computed
from one trunk pass. L1 is always computed and logged, so a λ = 0 run still reports how far the
fine-tuned trunk drifts from a language model; with λ = 0 its gradient contribution is exactly 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.gpt1 import heads
from rlhf_jax.losses.lm import lm_loss
from rlhf_jax.model import gpt


def task_loss(logits, labels, weight):
  """Weighted mean cross-entropy.

  logits: float [B, C] (multiple choice: option scores with padding at `heads.NEG`);
  labels: int [B]; weight: float [B] (0 drops an example, e.g. eval padding).
  Returns (loss float32 scalar, metrics {task_loss, accuracy, num_examples}).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  w = weight.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  loss = jnp.sum(nll * w) / denom
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return loss, {"task_loss": loss, "accuracy": jnp.sum(correct * w) / denom, "num_examples": w.sum()}


def aux_lm_targets(tokens, attention_mask, weight=None):
  """Next-token targets for the auxiliary LM loss on right-padded rows.

  tokens, attention_mask: int [M, T]; weight: optional float [M] per row.
  Returns (targets int32 [M, T], mask float32 [M, T]): targets[:, t] = tokens[:, t+1]; the mask
  is 1 where that target is a real token (times the row weight), 0 at the last position.
  """
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1).astype(jnp.int32)
  real = jnp.concatenate([attention_mask[:, 1:], jnp.zeros_like(attention_mask[:, :1])], axis=1)
  mask = real.astype(jnp.float32)
  if weight is not None:
    mask = mask * weight.astype(jnp.float32)[:, None]
  return targets, mask


def l3(l2, l1, aux_lm_weight):
  """L3 = L2 + λ·L1."""
  return l2 + aux_lm_weight * l1


def make_loss_fn(model_cfg, task: str, aux_lm_weight: float, head_dropout: float = 0.0):
  """loss_fn(params, batch, rng) -> (L3, metrics) for `supervised.fit`.

  params: {"gpt", "task_head"}; batch: see `batches.py` ([B, N, T] tokens etc.). rng None
  (evaluation) disables dropout. Metrics: task_loss (L2), lm_loss (L1), accuracy, lm_accuracy,
  num_examples (eval weight key), num_tokens.
  """
  cfg = gpt.GPTConfig.from_dict(model_cfg)

  def loss_fn(params, batch, rng):
    logits, hidden = heads.forward(params, cfg, task, batch, rng, head_dropout if rng is not None else 0.0)
    l2, metrics = task_loss(logits, batch["label"], batch["weight"])
    b, n, t = batch["tokens"].shape
    row_weight = (batch["option_mask"] * batch["weight"][:, None]).reshape(b * n)
    targets, mask = aux_lm_targets(batch["tokens"].reshape(b * n, t), batch["attention_mask"].reshape(b * n, t),
                                   row_weight)
    l1, lm_metrics = lm_loss(gpt.unembed(params["gpt"], cfg, hidden), targets, mask)
    metrics.update(lm_loss=l1, lm_accuracy=lm_metrics["accuracy"], num_tokens=lm_metrics["num_tokens"])
    return l3(l2, l1, aux_lm_weight), metrics

  return loss_fn
