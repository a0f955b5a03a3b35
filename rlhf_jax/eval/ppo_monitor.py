"""Held-out evaluation of a policy during RL: RM score, gold score, win rate and KL vs SFT, alignment tax.

The gold labeler is used here only to *measure* the policy (never in a training signal), as
human evaluation was in InstructGPT. On real data (`gold=False`) there is no gold labeler: the
metrics are the RM's score and its win rate against SFT, KL to SFT and the pretraining loss.
Each call samples the same prompts with the same rng, so successive evaluations differ only
through the policy; the SFT reference responses are drawn once with another key (independent samples:
a shared key would make the policy tie with SFT wherever it has barely moved).
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
               max_prompt_len: int, max_new_tokens: int, seed: int = 0, batch_size: int = 64, gold: bool = True):
    self.cfg, self.rm, self.tok = cfg, (rm_cfg, rm_params, 0.0), tok
    self.records, self.val_rows, self.sft_params = list(prompt_records), np.asarray(val_rows), sft_params
    self.settings = policy_eval.SampleSettings(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                               temperature=temperature, batch_size=batch_size)
    self.max_len = max_prompt_len + max_new_tokens + 1
    self.rng = jax.random.PRNGKey(seed + 12345)
    self.gold = gold
    self.sft_responses = self.sample(sft_params, jax.random.fold_in(self.rng, 1))
    self.initial = self(sft_params)  # SFT's own fresh samples against the reference ones: win rate ~0.5

  def sample(self, params, rng=None) -> list[str]:
    rng = self.rng if rng is None else rng
    return policy_eval.sample_policy(self.cfg, params, self.tok, self.records, rng, self.settings)

  def __call__(self, params) -> dict[str, float]:
    return self.metrics(params, self.sample(params))

  def metrics(self, params, responses) -> dict[str, float]:
    """The held-out metrics of `params` given its `responses` to the prompts (one per record)."""
    if not self.gold:
      return self.model_metrics(params, responses)
    out = policy_eval.evaluate_policy(
        "policy", self.cfg, params, self.tok, self.records, responses, ref_params=self.sft_params,
        sft_responses=self.sft_responses, rm=self.rm, pretrain_val_rows=self.val_rows, max_len=self.max_len,
        temperature=self.settings.temperature)
    return {k: float(out[k]) for k in SCALARS if out.get(k) is not None}

  def rm_scores(self, responses) -> np.ndarray:
    """float64 [N]: the (offset) RM's score of each response to the held-out prompts."""
    rm_cfg, rm_params, offset = self.rm
    prompts = [list(r["messages"]) for r in self.records]
    return policy_eval.rm_scores(rm_cfg, rm_params, self.tok, prompts, responses, max_len=self.max_len,
                                 batch_size=self.settings.batch_size).astype(np.float64) + float(offset)

  @property
  def sft_rm_scores(self) -> np.ndarray:
    if not hasattr(self, "_sft_rm"):
      self._sft_rm = self.rm_scores(self.sft_responses)
    return self._sft_rm

  def model_metrics(self, params, responses) -> dict[str, float]:
    """RM score (mean, SE), RM win rate vs SFT (ties half), KL to SFT and pretraining loss."""
    prompts = [list(r["messages"]) for r in self.records]
    r_pol, r_sft = self.rm_scores(responses), self.sft_rm_scores
    kl, n_tok = policy_eval.sequence_kl(params, self.sft_params, self.cfg, self.tok, prompts, responses,
                                        max_len=self.max_len, batch_size=self.settings.batch_size,
                                        temperature=self.settings.temperature)
    out = {"rm_score_mean": float(r_pol.mean()), "rm_score_se": float(r_pol.std() / np.sqrt(len(r_pol))),
           "win_rate_vs_sft_rm": float(np.mean((r_pol > r_sft) + 0.5 * (r_pol == r_sft))),
           "kl_to_sft": float(np.mean(kl)), "kl_to_sft_per_token": float(np.mean(kl / n_tok)),
           "mean_response_length": float(np.mean([len(self.tok.encode(r)) for r in responses]))}
    if len(self.val_rows):
      out["pretrain_val_loss"] = policy_eval.lm_eval_loss(self.cfg, params, self.val_rows)
    return out
