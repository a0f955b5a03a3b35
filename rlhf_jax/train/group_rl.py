"""RLOO and GRPO as one pure, jitted step: K samples per prompt, the group as the baseline, no value model.

RL state (a plain dict pytree, created directly sharded by `create_group_state`):
  {"step": int32 [], "rng": uint32 [2], "policy": {"params", "opt_state"},
   "ref": params (frozen SFT LM), "score": params (frozen reward model; {} for a host scorer)}
With LoRA the policy's params are its training tree and a state without "ref" reads the policy's
base (adapters off), as in `train/ppo.py`.

`make_group_step(...)` returns `step(state, batch) -> (state, metrics)` for the shared loop. One
call is one iteration, with no host round trip:
  1. rollout (`make_group_rollout`): every prompt of the batch repeated K = group_size times (row
     b*K + k is sample k of prompt b), sampled, scored and given reference log-probs by
     `rollout.sample_and_score` (the code PPO's rollout runs). The sequence reward is
       kl_mode "reward": score - kl_coef * KL, KL = sum_t log pi - log pi_ref (InstructGPT's
                         per-token -beta * KL penalty, summed over the response), or
       kl_mode "k3":     score alone, the KL entering the loss instead (GRPO);
     the advantage of each sample is `losses.policy_gradient.group_advantages` of the prompt's K
     rewards ("rloo" or "grpo"), put on every token of its response;
  2. `ppo_epochs` epochs x `num_minibatches` minibatches of the B*K rows (`ppo.run_epochs`), each an
     update of PPO's clipped surrogate (`ppo._policy_loss_fn`, the same function PPO trains with)
     + kl_coef * the k3 KL to the reference (kl_mode "k3") + ptx_coef * the LM loss on pretraining
     rows. With one epoch and one minibatch the ratio is 1 and this is REINFORCE with the RLOO /
     GRPO baseline (Ahmadian et al. 2024; Shao et al. 2024).
Dropout is off throughout.

batch: {"prompt_tokens", "prompt_mask": int [B,Tp] (left-padded), + the ptx keys of `train/ppo.py`
when pg_cfg.ptx_coef > 0}. A prompt whose mask is all 0 (filler) gets advantage 0 on all K samples.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc

from rlhf_jax import parallel
from rlhf_jax.losses import policy_gradient as pg_losses
from rlhf_jax.model import lora
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.train import ppo, rollout as rollout_lib, state as state_lib

_WHERE = "rlhf_jax/train/group_rl.py"
MODELS = ("policy", "ref", "score")
KL_MODES = ("reward", "k3")
_MB_KEYS = ("tokens", "attention_mask", "response_mask", "logprobs", "ref_logprobs", "advantages")


def default_config() -> mlc.ConfigDict:
  """RLOO / GRPO settings (the `pg` section); the epoch / clipping / generation keys mean what PPO's do."""
  return mlc.ConfigDict(dict(
      advantage="rloo",        # rloo | grpo (losses.policy_gradient.group_advantages)
      group_size=4,            # K samples per prompt
      ppo_epochs=2, num_minibatches=2, clip_eps=0.2,
      kl_mode="reward",        # reward: -kl_coef * KL in the sequence reward; k3: kl_coef * k3 KL in the loss
      kl_coef=0.05,
      ptx_coef=0.0,
      eps=1e-4,                # GRPO's std stabiliser
      max_new_tokens=24, temperature=0.7, top_k=0, top_p=1.0,
      no_eos_penalty=-1.0,
  ))


@dataclasses.dataclass(frozen=True)
class GroupRolloutSpec:
  """The static settings of a group rollout (the learner must use the same temperature)."""
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  eos_id: int | None
  pad_id: int
  no_eos_penalty: float | None
  group_size: int
  advantage: str
  kl_mode: str
  kl_coef: float
  eps: float
  recompute_logprobs: bool = False   # see rollout.sample_and_score


def _check_group(spec: GroupRolloutSpec) -> None:
  if not isinstance(spec.group_size, int) or spec.group_size < 2:
    raise ValueError(f"{_WHERE}:make_group_rollout: group_size must be an int >= 2 (the other samples are the "
                     f"baseline), got {spec.group_size!r}")
  if spec.advantage not in pg_losses.KINDS:
    raise ValueError(f"{_WHERE}:make_group_rollout: advantage must be one of {pg_losses.KINDS}, got {spec.advantage!r}")
  if spec.kl_mode not in KL_MODES:
    raise ValueError(f"{_WHERE}:make_group_rollout: kl_mode must be one of {KL_MODES}, got {spec.kl_mode!r}")
  if not spec.kl_coef >= 0:
    raise ValueError(f"{_WHERE}:make_group_rollout: kl_coef must be >= 0, got {spec.kl_coef!r}")


def make_group_rollout(policy_cfg, ref_cfg, score_fn: rollout_lib.ScoreFn, *, group_size: int, advantage: str,
                       max_new_tokens: int, eos_id: int | None, pad_id: int, kl_mode: str = "reward",
                       kl_coef: float = 0.05, eps: float = 1e-4, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, no_eos_penalty: float | None = None):
  """Builds rollout(policy_params, ref_params, score_params, prompt_tokens [B,Tp], prompt_mask [B,Tp], rng).

  The returned function has a `.spec` (GroupRolloutSpec) and returns, over R = B*K rows:
    every key of `rollout.sample_and_score` ([R,T], [R,N] and [R] arrays);
    rewards          float32 [R]   the sequence reward (score, minus kl_coef * kl in kl_mode "reward")
    group_advantages float32 [R]   group_advantages(rewards as [B,K]) flattened back
    advantages       float32 [R,N] group_advantages on every response token, 0 off the mask
    stats: float32 scalars score, raw_score, kl, reward, reward_group_std (mean over prompts of the
      population std of its K rewards), zero_advantage_frac (prompts whose K rewards are all equal:
      no learning signal), response_length, ended_frac.
  """
  cfgs = {"policy": GPTConfig.from_dict(policy_cfg), "ref": GPTConfig.from_dict(ref_cfg)}
  spec = GroupRolloutSpec(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), eos_id=eos_id, pad_id=pad_id,
                          no_eos_penalty=None if no_eos_penalty is None else float(no_eos_penalty),
                          group_size=group_size, advantage=advantage, kl_mode=kl_mode, kl_coef=float(kl_coef),
                          eps=float(eps))
  rollout_lib.check_sampling(cfgs, spec, "make_group_rollout")
  _check_group(spec)
  p_cfg, r_cfg, k = cfgs["policy"], cfgs["ref"], spec.group_size

  def rollout(policy_params, ref_params, score_params, prompt_tokens, prompt_mask, rng):
    b = prompt_tokens.shape[0]
    exp = rollout_lib.sample_and_score(spec, p_cfg, r_cfg, score_fn, policy_params, ref_params, score_params,
                                       jnp.repeat(prompt_tokens, k, axis=0), jnp.repeat(prompt_mask, k, axis=0), rng)
    rewards = exp["scores"]
    if spec.kl_mode == "reward":
      rewards = rewards - jnp.float32(spec.kl_coef) * exp["kl"]
    valid = jnp.broadcast_to(jnp.any(prompt_mask > 0, axis=1)[:, None], (b, k))
    grouped = rewards.reshape(b, k)
    adv = pg_losses.group_advantages(grouped, valid, spec.advantage, spec.eps).reshape(b * k)
    stats = {
        "score": jnp.mean(exp["scores"]),
        "raw_score": jnp.mean(exp["raw_scores"]),
        "kl": jnp.mean(exp["kl"]),
        "reward": jnp.mean(rewards),
        "reward_group_std": jnp.mean(jnp.std(grouped, axis=1)),
        "zero_advantage_frac": jnp.mean(jnp.all(grouped == grouped[:, :1], axis=1).astype(jnp.float32)),
        "response_length": jnp.mean(exp["lengths"].astype(jnp.float32)),
        "ended_frac": jnp.mean(exp["ended"].astype(jnp.float32)),
    }
    return {**exp, "rewards": rewards, "group_advantages": adv,
            "advantages": pg_losses.token_advantages(adv, exp["response_mask"]), "stats": stats}

  rollout.spec = spec
  return rollout


def make_group_rollout_from_config(policy_cfg, ref_cfg, score_fn: rollout_lib.ScoreFn, pg_cfg, *, eos_id, pad_id):
  """`make_group_rollout` with its settings read from a `pg` ConfigDict (see `default_config`)."""
  keys = ("group_size", "advantage", "kl_mode", "kl_coef", "eps", "max_new_tokens", "temperature", "top_k", "top_p",
          "no_eos_penalty")
  missing = [key for key in keys if key not in pg_cfg]
  if missing:
    raise ValueError(f"{_WHERE}:make_group_rollout_from_config: pg config lacks key(s) {missing}")
  return make_group_rollout(policy_cfg, ref_cfg, score_fn, group_size=int(pg_cfg.group_size),
                            advantage=str(pg_cfg.advantage), kl_mode=str(pg_cfg.kl_mode),
                            kl_coef=float(pg_cfg.kl_coef), eps=float(pg_cfg.eps),
                            max_new_tokens=int(pg_cfg.max_new_tokens), temperature=float(pg_cfg.temperature),
                            top_k=int(pg_cfg.top_k), top_p=float(pg_cfg.top_p), eos_id=eos_id, pad_id=pad_id,
                            no_eos_penalty=pg_cfg.no_eos_penalty)


def create_group_state(policy_params, ref_params, score_params, policy_opt, mesh, axes: dict, rng,
                       rules=parallel.DEFAULT_RULES):
  """The group-RL state (policy + frozen ref + frozen scorer), created directly sharded on `mesh`.

  axes: {"policy", "ref", "score"} -> param_axes tree of that model ({} for a {} scorer).
  Returns (state, state_shardings).
  """
  missing = [m for m in MODELS if m not in axes]
  if missing:
    raise ValueError(f"{_WHERE}:create_group_state: axes lacks param_axes for {missing} (need {MODELS})")
  frozen = {"score": score_params, **ppo.shared_frozen({"ref": (ref_params, "policy", policy_params)},
                                                        "create_group_state")}
  return state_lib.init_rl_state(trained={"policy": (policy_params, policy_opt)}, frozen=frozen, axes=axes,
                                 mesh=mesh, rng=rng, rules=rules)


def make_group_step(rollout_fn, policy_cfg, policy_opt, pg_cfg):
  """One RLOO / GRPO iteration as `step(state, batch) -> (state, metrics)` (see the module docstring).

  rollout_fn: from `make_group_rollout` (its spec sets K, the advantage and the KL mode).
  Metrics (float32 scalars): the rollout stats, means over all minibatches of policy_loss, ptx_loss,
  entropy, clip_frac, approx_kl (and ref_kl_k3 in kl_mode "k3"), and over the rollout
  advantage_mean / advantage_std (sequence advantages).
  """
  spec = getattr(rollout_fn, "spec", None)
  if not isinstance(spec, GroupRolloutSpec):
    raise ValueError(f"{_WHERE}:make_group_step: rollout_fn must come from make_group_rollout (no GroupRolloutSpec)")
  for key in ("ppo_epochs", "num_minibatches", "clip_eps", "ptx_coef"):
    if key not in pg_cfg:
      raise ValueError(f"{_WHERE}:make_group_step: pg config lacks {key!r}")
  if "temperature" in pg_cfg and float(pg_cfg.temperature) != spec.temperature:
    raise ValueError(f"{_WHERE}:make_group_step: pg_cfg.temperature={pg_cfg.temperature} differs from the "
                     f"rollout's {spec.temperature}; the ratio must use the sampling distribution")
  epochs, n_mb = int(pg_cfg.ppo_epochs), int(pg_cfg.num_minibatches)
  if epochs < 1 or n_mb < 1:
    raise ValueError(f"{_WHERE}:make_group_step: ppo_epochs and num_minibatches must be >= 1, got {epochs}, {n_mb}")
  ptx_coef = float(pg_cfg.ptx_coef)
  if ptx_coef < 0:
    raise ValueError(f"{_WHERE}:make_group_step: ptx_coef must be >= 0, got {ptx_coef}")
  k3_coef = spec.kl_coef if spec.kl_mode == "k3" else 0.0
  policy_grad = jax.value_and_grad(lora.loss(
      ppo._policy_loss_fn(GPTConfig.from_dict(policy_cfg), spec.temperature, float(pg_cfg.clip_eps), ptx_coef,
                          kl_coef=k3_coef)), has_aux=True)
  metric_keys = ("policy_loss", "ptx_loss", "entropy", "clip_frac", "approx_kl") + (("ref_kl_k3",) if k3_coef else ())

  def step(state, batch):
    for key in ("prompt_tokens", "prompt_mask") + (ppo._PTX_KEYS if ptx_coef > 0 else ()):
      if key not in batch:
        raise ValueError(f"{_WHERE}:step: batch lacks {key!r} (keys: {sorted(batch)}; ptx_coef={ptx_coef})")
    rows = batch["prompt_tokens"].shape[0] * spec.group_size
    if rows % n_mb:
      raise ValueError(f"{_WHERE}:step: {rows} rollout rows (prompts x group_size) are not divisible by "
                       f"num_minibatches={n_mb}")
    ptx = {k: batch[k] for k in ppo._PTX_KEYS + ("ptx_attention_mask",) if k in batch} if ptx_coef > 0 else {}
    if ptx and ptx["ptx_tokens"].shape[0] % n_mb:
      raise ValueError(f"{_WHERE}:step: ptx batch {ptx['ptx_tokens'].shape[0]} is not divisible by "
                       f"num_minibatches={n_mb}")

    roll_key, perm_key = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
    exp = rollout_fn(lora.merged(state["policy"]["params"]), lora.frozen_or_base(state, "ref", "policy"),
                     state["score"], batch["prompt_tokens"], batch["prompt_mask"], roll_key)
    data = {k: exp[k] for k in _MB_KEYS}

    def minibatch(pol, xs):
      mb, ptx_mb = xs
      (_, met), grads = policy_grad(pol["params"], mb, ptx_mb)
      return ppo._update(pol, grads, policy_opt), met

    pol, mets = ppo.run_epochs(minibatch, state["policy"], data, ptx, perm_key, epochs, n_mb)
    adv = exp["group_advantages"]
    metrics = {**exp["stats"], **{k: jnp.mean(mets[k]) for k in metric_keys},
               "advantage_mean": jnp.mean(adv), "advantage_std": jnp.std(adv)}
    return {**state, "step": state["step"] + 1, "policy": pol}, metrics

  return step

