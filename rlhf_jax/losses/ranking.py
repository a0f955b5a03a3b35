"""K-wise reward-model ranking loss (InstructGPT, Ouyang et al. 2022, eq. 1).

For a prompt with K ranked responses, every ordered pair (w, l) with w ranked
strictly better than l contributes ``-log sigmoid(r_w - r_l)``. InstructGPT
normalises by the number of pairs of that prompt (1 / C(K, 2) when there are no
ties), so a prompt with 9 responses weighs the same as one with 4; prompts are
then averaged. All K responses of a prompt are scored in one forward pass and
the C(K, 2) comparisons come from that single [B, K] reward array.

Conventions: ``ranks`` is 0 for the best response, larger is worse; equal ranks
form no pair (ties carry no preference); entries with ``valid == False`` (ragged
K) are inert - their rewards are zeroed before any arithmetic, so even NaN/inf
there gives a finite loss and exactly 0 gradient. Prompts with no pair (fewer
than two valid responses, or all tied) are excluded from the mean.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

Metrics = Dict[str, jax.Array]


def pair_matrix(rewards: jax.Array, ranks: jax.Array, valid: jax.Array):
  """Returns (pairs bool [B,K,K], safe_diff f32 [B,K,K], r f32 [B,K]).

  ``pairs[b, i, j]`` is True when i is strictly better than j and both are
  valid; ``safe_diff[b, i, j] = r_i - r_j`` on those pairs and 0 elsewhere; ``r`` is
  ``rewards`` in float32 with invalid entries zeroed. Shared with ``losses/dpo.py``.
  """
  r = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
  both = valid[:, :, None] & valid[:, None, :]
  pairs = both & (ranks[:, :, None] < ranks[:, None, :])
  diff = r[:, :, None] - r[:, None, :]
  return pairs, jnp.where(pairs, diff, 0.0), r


def kwise_ranking_loss(rewards: jax.Array, ranks: jax.Array, valid: jax.Array) -> Tuple[jax.Array, Metrics]:
  """InstructGPT K-wise ranking loss.

  Args:
    rewards: float [B, K], scalar reward per response (any float dtype; math in float32).
    ranks: int [B, K], 0 = best; equal ranks form no pair.
    valid: bool [B, K], False for padding responses (ragged K).

  Returns:
    (loss, metrics). loss: float32 scalar,
    ``mean_{prompts with pairs} [ -mean_{pairs (w,l)} log sigmoid(r_w - r_l) ]``.
    metrics (float32 scalars):
      loss; accuracy (fraction of pairs with r_w > r_l, pooled over all pairs);
      prompt_mean_accuracy (per-prompt pair accuracy, averaged over prompts with
      pairs); num_pairs; num_prompts (prompts with >= 1 pair); reward_mean and
      reward_std (population std) over valid entries; margin (mean r_w - r_l,
      pooled over pairs).
  """
  if rewards.ndim != 2:
    raise ValueError(f"rlhf_jax/losses/ranking.py:kwise_ranking_loss: rewards must be [B,K], got {rewards.shape}")
  for name, arr in (("ranks", ranks), ("valid", valid)):
    if tuple(arr.shape) != tuple(rewards.shape):
      raise ValueError(
          f"rlhf_jax/losses/ranking.py:kwise_ranking_loss: {name} shape {tuple(arr.shape)} "
          f"!= rewards shape {tuple(rewards.shape)}"
      )
  if not jnp.issubdtype(ranks.dtype, jnp.integer):
    raise ValueError(f"rlhf_jax/losses/ranking.py:kwise_ranking_loss: ranks must be integer, got {ranks.dtype}")
  if valid.dtype != jnp.bool_:
    raise ValueError(f"rlhf_jax/losses/ranking.py:kwise_ranking_loss: valid must be bool, got {valid.dtype}")

  pairs, diff, r = pair_matrix(rewards, ranks, valid)
  pairs_f = pairs.astype(jnp.float32)

  n_pairs_b = jnp.sum(pairs_f, axis=(1, 2))  # [B]
  has_pairs = (n_pairs_b > 0).astype(jnp.float32)
  safe_np = jnp.maximum(n_pairs_b, 1.0)
  # log_sigmoid is stable for large |diff|; diff is 0 off-pair so no NaN leaks.
  nll_b = -jnp.sum(jax.nn.log_sigmoid(diff) * pairs_f, axis=(1, 2)) / safe_np
  num_prompts = jnp.sum(has_pairs)
  loss = jnp.sum(nll_b * has_pairs) / jnp.maximum(num_prompts, 1.0)

  sg_diff = jax.lax.stop_gradient(diff)
  correct = ((sg_diff > 0) & pairs).astype(jnp.float32)
  num_pairs = jnp.sum(n_pairs_b)
  safe_total = jnp.maximum(num_pairs, 1.0)
  acc_b = jnp.sum(correct, axis=(1, 2)) / safe_np

  valid_f = valid.astype(jnp.float32)
  n_valid = jnp.maximum(jnp.sum(valid_f), 1.0)
  r_sg = jax.lax.stop_gradient(r)
  r_mean = jnp.sum(r_sg * valid_f) / n_valid
  r_var = jnp.sum(jnp.square(r_sg - r_mean) * valid_f) / n_valid

  metrics = {
      "loss": loss,
      "accuracy": jnp.sum(correct) / safe_total,
      "prompt_mean_accuracy": jnp.sum(acc_b * has_pairs) / jnp.maximum(num_prompts, 1.0),
      "num_pairs": num_pairs,
      "num_prompts": num_prompts,
      "reward_mean": r_mean,
      "reward_std": jnp.sqrt(r_var),
      "margin": jnp.sum(sg_diff * pairs_f) / safe_total,
  }
  return loss, metrics


def pairwise_loss(chosen: jax.Array, rejected: jax.Array) -> Tuple[jax.Array, Metrics]:
  """K = 2 convenience: mean over the batch of ``-log sigmoid(chosen - rejected)``.

  Args:
    chosen: float [B], reward of the preferred response.
    rejected: float [B], reward of the other response.

  Returns:
    (loss, metrics) exactly as ``kwise_ranking_loss`` with K = 2.
  """
  if chosen.ndim != 1 or tuple(chosen.shape) != tuple(rejected.shape):
    raise ValueError(
        "rlhf_jax/losses/ranking.py:pairwise_loss: chosen and rejected must both be [B], "
        f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
    )
  rewards = jnp.stack([chosen, rejected], axis=1)
  ranks = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), rewards.shape)
  valid = jnp.ones(rewards.shape, jnp.bool_)
  return kwise_ranking_loss(rewards, ranks, valid)
