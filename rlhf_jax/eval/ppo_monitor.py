"""Held-out evaluation of a policy during RL: RM score, gold score, KL to SFT, alignment tax.

The gold labeler is used here only to *measure* the policy (never in a training signal), as
human evaluation was in InstructGPT.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import generation
from rlhf_jax.data import gold, pipeline, synthetic
from rlhf_jax.model import gpt
from rlhf_jax.train import steps


class Monitor:
  """Callable policy_params -> metrics dict; `.initial` holds the SFT policy's metrics."""

  def __init__(self, cfg, rm_cfg, tok, prompt_records, val_rows, sft_params, rm_params, *, temperature: float,
               max_prompt_len: int, max_new_tokens: int, seed: int = 0, batch_size: int = 64):
    self.cfg, self.rm_cfg, self.tok = cfg, rm_cfg, tok
    self.records = list(prompt_records)
    self.messages = [r["messages"] for r in self.records]
    self.sft_params, self.rm_params = sft_params, rm_params
    self.kw = dict(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
                   batch_size=batch_size)
    self.max_len = max_prompt_len + max_new_tokens + 1
    self.rng = jax.random.PRNGKey(seed + 12345)  # the same eval samples' randomness every time
    self.val = pipeline.lm_eval_batches(np.asarray(val_rows), min(len(val_rows), 32))
    self.eval_step = jax.jit(steps.make_eval_step(steps.lm_loss_fn(cfg)))
    self.initial = self(sft_params)

  def responses(self, params) -> list[str]:
    out = generation.sample_responses(params, self.cfg, self.tok, self.messages, self.rng, **self.kw)
    return [r[0] for r in out]

  def __call__(self, params) -> dict[str, float]:
    resp = self.responses(params)
    gold_scores = np.array([gold.score(r, y) for r, y in zip(self.records, resp)])
    rm = generation.score_responses(self.rm_params, self.rm_cfg, self.tok, self.messages, resp,
                                    max_len=self.max_len)
    kl = generation.response_logprob_kl(params, self.sft_params, self.cfg, self.tok, self.messages, resp,
                                        max_len=self.max_len, temperature=self.kw["temperature"])
    harmful = [gold.is_harmful_response(r, y) for r, y in zip(self.records, resp) if r["family"] in synthetic.HARMFUL_FAMILIES]
    val = [self.eval_step(params, b) for b in self.val]
    return {"gold_mean": float(gold_scores.mean()), "gold_se": float(gold_scores.std() / np.sqrt(len(resp))),
            "rm_score": float(rm.mean()), "kl_to_sft": float(kl.mean()),
            "pretrain_val_loss": float(np.mean([float(v["loss"]) for v in val])) if val else float("nan"),
            "response_words": float(np.mean([len(y.split()) for y in resp])),
            "harmful_compliance": float(np.mean(harmful)) if harmful else float("nan")}
