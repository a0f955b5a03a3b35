"""Text in, text out: batched sampling from a policy and reward-model scoring of responses.

Used by comparison labelling (K samples per prompt from the SFT model), evaluation and chat.
Batches have a fixed size (the last one is padded with copies) so each function compiles once.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from rlhf_jax import decode_kernels, sampling
from rlhf_jax.data import batching, pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.losses.lm import token_logprobs
from rlhf_jax.model import gpt, heads

Messages = Sequence[dict]


# Jitted functions are cached per static setting so repeated evaluations compile once.
@functools.lru_cache(maxsize=32)
def _generate_fn(cfg, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, greedy):
  return decode_kernels.jit(lambda p, t, m, r: sampling.generate(
      p, cfg, t, m, r, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=eos_id, pad_id=pad_id, greedy=greedy), rows=lambda p, t, m, r: t.shape[0])


@functools.lru_cache(maxsize=32)
def _reward_fn(cfg):
  return jax.jit(lambda p, t, m: heads.rewards(p, cfg, t, m))


@functools.lru_cache(maxsize=32)
def _kl_fn(cfg, temperature):
  def kl(p, q, t, tg, m, am):
    lp = token_logprobs(gpt.logits(p, cfg, t, am) / temperature, tg)
    lq = token_logprobs(gpt.logits(q, cfg, t, am) / temperature, tg)
    return ppo_losses.sequence_kl(lp, lq, m)
  return jax.jit(kl)


def sample_responses(params, cfg, tok: Tokenizer, prompts: Sequence[Messages], rng, *, n_per_prompt: int = 1,
                     max_prompt_len: int = 64, max_new_tokens: int = 32, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, greedy: bool = False, batch_size: int = 64
                     ) -> list[list[str]]:
  """n_per_prompt decoded responses per prompt (text up to EOS, specials removed).

  prompts: message lists ending with a user turn. Returns [len(prompts)][n_per_prompt] strings.
  """
  enc = [pipeline.encode_prompt_left_padded(tok, m, max_prompt_len) for m in prompts]
  flat = [e for e in enc for _ in range(n_per_prompt)]
  gen = _generate_fn(cfg, max_new_tokens, float(temperature), int(top_k), float(top_p), tok.eos_id, tok.pad_id,
                     bool(greedy))
  padded = batching.pad_to_batches(flat, batch_size)
  texts = []
  for i, ((toks, mask), valid) in enumerate(zip(padded.batches, padded.valid)):
    out = jax.device_get(gen(params, toks, mask, jax.random.fold_in(rng, i)))
    for row in np.flatnonzero(valid):
      ids = [int(t) for t in out["tokens"][row, :int(out["lengths"][row])] if t != tok.eos_id]
      texts.append(tok.decode(ids))
  return [texts[i * n_per_prompt:(i + 1) * n_per_prompt] for i in range(len(prompts))]


def score_responses(params, cfg, tok: Tokenizer, prompts: Sequence[Messages], responses: Sequence[str], *,
                    max_len: int = 96, batch_size: int = 64) -> np.ndarray:
  """Reward-model scores, float32 [N], of prompt + response + EOS, read at the EOS."""
  rows = [pipeline.encode_demonstration(tok, {"messages": list(m), "response": r}, max_len)
          for m, r in zip(prompts, responses)]
  fn = _reward_fn(cfg)
  padded = batching.pad_to_batches(rows, batch_size)
  out = [fn(params, b["tokens"], b["attention_mask"]) for b in padded.batches]
  return padded.unpad(out) if out else np.zeros((0,), np.float32)


def response_logprob_kl(policy_params, ref_params, cfg, tok: Tokenizer, prompts: Sequence[Messages],
                        responses: Sequence[str], *, max_len: int = 96, batch_size: int = 64,
                        temperature: float = 1.0) -> np.ndarray:
  """Per-sequence KL estimate sum_t [log pi(y_t) - log pi_ref(y_t)] over response tokens, float32 [N]
  (`losses.ppo.sequence_kl`, the k1 estimator the RL reward uses).

  Both distributions are temperature-scaled like the sampler that produced the responses.
  """
  rows = [pipeline.encode_demonstration(tok, {"messages": list(m), "response": r}, max_len)
          for m, r in zip(prompts, responses)]

  fn = _kl_fn(cfg, float(temperature))
  padded = batching.pad_to_batches(rows, batch_size)
  out = [fn(policy_params, ref_params, b["tokens"], b["targets"], b["mask"], b["attention_mask"])
         for b in padded.batches]
  return padded.unpad(out) if out else np.zeros((0,), np.float32)
