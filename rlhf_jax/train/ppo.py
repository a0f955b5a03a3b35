"""PPO-ptx (InstructGPT) as one pure, jitted step: rollout -> PPO epochs -> KL-coefficient update.

RL state (a plain dict pytree, created directly sharded by `create_rl_state`):
  {"step": int32 [],
   "policy": {"params", "opt_state"}, "value": {"params", "opt_state"},
   "ref": params (frozen SFT LM), "score": params (frozen reward model; may be {}),
   "rng": uint32 [2], "kl_beta": float32 []}
With LoRA (`model/lora.py`) a trained model's params are its training tree {"base", "lora", "scale"}
(losses merge inside the trace, the rollout samples the merged policy), and a state without "ref" /
"score" reads the policy's / value model's base instead (adapters off: the SFT policy and the RM
themselves, the same arrays, no second copy).

`make_rl_step(...)` returns `step(state, batch) -> (state, metrics)` for the shared
loop (jit it with `state_lib.jit_step(step, shardings, mesh)`). One call is one PPO
iteration, with no host round trip:
  1. rollout with the current policy (rlhf_jax/train/rollout.py);
  2. `ppo_epochs` epochs, each over `num_minibatches` minibatches of a fresh random
     permutation of the rollout rows (nested lax.scan). Per minibatch: the policy
     gets the clipped surrogate on per-minibatch-whitened advantages plus
     ptx_coef * LM loss on its slice of the pretraining batch (InstructGPT's
     gamma * E_pretrain[log pi(x)], written as a loss); the value model gets
     vf_coef * the clipped value loss. Each model has its own optimizer;
  3. kl_beta <- adaptive_kl_update(kl_beta, observed mean KL, n_steps = B, ...) when
     ppo_cfg.kl_target > 0, else unchanged.
Dropout is off throughout (RL on a pretrained LM; Huang et al.).

batch: {"prompt_tokens", "prompt_mask": int [B,Tp] (left-padded), with image prompts also
        "images": float32 [B,H,W,C] (`make_rl_step(prefix_fn=...)`, state["vision"]),
        "ptx_tokens", "ptx_targets", "ptx_mask": int [Bp,T] (+ optional "ptx_attention_mask")}
The ptx keys are only read when ppo_cfg.ptx_coef > 0 (a static Python float: at 0 the
pretraining forward is not even traced). The pretraining rows are split over the
minibatches like the rollout rows (reshuffled every epoch).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from rlhf_jax import parallel
from rlhf_jax.losses import policy_gradient as pg_losses
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.model import gpt, heads, lora
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.train import state as state_lib, steps

_WHERE = "rlhf_jax/train/ppo.py"
MODELS = ("policy", "value", "ref", "score")

_PPO_KEYS = ("ppo_epochs", "num_minibatches", "clip_eps", "value_clip_eps", "vf_coef", "ptx_coef", "kl_target",
             "kl_horizon", "whiten_advantages")


def default_config() -> mlc.ConfigDict:
  """PPO-ptx settings; defaults follow lm-human-preferences / Huang et al. where they apply."""
  return mlc.ConfigDict(dict(
      ppo_epochs=4, num_minibatches=4, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1,
      ptx_coef=0.0,            # InstructGPT's gamma; 0 = plain PPO
      init_kl_beta=0.15, kl_target=6.0, kl_horizon=10000.0,  # kl_target <= 0: fixed beta
      gamma=1.0, lam=0.95, whiten_advantages=True,
      # Iterations that train only the value function (policy params and optimizer state are kept):
      # the value head starts from the RM, whose per-position outputs are not yet values.
      value_warmup_iters=0,
      # generation (make_rollout_from_config)
      max_new_tokens=24, temperature=0.7, top_k=0, top_p=1.0,
      no_eos_penalty=-1.0,     # score of a response that never emits EOS (None = keep the score)
      recompute_logprobs=False,  # True: old log-probs from one more uncached policy forward (TRL), not the sampler's
  ))


def _check_config(ppo_cfg) -> None:
  missing = [k for k in _PPO_KEYS if k not in ppo_cfg]
  if missing:
    raise ValueError(f"{_WHERE}: ppo config lacks key(s) {missing}")
  if int(ppo_cfg.ppo_epochs) < 1 or int(ppo_cfg.num_minibatches) < 1:
    raise ValueError(f"{_WHERE}: ppo_epochs and num_minibatches must be >= 1, got "
                     f"{ppo_cfg.ppo_epochs}, {ppo_cfg.num_minibatches}")
  if float(ppo_cfg.ptx_coef) < 0:
    raise ValueError(f"{_WHERE}: ptx_coef must be >= 0, got {ppo_cfg.ptx_coef}")
  if float(ppo_cfg.kl_target) > 0 and float(ppo_cfg.kl_horizon) <= 0:
    raise ValueError(f"{_WHERE}: kl_horizon must be > 0 with adaptive KL (kl_target > 0), got {ppo_cfg.kl_horizon}")


# ----------------------------------------------------------------------------- state


def create_rl_state(policy_params, value_params, ref_params, score_params, policy_opt, value_opt, mesh,
                    axes: dict, rng, init_beta: float, rules=parallel.DEFAULT_RULES, vision_params=None):
  """The RL state, created directly sharded on `mesh` (one jit with out_shardings).

  axes: {"policy", "value", "ref", "score"} -> param_axes tree of that model (same
  logical rules for all four; Adam moments follow their parameters).
  ref_params / score_params None: the state holds no such frozen model and the step reads the base of
  the policy / value model, which must then be a LoRA training tree (`lora.frozen_or_base`).
  rng: PRNG key (typed or raw uint32[2]). init_beta: initial KL coefficient.
  vision_params: image prompts: the frozen ViT + projector ({"vit", "projector"}, `model/vlm.py`)
    shared by the four models, held as state["vision"] (axes["vision"] then required).
  Returns (state, state_shardings).
  """
  missing = [k for k in MODELS if k not in axes]
  if missing:
    raise ValueError(f"{_WHERE}:create_rl_state: axes lacks param_axes for {missing} (need {MODELS})")
  if float(init_beta) < 0:
    raise ValueError(f"{_WHERE}:create_rl_state: init_beta must be >= 0, got {init_beta}")

  frozen = shared_frozen({"ref": (ref_params, "policy", policy_params), "score": (score_params, "value", value_params)},
                         "create_rl_state")
  if vision_params is not None:
    frozen["vision"] = vision_params
  return state_lib.init_rl_state(
      trained={"policy": (policy_params, policy_opt), "value": (value_params, value_opt)},
      frozen=frozen, axes=axes, mesh=mesh, rng=rng,
      scalars={"kl_beta": jnp.asarray(init_beta, jnp.float32)}, rules=rules)


def shared_frozen(models: dict, where: str) -> dict:
  """{name: params} of the frozen models a state holds. models: {name: (params or None, owner name,
  owner params)}; None = the owner's LoRA base (not held), refused when the owner is not LoRA."""
  for name, (params, owner, owner_params) in models.items():
    if params is None and not lora.is_lora(owner_params):
      raise ValueError(f"{_WHERE}:{where}: {name}_params=None (the {owner}'s base) needs a LoRA {owner} "
                       "(a training tree {'base', 'lora', 'scale'}); pass the frozen params instead")
  return {name: params for name, (params, _, _) in models.items() if params is not None}


# ----------------------------------------------------------------------------- losses


def _policy_loss_fn(policy_cfg: GPTConfig, temperature: float, clip_eps: float, ptx_coef: float,
                    kl_coef: float = 0.0):
  """loss_fn(params, mb, ptx) -> (loss, metrics): the clipped surrogate on mb's sampled tokens
  (+ ptx_coef * LM loss on the ptx rows, + kl_coef * k3 KL to mb["ref_logprobs"]); both
  coefficients are static, a zero one is not traced. Shared by PPO and the group methods."""
  def loss_fn(params, mb, ptx):
    tokens, attn, resp_mask = mb["tokens"], mb["attention_mask"], mb["response_mask"]
    n = resp_mask.shape[1]
    tp = tokens.shape[1] - n
    # Same definition as sampling.sequence_logprobs, but unembedding only the response-predicting
    # positions and keeping the logits for the entropy.
    hidden = gpt.hidden_states(params, policy_cfg, tokens, attn, prefix_embeds=mb.get("prefix_embeds"))[:, tp - 1:-1]
    logits = gpt.unembed(params, policy_cfg, hidden) / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, tp:, None], axis=-1)[..., 0]
    logp = jnp.where(resp_mask > 0, logp, 0.0)
    pl, metrics = pg_losses.policy_gradient_loss(logp, mb["logprobs"], mb["advantages"], resp_mask, clip_eps,
                                                 ref_logprobs=mb.get("ref_logprobs"), kl_coef=kl_coef)
    metrics["entropy"] = ppo_losses.entropy_from_logits(jax.lax.stop_gradient(logits), resp_mask)
    total = pl
    if ptx_coef > 0:  # static: with 0 the pretraining forward is never traced
      ptx_loss, _ = steps.model_lm_loss(params, policy_cfg, ptx["ptx_tokens"], ptx["ptx_targets"], ptx["ptx_mask"],
                                        ptx.get("ptx_attention_mask"))
      total = total + ptx_coef * ptx_loss
    else:
      ptx_loss = jnp.zeros((), jnp.float32)
    metrics["ptx_loss"] = ptx_loss
    return total, metrics
  return loss_fn


def _value_loss_fn(value_cfg: GPTConfig, clip_eps: float, vf_coef: float):
  def loss_fn(params, mb):
    tokens, attn, resp_mask = mb["tokens"], mb["attention_mask"], mb["response_mask"]
    tp = tokens.shape[1] - resp_mask.shape[1]
    values = heads.values(params, value_cfg, tokens, attn, prefix_embeds=mb.get("prefix_embeds"))[:, tp - 1:-1]
    vl, metrics = ppo_losses.value_loss(values, mb["values"], mb["returns"], resp_mask, clip_eps)
    return vf_coef * vl, metrics
  return loss_fn


def _update(sub: dict, grads, optimizer) -> dict:
  updates, opt_state = optimizer.update(grads, sub["opt_state"], sub["params"])
  return {"params": optax.apply_updates(sub["params"], updates), "opt_state": opt_state}


def run_epochs(minibatch, carry, data: dict, ptx: dict, perm_key, epochs: int, n_mb: int):
  """`epochs` passes over `data`, each over `n_mb` minibatches of a fresh random permutation of its
  rows (nested lax.scan); the ptx rows ({} = none) are split the same way with their own permutation.

  minibatch(carry, (mb, ptx_mb)) -> (carry, metrics). data / ptx: dicts of [rows, ...] arrays with
  rows divisible by n_mb. Returns (carry, metrics stacked [epochs, n_mb]).
  """
  b = next(iter(data.values())).shape[0]

  def split(tree, perm):  # rows permuted, then [n_mb, rows/n_mb, ...]
    return jax.tree.map(lambda x: x[perm].reshape((n_mb, x.shape[0] // n_mb) + x.shape[1:]), tree)

  def epoch(carry, e):
    k_rows, k_ptx = jax.random.split(jax.random.fold_in(perm_key, e))
    mbs = split(data, jax.random.permutation(k_rows, b))
    ptx_mbs = split(ptx, jax.random.permutation(k_ptx, ptx["ptx_tokens"].shape[0])) if ptx else {}
    return jax.lax.scan(minibatch, carry, (mbs, ptx_mbs))

  return jax.lax.scan(epoch, carry, jnp.arange(epochs))


# ----------------------------------------------------------------------------- step

_MB_KEYS = ("tokens", "attention_mask", "response_mask", "logprobs", "values", "advantages", "returns")
_PTX_KEYS = ("ptx_tokens", "ptx_targets", "ptx_mask")


def make_rl_step(rollout_fn, policy_cfg, value_cfg, policy_opt, value_opt, ppo_cfg, prefix_fn=None):
  """One PPO-ptx iteration as `step(state, batch) -> (state, metrics)` (see the module docstring).

  rollout_fn: from `rollout.make_rollout` (its `.spec.temperature` is the learner's temperature).
  policy_opt / value_opt: optax transformations (e.g. `state_lib.make_optimizer`), the same
  objects `create_rl_state` initialised the optimizer states with.
  prefix_fn: image prompts (issue 15). prefix_fn(state["vision"], batch["images"]) -> [B,P,D] image
    tokens, computed once per iteration from the state's frozen "vision" params (ViT + projector,
    shared by the four models) and read by every model before the prompt; they travel with their
    rows through the minibatches. None = text prompts.
  Metrics (float32 scalars): rollout stats (score, raw_score, kl, kl_beta [the beta used for this
  rollout's rewards], non_score_reward, response_length, ended_frac), means over all minibatches of
  policy_loss, value_loss, ptx_loss, entropy, clip_frac, approx_kl, value_clip_frac,
  explained_variance, and over the rollout: advantage_mean, advantage_std, return_mean
  (raw GAE advantages, before whitening); kl_beta_next.
  """
  _check_config(ppo_cfg)
  spec = getattr(rollout_fn, "spec", None)
  if spec is None:
    raise ValueError(f"{_WHERE}:make_rl_step: rollout_fn must come from rollout.make_rollout (it has no .spec)")
  if "temperature" in ppo_cfg and float(ppo_cfg.temperature) != spec.temperature:
    raise ValueError(f"{_WHERE}:make_rl_step: ppo_cfg.temperature={ppo_cfg.temperature} differs from the "
                     f"rollout's {spec.temperature}; the ratio must use the sampling distribution")
  p_cfg, v_cfg = GPTConfig.from_dict(policy_cfg), GPTConfig.from_dict(value_cfg)
  epochs, n_mb = int(ppo_cfg.ppo_epochs), int(ppo_cfg.num_minibatches)
  ptx_coef = float(ppo_cfg.ptx_coef)
  whiten = bool(ppo_cfg.whiten_advantages)
  value_warmup = int(ppo_cfg.get("value_warmup_iters", 0))
  kl_target, kl_horizon = float(ppo_cfg.kl_target), float(ppo_cfg.kl_horizon)
  policy_grad = jax.value_and_grad(
      lora.loss(_policy_loss_fn(p_cfg, spec.temperature, float(ppo_cfg.clip_eps), ptx_coef)), has_aux=True)
  value_grad = jax.value_and_grad(
      lora.loss(_value_loss_fn(v_cfg, float(ppo_cfg.value_clip_eps), float(ppo_cfg.vf_coef))), has_aux=True)

  def step(state, batch):
    for k in ("prompt_tokens", "prompt_mask") + (_PTX_KEYS if ptx_coef > 0 else ()) + (("images",) if prefix_fn else ()):
      if k not in batch:
        raise ValueError(f"{_WHERE}:step: batch lacks {k!r} (keys: {sorted(batch)}; ptx_coef={ptx_coef})")
    b = batch["prompt_tokens"].shape[0]
    if b % n_mb:
      raise ValueError(f"{_WHERE}:step: rollout batch {b} is not divisible by num_minibatches={n_mb}")
    ptx = {k: batch[k] for k in _PTX_KEYS + ("ptx_attention_mask",) if k in batch} if ptx_coef > 0 else {}
    if ptx and ptx["ptx_tokens"].shape[0] % n_mb:
      raise ValueError(f"{_WHERE}:step: ptx batch {ptx['ptx_tokens'].shape[0]} is not divisible by "
                       f"num_minibatches={n_mb}")

    key = jax.random.fold_in(state["rng"], state["step"])
    roll_key, perm_key = jax.random.split(key)
    beta = state["kl_beta"]
    prefix = None if prefix_fn is None else prefix_fn(state["vision"], batch["images"])
    exp = rollout_fn(lora.merged(state["policy"]["params"]), lora.merged(state["value"]["params"]),
                     lora.frozen_or_base(state, "ref", "policy"), lora.frozen_or_base(state, "score", "value"),
                     batch["prompt_tokens"], batch["prompt_mask"], roll_key, beta,
                     **({} if prefix is None else {"prefix_embeds": prefix}))
    data = {k: exp[k] for k in _MB_KEYS}
    if prefix is not None:
      data["prefix_embeds"] = prefix

    def minibatch(carry, xs):
      pol, val = carry
      mb, ptx_mb = xs
      if whiten:
        mb = {**mb, "advantages": ppo_losses.whiten(mb["advantages"], mb["response_mask"])}
      (_, pmet), pgrads = policy_grad(pol["params"], mb, ptx_mb)
      (_, vmet), vgrads = value_grad(val["params"], mb)
      return (_update(pol, pgrads, policy_opt), _update(val, vgrads, value_opt)), {**pmet, **vmet}

    (pol, val), mets = run_epochs(minibatch, (state["policy"], state["value"]), data, ptx, perm_key, epochs, n_mb)
    if value_warmup > 0:
      frozen = state["step"] < value_warmup
      pol = jax.tree.map(lambda new, old: jnp.where(frozen, old, new), pol, state["policy"])

    stats = exp["stats"]
    new_beta = beta
    if kl_target > 0:  # Ziegler et al.: n_steps = samples seen this iteration
      new_beta = ppo_losses.adaptive_kl_update(beta, stats["kl"], b, kl_target, kl_horizon)
    m = exp["response_mask"]
    metrics = {
        **stats,
        **{k: jnp.mean(mets[k]) for k in ("policy_loss", "value_loss", "ptx_loss", "entropy", "clip_frac",
                                          "approx_kl", "value_clip_frac", "explained_variance")},
        "advantage_mean": ppo_losses.masked_mean(exp["advantages"], m),
        "advantage_std": jnp.sqrt(ppo_losses.masked_var(exp["advantages"], m)),
        "return_mean": ppo_losses.masked_mean(exp["returns"], m),
        "kl_beta_next": new_beta,
    }
    new_state = {**state, "step": state["step"] + 1, "policy": pol, "value": val, "kl_beta": new_beta}
    return new_state, metrics

  return step
