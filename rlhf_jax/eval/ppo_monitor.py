"""Held-out evaluation of a policy during RL: RM score, gold score, win rate and KL vs SFT, alignment tax.

The gold labeler is used here only to *measure* the policy (never in a training signal), as
human evaluation was in InstructGPT. Each call samples the same prompts with the same rng, so
successive evaluations differ only through the policy.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.eval import policy_eval

SCALARS = ("gold_mean", "gold_se", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "rm_score_mean", "kl_to_sft",
           "kl_to_sft_per_token", "pretrain_val_loss", "harmful_compliance_rate", "mean_response_length")


class Monitor:
  """Callable policy_params -> {metric: float}; `.initial` holds the SFT policy's metrics."""

  def __init__(self, cfg, rm_cfg, tok, prompt_records, val_rows, sft_params, rm_params, *, temperature: float,
               max_prompt_len: int, max_new_tokens: int, seed: int = 0, batch_size: int = 64):
    self.cfg, self.rm, self.tok = cfg, (rm_cfg, rm_params, 0.0), tok
    self.records, self.val_rows, self.sft_params = list(prompt_records), np.asarray(val_rows), sft_params
    self.settings = policy_eval.SampleSettings(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                               temperature=temperature, batch_size=batch_size)
    self.max_len = max_prompt_len + max_new_tokens + 1
    self.rng = jax.random.PRNGKey(seed + 12345)
    self.sft_responses = self.sample(sft_params)
    self.initial = self(sft_params)

  def sample(self, params) -> list[str]:
    return policy_eval.sample_policy(self.cfg, params, self.tok, self.records, self.rng, self.settings)

  def __call__(self, params) -> dict[str, float]:
    out = policy_eval.evaluate_policy(
        "policy", self.cfg, params, self.tok, self.records, self.sample(params), ref_params=self.sft_params,
        sft_responses=self.sft_responses, rm=self.rm, pretrain_val_rows=self.val_rows, max_len=self.max_len,
        temperature=self.settings.temperature)
    return {k: float(out[k]) for k in SCALARS if out.get(k) is not None}
