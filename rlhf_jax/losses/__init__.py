"""Loss functions: LM cross-entropy, K-wise reward ranking, PPO-ptx, RLOO / GRPO (pure JAX)."""
from rlhf_jax.losses.lm import chunked_lm_loss, lm_loss, token_logprobs
from rlhf_jax.losses.policy_gradient import group_advantages, k3_kl, policy_gradient_loss
from rlhf_jax.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    adaptive_kl_update,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_var,
    per_token_kl,
    policy_loss,
    ppo_ptx_loss,
    sequence_kl,
    value_loss,
    whiten,
)
from rlhf_jax.losses.ranking import kwise_ranking_loss, pairwise_loss

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "adaptive_kl_update",
    "chunked_lm_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "k3_kl",
    "kl_penalized_rewards",
    "kwise_ranking_loss",
    "last_token_index",
    "lm_loss",
    "masked_mean",
    "masked_var",
    "pairwise_loss",
    "per_token_kl",
    "policy_gradient_loss",
    "policy_loss",
    "ppo_ptx_loss",
    "sequence_kl",
    "token_logprobs",
    "value_loss",
    "whiten",
]
