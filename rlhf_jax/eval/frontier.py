"""Points on the gold-vs-KL frontier: every policy scored the same way on one fixed set of held-out prompts.

A point is a dict: gold_mean, gold_ci95 ([low, high], percentile bootstrap over prompts), gold_se,
kl_to_sft (mean sequence KL of the policy's own samples to SFT, both at the sampling temperature),
rm_score_mean (the RM's score, offset so demonstrations score 0), pretrain_val_loss (held-out
pretraining LM loss: the alignment tax), win_rate_vs_sft_gold, mean_response_length,
harmful_compliance_rate, and gold_per_prompt (for paired comparisons between points).

Policies are sampled with independent keys (one per name, from `key_name`), so two checkpoints
differ by their policy and by sampling noise, never by a shared draw. Best-of-n is scored from one
set of N samples per prompt of the SFT policy: for each n <= N, the exact expected gold of the RM's
pick among n of them (`rm_diagnostics.best_of_n_expected`), with KL log n - (n-1)/n.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.eval import bootstrap, policy_eval, rm_diagnostics
from rlhf_jax.model import heads

SCALARS = ("gold_mean", "gold_se", "kl_to_sft", "kl_to_sft_per_token", "rm_score_mean", "pretrain_val_loss",
           "win_rate_vs_sft_gold", "mean_response_length", "harmful_compliance_rate")


def key_name(name: str) -> int:
  """A stable 31-bit id of a name, to fold into the evaluation key."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


class FrontierEval:
  """Callable (name, cfg, params) -> point. `.sft` holds the SFT policy's point (KL 0).

  sft / rm: `stages.Model`s (the RM's params unshifted, with `rm_offset` its reward offset).
  prompts: held-out prompt records ({"messages", "task"}); val_rows: int [N, T+1] pretraining rows.
  """

  def __init__(self, sft, rm, rm_offset: float, prompts: Sequence[Mapping], val_rows: np.ndarray, *,
               temperature: float, max_prompt_len: int, max_new_tokens: int, seed: int = 0, n_boot: int = 1000,
               batch_size: int = 64):
    self.sft, self.rm, self.offset = sft, rm, float(rm_offset)
    self.prompts, self.val_rows = list(prompts), np.asarray(val_rows)
    self.settings = policy_eval.SampleSettings(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                               temperature=temperature, batch_size=batch_size)
    self.max_len = max_prompt_len + max_new_tokens + 1
    self.key = jax.random.PRNGKey(int(seed) + 2024)
    self.n_boot, self.seed = int(n_boot), int(seed)
    self.sft_responses = None
    self.sft_point = self("sft", sft.config, sft.params)
    self.sft_responses = self._last_responses

  def ci(self, per_prompt) -> list[float]:
    return list(bootstrap.mean_ci(per_prompt, self.n_boot, self.seed))

  def __call__(self, name: str, cfg, params) -> dict:
    rng = jax.random.fold_in(self.key, key_name(name))
    responses = policy_eval.sample_policy(cfg, params, self.sft.tok, self.prompts, rng, self.settings)
    m = policy_eval.evaluate_policy(
        name, cfg, params, self.sft.tok, self.prompts, responses, ref_params=self.sft.params,
        sft_responses=self.sft_responses, rm=(self.rm.config, self.rm.params, self.offset),
        pretrain_val_rows=self.val_rows, max_len=self.max_len, temperature=self.settings.temperature,
        per_prompt=True, n_samples=3)
    self._last_responses = responses
    point = {k: m.get(k) for k in SCALARS}
    point.update(gold_ci95=self.ci(m["gold_per_prompt"]), gold_per_prompt=m["gold_per_prompt"],
                 samples=m["samples"])
    return point

  def best_of_n(self, ns: Sequence[int]) -> dict[int, dict]:
    """{n: point} for best-of-n of the SFT policy by the RM, from max(ns) samples per prompt."""
    n_max = max(int(n) for n in ns)
    shifted = heads.shift_bias(self.rm.params, self.offset)
    s = self.settings
    gold, rm, _ = rm_diagnostics.sample_scores(
        self.sft.config, self.sft.params, self.sft.tok, self.rm.config, shifted, self.prompts,
        jax.random.fold_in(self.key, key_name("best_of_n")), n=n_max, temperature=s.temperature,
        max_prompt_len=s.max_prompt_len, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
    out = {}
    for n in sorted(int(n) for n in ns):
      g = rm_diagnostics.best_of_n_expected(gold, rm, n)
      out[n] = {"n": n, "gold_mean": float(g.mean()), "gold_se": float(g.std(ddof=1) / np.sqrt(len(g))),
                "gold_ci95": self.ci(g), "gold_per_prompt": [float(x) for x in g],
                "kl_to_sft": rm_diagnostics.best_of_n_kl(n),
                "rm_score_mean": float(rm_diagnostics.best_of_n_expected(rm, rm, n).mean()),
                "pretrain_val_loss": self.sft_point["pretrain_val_loss"],   # the policy is SFT's
                "gold_oracle_best_of_n": float(rm_diagnostics.best_of_n_expected(gold, gold, n).mean())}
    return out
