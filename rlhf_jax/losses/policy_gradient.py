"""Critic-free policy gradients: RLOO and GRPO group advantages, and their clipped loss.

Both methods sample K responses per prompt and use the other samples of the same prompt as the
baseline, so no value model is needed:
  * RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``A_i = s_i - mean_{j != i} s_j`` over the
    *other* valid samples of the prompt (the leave-one-out baseline keeps the estimate unbiased);
  * GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (s_i - mean_j s_j) / (std_j s_j + eps)`` with the
    mean and the sample standard deviation (divide by n - 1, as torch's ``std``) over the prompt's
    valid samples.
A sample that is invalid, or whose prompt has fewer than 2 valid samples, gets advantage 0 (it then
contributes no gradient). Scores at invalid positions are never read (``jnp.where``), so NaN
padding is inert.

The loss is PPO's clipped surrogate (``losses.ppo.policy_loss``) with the sequence advantage on
every response token, plus, optionally, GRPO's KL penalty to the reference policy with the k3
estimator ``exp(q - p) - (q - p) - 1`` (q = log pi_ref, p = log pi; Schulman 2020), which is
non-negative per token and unbiased for KL(pi || pi_ref) under samples from pi.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses import ppo as ppo_losses

_WHERE = "rlhf_jax/losses/policy_gradient.py"

KINDS = ("rloo", "grpo")


def group_advantages(scores: jax.Array, valid: jax.Array, kind: str, eps: float = 1e-4) -> jax.Array:
  """Per-sample advantages from the other samples of the same prompt.

  Args:
    scores: float [B, K], the (sequence-level) reward of sample k of prompt b.
    valid: bool [B, K]; False entries are padding.
    kind: "rloo" (score minus the mean of the other valid samples) or "grpo" ((score - group mean)
      / (group sample std + eps)). Static.
    eps: GRPO's stabiliser, added to the standard deviation.
  Returns:
    float32 [B, K]; 0 on invalid samples and on every sample of a prompt with < 2 valid samples.
  """
  if kind not in KINDS:
    raise ValueError(f"{_WHERE}:group_advantages: kind must be one of {KINDS}, got {kind!r}")
  if scores.ndim != 2 or tuple(valid.shape) != tuple(scores.shape):
    raise ValueError(f"{_WHERE}:group_advantages: need scores and valid both [B,K], got {scores.shape} and "
                     f"{valid.shape}")
  v = valid.astype(bool)
  s = jnp.where(v, scores.astype(jnp.float32), 0.0)
  n = jnp.sum(v, axis=1, keepdims=True).astype(jnp.float32)            # [B,1]
  ok = v & (n >= 2)
  n_safe = jnp.maximum(n, 2.0)
  total = jnp.sum(s, axis=1, keepdims=True)
  if kind == "rloo":
    adv = s - (total - s) / (n_safe - 1.0)
  else:
    mean = total / n_safe
    var = jnp.sum(jnp.where(v, jnp.square(s - mean), 0.0), axis=1, keepdims=True) / (n_safe - 1.0)
    adv = (s - mean) / (jnp.sqrt(var) + eps)
  return jnp.where(ok, adv, 0.0)


def token_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """Sequence advantages float [B] on every response token: float32 [B, T], 0 off the mask."""
  if advantages.ndim != 1 or mask.ndim != 2 or advantages.shape[0] != mask.shape[0]:
    raise ValueError(f"{_WHERE}:token_advantages: need advantages [B] and mask [B,T], got {advantages.shape} "
                     f"and {mask.shape}")
  return jnp.where(mask > 0, advantages.astype(jnp.float32)[:, None], 0.0)


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || pi_ref): ``exp(q - p) - (q - p) - 1`` >= 0.

  Args:
    logprobs: float [B, T], log pi of the sampled tokens (gradient flows here).
    ref_logprobs: float [B, T], log pi_ref of the same tokens (stop-gradiented).
    mask: [B, T], 1 on response tokens.
  Returns:
    float32 [B, T], 0 off the mask.
  """
  ppo_losses.per_token_kl(logprobs, ref_logprobs, mask)   # the shape checks
  m = mask > 0
  d = jnp.where(m, jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32)) - logprobs.astype(jnp.float32), 0.0)
  return jnp.where(m, jnp.expm1(d) - d, 0.0)     # = exp(d) - d - 1, accurate for small d


def policy_gradient_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                         clip_eps: jax.Array | float, ref_logprobs: jax.Array | None = None,
                         kl_coef: float = 0.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Clipped surrogate (``losses.ppo.policy_loss``) + ``kl_coef`` * masked mean k3 KL to the reference.

  Args:
    logprobs, old_logprobs: float [B, T] (current / behaviour policy log-probs of the sampled tokens).
    advantages: float [B] (one per sequence, put on each of its tokens) or [B, T].
    mask: [B, T], 1 on response tokens. clip_eps: scalar.
    ref_logprobs: float [B, T], needed when kl_coef > 0.
    kl_coef: static Python float; 0 leaves exactly PPO's clipped surrogate (the KL is not traced).
  Returns:
    (loss, metrics): policy_loss's metrics, plus ref_kl_k3 (the masked mean k3 term) when kl_coef > 0.
  """
  if kl_coef < 0:
    raise ValueError(f"{_WHERE}:policy_gradient_loss: kl_coef must be >= 0, got {kl_coef}")
  if kl_coef > 0 and ref_logprobs is None:
    raise ValueError(f"{_WHERE}:policy_gradient_loss: kl_coef={kl_coef} > 0 needs ref_logprobs")
  if advantages.ndim == 1:
    advantages = token_advantages(advantages, mask)
  loss, metrics = ppo_losses.policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
  if kl_coef > 0:
    kl = ppo_losses.masked_mean(k3_kl(logprobs, ref_logprobs, mask), mask)
    loss = loss + jnp.float32(kl_coef) * kl
    metrics = {**metrics, "ref_kl_k3": jax.lax.stop_gradient(kl)}
  return loss, metrics
