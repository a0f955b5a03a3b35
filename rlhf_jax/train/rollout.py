"""PPO rollouts as one pure, jit-able function: sample, score, and build advantages.

`make_rollout(...)` closes over the static settings (model configs, generation
settings, GAE constants) and returns

  rollout(policy_params, value_params, ref_params, score_params,
          prompt_tokens [B,Tp], prompt_mask [B,Tp], rng, beta) -> experience dict

Following the RLHF recipe of Ziegler et al. (2019) / InstructGPT as laid out by
Huang et al. ("The N implementation details of RLHF with PPO"):
  * the response is sampled from the temperature-scaled policy and truncated at
    EOS (tokens after it are pad_id, which is a different id than EOS, mask 0);
  * policy and reference log-probs are both taken under log_softmax(logits / T),
    recomputed with one uncached forward over prompt + response (the learner
    uses the same definition, so the first PPO ratio is exactly 1);
  * the scorer and the value model read the whole query + response;
  * a response with no EOS gets the fixed score `no_eos_penalty` instead of the
    scorer's output;
  * the per-token reward is -beta * (log pi - log pi_ref), plus the score at the
    last response token; advantages by GAE (gamma, lam).
Dropout is off everywhere (dropout_rng=None). The sampling, log-prob and scoring part is
`sample_and_score`, which the critic-free methods (`train/group_rl.py`) run too.

Alignment: everything per-token is on the response axis [B,N] (N = max_new_tokens).
Response token t sits at full-sequence position Tp + t and is predicted from
position Tp - 1 + t, so values[:, t] = V(prompt + response[:t]), read at that
position: the value of the state in which token t is emitted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.model import heads
from rlhf_jax.model.config import GPTConfig

_WHERE = "rlhf_jax/train/rollout.py"

# score_fn(score_params, tokens [B,T], attention_mask [B,T], response_mask [B,T]) -> float32 [B];
# with image prompts it is also called with prefix_embeds=[B,P,D] (the image tokens).
ScoreFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """The static settings a rollout was built with (the learner must use the same temperature)."""
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  eos_id: int | None
  pad_id: int
  gamma: float
  lam: float
  no_eos_penalty: float | None
  recompute_logprobs: bool = False   # True: one more uncached policy forward (see sample_and_score)


def reward_model_score_fn(rm_config) -> ScoreFn:
  """Score with a reward model ({"gpt","head"} params): `heads.rewards` at the last real token.

  With EOS truncation the last real token is the EOS that ends the response (rows without
  EOS have their score replaced by the no-EOS penalty anyway).
  """
  cfg = GPTConfig.from_dict(rm_config)

  def score_fn(params, tokens, attention_mask, response_mask, prefix_embeds=None):
    del response_mask
    return heads.rewards(params, cfg, tokens, attention_mask, prefix_embeds=prefix_embeds)
  return score_fn


def host_text_score_fn(score_texts: Callable[[list[str], list[str]], Any], tok) -> ScoreFn:
  """A score_fn that decodes prompt and response and scores them in Python on the host.

  score_texts(prompts, responses) -> B floats; prompts are the decoded prompt tokens with their
  special tokens (rendered chat text), responses the decoded response tokens up to (and without)
  EOS. Runs through `jax.pure_callback`, so it works inside the jitted RL step; it is a host round
  trip per rollout, meant for programmatic rewards such as the gold labeler (the oracle-reward
  ablation), not for speed. score_params is ignored.
  """
  def host(tokens, attention_mask, response_mask):
    tokens, attention_mask, response_mask = (np.asarray(x) for x in (tokens, attention_mask, response_mask))
    prompts, responses = [], []
    for t, m, r in zip(tokens, attention_mask, response_mask):
      prompts.append(tok.decode(t[(m > 0) & (r == 0)].tolist(), skip_special=False))
      resp = t[r > 0].tolist()
      if tok.eos_id in resp:
        resp = resp[:resp.index(tok.eos_id)]
      responses.append(tok.decode(resp, skip_special=True))
    out = np.asarray(score_texts(prompts, responses), np.float32)
    if out.shape != (len(prompts),):
      raise ValueError(f"{_WHERE}: score_texts returned shape {out.shape} for {len(prompts)} responses")
    return out

  def score_fn(params, tokens, attention_mask, response_mask):
    del params
    shape = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    return jax.pure_callback(host, shape, tokens, attention_mask, response_mask)
  return score_fn


def check_sampling(cfgs: dict, spec, fn: str = "make_rollout") -> None:
  """Validates the sampling fields of a rollout spec (max_new_tokens, temperature, pad/eos ids,
  no_eos_penalty) against the models in `cfgs` ({name: GPTConfig}, which must share a vocabulary)."""
  vocab = {name: c.vocab_size for name, c in cfgs.items()}
  if len(set(vocab.values())) != 1:
    raise ValueError(f"{_WHERE}:{fn}: {'/'.join(cfgs)} must share a vocabulary, got vocab sizes {vocab}")
  v = vocab["policy"]
  if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1:
    raise ValueError(f"{_WHERE}:{fn}: max_new_tokens must be an int >= 1, got {spec.max_new_tokens!r}")
  if not spec.temperature > 0:
    raise ValueError(f"{_WHERE}:{fn}: temperature must be > 0, got {spec.temperature!r}")
  if not isinstance(spec.pad_id, int) or not 0 <= spec.pad_id < v:
    raise ValueError(f"{_WHERE}:{fn}: pad_id={spec.pad_id!r} must be an int in [0, {v})")
  if spec.eos_id is not None:
    if not isinstance(spec.eos_id, int) or not 0 <= spec.eos_id < v:
      raise ValueError(f"{_WHERE}:{fn}: eos_id={spec.eos_id!r} must be None or an int in [0, {v})")
    if spec.eos_id == spec.pad_id:
      # With pad == EOS the scorer's "last real token" and the truncation point become ambiguous.
      raise ValueError(f"{_WHERE}:{fn}: pad_id must differ from eos_id (both {spec.pad_id})")
  elif spec.no_eos_penalty is not None:
    raise ValueError(f"{_WHERE}:{fn}: no_eos_penalty={spec.no_eos_penalty} needs an eos_id "
                     "(with eos_id=None no response ends, so every score would be replaced)")


def _check_spec(cfgs: dict, spec: RolloutSpec) -> None:
  check_sampling(cfgs, spec)
  if not 0.0 <= spec.gamma <= 1.0 or not 0.0 <= spec.lam <= 1.0:
    raise ValueError(f"{_WHERE}:make_rollout: gamma and lam must be in [0, 1], got {spec.gamma}, {spec.lam}")


def sample_and_score(spec, p_cfg: GPTConfig, r_cfg: GPTConfig, score_fn: ScoreFn, policy_params, ref_params,
                     score_params, prompt_tokens, prompt_mask, rng, prefix_embeds=None) -> dict:
  """The part of a rollout every RL method shares: sample, recompute log-probs, score.

  spec: any spec with the sampling fields of `RolloutSpec` (max_new_tokens, temperature, top_k,
  top_p, eos_id, pad_id, no_eos_penalty). prompt_tokens / prompt_mask: int [B,Tp], left padded.
  Returns tokens, attention_mask [B,T]; response_mask, response_tokens, logprobs,
  sampled_logprobs, ref_logprobs [B,N]; raw_scores, scores, kl (sequence k1 KL) [B]; lengths,
  ended [B] (see `make_rollout` for each one's definition).
  prefix_embeds: optional [B,P,D] image tokens that every model reads before the prompt (the
  sequence is [image | left pads | prompt | response]); all outputs stay token-aligned.
  """
  b, tp = prompt_tokens.shape
  pre = {} if prefix_embeds is None else {"prefix_embeds": prefix_embeds}
  gen = sampling.generate(policy_params, p_cfg, prompt_tokens, prompt_mask, rng, max_new_tokens=spec.max_new_tokens,
                          temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, eos_id=spec.eos_id,
                          pad_id=spec.pad_id, prefix_embeds=prefix_embeds)
  resp_mask = gen["mask"].astype(jnp.int32)
  prompt_mask_i = prompt_mask.astype(jnp.int32)
  tokens = jnp.concatenate([jnp.where(prompt_mask_i > 0, prompt_tokens.astype(jnp.int32), spec.pad_id),
                            gen["tokens"]], axis=1)
  mask = jnp.concatenate([prompt_mask_i, resp_mask], axis=1)
  full_resp_mask = jnp.concatenate([jnp.zeros_like(prompt_mask_i), resp_mask], axis=1)

  # Log-prob of response token t is predicted from position tp-1+t: columns tp-1.. of [B,T-1].
  # The sampler's log-probs have the learner's definition (log_softmax(logits / T) before
  # top-k/top-p, same params, no dropout), so they are reused, as lm-human-preferences does;
  # they differ from an uncached recompute only by float rounding (<1e-5, tests/test_rollout.py).
  # recompute_logprobs=True adds the uncached policy forward (TRL's choice) for a first PPO
  # ratio of exactly 1.
  if spec.recompute_logprobs:
    logprobs = sampling.sequence_logprobs(policy_params, p_cfg, tokens, mask, spec.temperature,
                                          prefix_embeds=prefix_embeds)[:, tp - 1:]
  else:
    logprobs = gen["logprobs"]
  ref_logprobs = sampling.sequence_logprobs(ref_params, r_cfg, tokens, mask, spec.temperature,
                                            prefix_embeds=prefix_embeds)[:, tp - 1:]

  raw_scores = score_fn(score_params, tokens, mask, full_resp_mask, **pre).astype(jnp.float32)
  if raw_scores.shape != (b,):
    raise ValueError(f"{_WHERE}:rollout: score_fn must return [B]={b} scores, got {raw_scores.shape}")
  scores = raw_scores
  if spec.no_eos_penalty is not None:
    scores = jnp.where(gen["ended"], raw_scores, jnp.float32(spec.no_eos_penalty))
  return {"tokens": tokens, "attention_mask": mask, "response_mask": resp_mask, "response_tokens": gen["tokens"],
          "logprobs": logprobs, "sampled_logprobs": gen["logprobs"], "ref_logprobs": ref_logprobs,
          "raw_scores": raw_scores, "scores": scores,
          "kl": ppo_losses.sequence_kl(logprobs, ref_logprobs, resp_mask),
          "lengths": gen["lengths"], "ended": gen["ended"]}


def make_rollout(policy_cfg, value_cfg, ref_cfg, score_fn: ScoreFn, *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None,
                 pad_id: int, gamma: float = 1.0, lam: float = 0.95,
                 no_eos_penalty: float | None = None, recompute_logprobs: bool = False):
  """Builds the pure rollout function (see the module docstring).

  policy_cfg / ref_cfg: GPTConfig of the policy and the frozen reference (SFT) LM.
  value_cfg: GPTConfig of the value model's trunk ({"gpt","head"} params, `heads.values`).
  score_fn: pure score_fn(score_params, tokens [B,T], attention_mask [B,T], response_mask [B,T])
    -> float32 [B]; e.g. `reward_model_score_fn(rm_cfg)`, or a synthetic reward in tests.
  eos_id: None = fixed-length responses (then no_eos_penalty must be None).
  no_eos_penalty: the score given to responses without EOS (None = keep the scorer's score).
  recompute_logprobs: False (default) reuses the sampler's log-probs as the old log-probs;
    True recomputes them with one uncached policy forward.
  top_k / top_p: sampling filters; the log-probs are still those of the unfiltered
    temperature-scaled distribution (see rlhf_jax/sampling.py), so keep them off for PPO
    unless you accept that mismatch.

  The returned function rollout(policy, value, ref, score params, prompt_tokens, prompt_mask, rng,
  beta, prefix_embeds=None) (prefix_embeds: optional [B,P,D] image tokens read by all four models,
  see `sample_and_score`) has a `.spec` attribute (RolloutSpec) and returns a dict:
    tokens          int32 [B,T]  prompt + response (T = Tp + N), pad_id after EOS and in the left padding
    attention_mask  int32 [B,T]  1 on real tokens (prompt and response up to and including EOS)
    response_mask   int32 [B,N]  1 on generated tokens, including the EOS
    response_tokens int32 [B,N]
    logprobs        float32 [B,N] policy log-probs (temperature-scaled; the sampler's unless
                    recompute_logprobs); 0 off the mask
    sampled_logprobs float32 [B,N] the same, as reported by the sampler (KV-cache path)
    ref_logprobs    float32 [B,N] reference log-probs, same definition
    values          float32 [B,N] V(s_t) before emitting response token t; 0 off the mask
    raw_scores      float32 [B]   score_fn output
    scores          float32 [B]   raw_scores, or no_eos_penalty where the response has no EOS
    kl              float32 [B]   sum over response tokens of logprobs - ref_logprobs
    rewards         float32 [B,N] -beta * per-token KL, + scores at the last response token
    advantages, returns float32 [B,N] GAE (gamma, lam); 0 off the mask
    lengths int32 [B], ended bool [B]
    stats: dict of float32 scalars: score, raw_score, kl, non_score_reward, response_length,
      ended_frac, kl_beta.
  """
  cfgs = {"policy": GPTConfig.from_dict(policy_cfg), "value": GPTConfig.from_dict(value_cfg),
          "ref": GPTConfig.from_dict(ref_cfg)}
  spec = RolloutSpec(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), eos_id=eos_id, pad_id=pad_id, gamma=float(gamma), lam=float(lam),
                     no_eos_penalty=None if no_eos_penalty is None else float(no_eos_penalty),
                     recompute_logprobs=bool(recompute_logprobs))
  _check_spec(cfgs, spec)
  p_cfg, v_cfg, r_cfg = cfgs["policy"], cfgs["value"], cfgs["ref"]

  def rollout(policy_params, value_params, ref_params, score_params, prompt_tokens, prompt_mask, rng, beta,
              prefix_embeds=None):
    tp = prompt_tokens.shape[1]
    exp = sample_and_score(spec, p_cfg, r_cfg, score_fn, policy_params, ref_params, score_params, prompt_tokens,
                           prompt_mask, rng, prefix_embeds)
    tokens, mask, resp_mask = exp["tokens"], exp["attention_mask"], exp["response_mask"]
    values = heads.values(value_params, v_cfg, tokens, mask, prefix_embeds=prefix_embeds)[:, tp - 1:-1]
    values = jnp.where(resp_mask > 0, values, 0.0)

    beta = jnp.asarray(beta, jnp.float32)
    scores, kl = exp["scores"], exp["kl"]
    rewards = ppo_losses.kl_penalized_rewards(scores, exp["logprobs"], exp["ref_logprobs"], resp_mask, beta)
    advantages, returns = ppo_losses.gae(rewards, values, resp_mask, spec.gamma, spec.lam)
    lengths = exp["lengths"]
    stats = {
        "score": jnp.mean(scores),
        "raw_score": jnp.mean(exp["raw_scores"]),
        "kl": jnp.mean(kl),
        "non_score_reward": jnp.mean(-beta * kl),
        "response_length": jnp.mean(lengths.astype(jnp.float32)),
        "ended_frac": jnp.mean(exp["ended"].astype(jnp.float32)),
        "kl_beta": beta,
    }
    return {**exp, "values": values, "rewards": rewards, "advantages": advantages, "returns": returns,
            "stats": stats}

  rollout.spec = spec
  return rollout


def make_rollout_from_config(policy_cfg, value_cfg, ref_cfg, score_fn: ScoreFn, ppo_cfg, *, eos_id, pad_id):
  """`make_rollout` with the generation / GAE settings read from a PPO ConfigDict
  (max_new_tokens, temperature, top_k, top_p, gamma, lam, no_eos_penalty, optional
  recompute_logprobs); eos/pad come
  from the tokenizer."""
  missing = [k for k in ("max_new_tokens", "temperature", "top_k", "top_p", "gamma", "lam", "no_eos_penalty")
             if k not in ppo_cfg]
  if missing:
    raise ValueError(f"{_WHERE}:make_rollout_from_config: ppo config lacks key(s) {missing}")
  return make_rollout(policy_cfg, value_cfg, ref_cfg, score_fn, max_new_tokens=int(ppo_cfg.max_new_tokens),
                      temperature=float(ppo_cfg.temperature), top_k=int(ppo_cfg.top_k),
                      top_p=float(ppo_cfg.top_p), eos_id=eos_id, pad_id=pad_id, gamma=float(ppo_cfg.gamma),
                      lam=float(ppo_cfg.lam), no_eos_penalty=ppo_cfg.no_eos_penalty,
                      recompute_logprobs=bool(ppo_cfg.get("recompute_logprobs", False)))
