"""Runs an RL stage through the shared loop: the RL mirror of `supervised.fit`.

An experiment supplies the models, a score function, this host's prompt iterator and (for the ptx
term) a pretraining-row iterator; the rest is the same for every RL run (`_fit`): mesh, optimizer
schedules that span the run, the RL state created directly sharded, the whole iteration as one
jitted program with declared shardings, and the shared loop with exact resume of both data streams.

  fit_rl         PPO / PPO-ptx: policy + value model (`train/ppo.py`)
  fit_group_rl   RLOO / GRPO: K samples per prompt, no value model (`train/group_rl.py`)
"""
from __future__ import annotations

from typing import Callable

import jax

from rlhf_jax import parallel
from rlhf_jax.data import pipeline
from rlhf_jax.model import gpt, heads, lora
from rlhf_jax.train import group_rl, loop, ppo, rollout, state as state_lib

PROMPT_KEYS = {"tokens": "prompt_tokens", "attention_mask": "prompt_mask"}
PTX_KEYS = {"tokens": "ptx_tokens", "targets": "ptx_targets", "mask": "ptx_mask"}
LORA_SEED = 0x10A  # folded into the seed for the adapters' init (policy; value + 1)


def _fit(config, workdir: str, *, section, optims: tuple[str, ...], build: Callable, prompt_batches, ptx_batches,
         eval_fn: Callable | None, name: str, hooks, prompt_keys=PROMPT_KEYS):
  """The shared part. section: the algorithm's config section (ppo_epochs, num_minibatches, ptx_coef);
  optims: the config sections of the trained models' optimizers; build(mesh, optimizers) ->
  (state, shardings, step). Schedules count optimizer updates: iterations x epochs x minibatches."""
  updates = int(config.loop.num_steps) * int(section.ppo_epochs) * int(section.num_minibatches)
  with config.unlocked():
    for key in optims:
      config[key].total_steps = updates
  mesh = parallel.make_mesh(config.mesh.to_dict())
  parallel.check_batch_divisible(int(config.batch_size), mesh)
  optimizers = [state_lib.make_optimizer(config[key]) for key in optims]
  state, shardings, step = build(mesh, *optimizers)
  step = state_lib.jit_step(step, shardings, mesh)
  members = {"prompt": (prompt_batches, prompt_keys)}
  if float(section.ptx_coef) > 0:
    if ptx_batches is None:
      raise ValueError(f"{name}: ptx_coef={section.ptx_coef} > 0 needs pretraining rows (ptx data)")
    members["ptx"] = (ptx_batches, PTX_KEYS)
  batches = parallel.ShardedBatches(pipeline.ZipBatches(**members), mesh)
  loop_cfg = loop.LoopConfig.from_config(config.loop, name=name)
  state, last = loop.run(state, step, batches, loop_cfg, workdir,
                         eval_fn=None if eval_fn is None else (lambda s: eval_fn(lora.merged(s["policy"]["params"]))),
                         hooks=hooks)
  return state, last, mesh


def fit_rl(config, workdir: str, *, policy_cfg, value_cfg, policy_params, ref_params, value_params,
           score_params, score_fn: rollout.ScoreFn, prompt_batches, ptx_batches=None, eos_id: int,
           pad_id: int, eval_fn: Callable | None = None, name: str = "ppo", hooks=(), vision=None):
  """PPO(-ptx) with config sections `mesh`, `optim` (policy), `value_optim`, `ppo`, `loop`, `batch_size`, `seed`
  and optionally `lora`.

  policy_cfg: the policy's and reference's GPTConfig; value_cfg: the value model's and scorer's.
  ref_params: the frozen reference; None = the policy's starting params.
  score_params: frozen scorer params handed to score_fn (the RM; may be {} for a host scorer);
    None = the value model's starting params (InstructGPT: both are the RM).
  LoRA (`config.lora.rank` > 0): policy and value model train adapters only (the value model its
    head too); a None reference / scorer is then the policy's / value model's base, adapters off:
    the same arrays, no second copy in the state. eval_fn gets the merged policy.
  prompt_batches: host iterator of {"tokens","attention_mask"} int32 [B,Tp] (left padded), as
    `pipeline.prompt_batches` yields; ptx_batches: {"tokens","targets","mask"} [Bp,T] rows, read
    only when config.ppo.ptx_coef > 0.
  eval_fn(policy_params) -> dict of held-out metrics, every loop.eval_every iterations.
  vision: image prompts (issue 15): (VLMConfig, {"vit", "projector"} params), the frozen image
    encoder every model reads its image tokens from; prompt_batches then also yield "images"
    float32 [B,H,W,C] (`pipeline.prompt_batches(extra=image_world.record_image)`). The decoders' configs are policy_cfg /
    value_cfg as for text.
  Schedules count optimizer updates: iterations x ppo_epochs x num_minibatches.
  Returns (final state, last metrics, mesh).
  """
  prefix_fn, vision_params, vision_axes = None, None, {}
  if vision is not None:
    from rlhf_jax.model import vlm
    vlm_cfg, vision_params = vision
    prefix_fn = lambda vp, images: vlm.image_tokens(vp, vlm_cfg, images)
    full_axes = vlm.param_axes(vlm_cfg)
    vision_axes = {"vision": {k: full_axes[k] for k in ("vit", "projector")}}

  def build(mesh, policy_opt, value_opt):
    rng = jax.random.PRNGKey(int(config.seed))
    ref, score, section = ref_params, score_params, config.get("lora")
    if lora.from_config(section) is None:   # full fine-tuning: frozen copies
      ref = policy_params if ref is None else ref
      score = value_params if score is None else score
    policy, policy_axes, policy_opt = lora.setup(section, policy_params, gpt.param_axes(policy_cfg), policy_opt,
                                                 jax.random.fold_in(rng, LORA_SEED))
    value, value_axes, value_opt = lora.setup(section, value_params, heads.param_axes(value_cfg), value_opt,
                                              jax.random.fold_in(rng, LORA_SEED + 1))
    axes = {"policy": policy_axes, "ref": gpt.param_axes(policy_cfg), "value": value_axes,
            "score": heads.param_axes(value_cfg) if score else {}, **vision_axes}
    state, shardings = ppo.create_rl_state(policy, value, ref, score, policy_opt, value_opt, mesh, axes, rng,
                                           float(config.ppo.init_kl_beta), vision_params=vision_params)
    rollout_fn = rollout.make_rollout_from_config(policy_cfg, value_cfg, policy_cfg, score_fn, config.ppo,
                                                  eos_id=eos_id, pad_id=pad_id)
    return state, shardings, ppo.make_rl_step(rollout_fn, policy_cfg, value_cfg, policy_opt, value_opt, config.ppo,
                                              prefix_fn=prefix_fn)

  return _fit(config, workdir, section=config.ppo, optims=("optim", "value_optim"), build=build,
              prompt_batches=prompt_batches, ptx_batches=ptx_batches, eval_fn=eval_fn, name=name, hooks=hooks,
              prompt_keys={**PROMPT_KEYS, "images": "images"} if vision is not None else PROMPT_KEYS)


def fit_group_rl(config, workdir: str, *, policy_cfg, policy_params, ref_params, score_params, score_cfg,
                 score_fn: rollout.ScoreFn, prompt_batches, ptx_batches=None, eos_id: int, pad_id: int,
                 eval_fn: Callable | None = None, name: str = "rloo", hooks=()):
  """RLOO / GRPO with config sections `mesh`, `optim`, `pg` (`group_rl.default_config`), `loop`,
  `batch_size` (prompts per iteration; each is sampled pg.group_size times), `seed`.

  score_cfg: the scorer's GPTConfig for its param_axes (None when score_params is {}, e.g. the gold
  labeler as a host scorer). No value model is created. ref_params None = the policy's starting
  params (with LoRA: its base). Other arguments as in `fit_rl`.
  Returns (final state, last metrics, mesh).
  """
  if score_params and score_cfg is None:
    raise ValueError(f"{name}: score_params given without score_cfg (needed for their sharding)")

  def build(mesh, policy_opt):
    rng = jax.random.PRNGKey(int(config.seed))
    ref, section = ref_params, config.get("lora")
    if lora.from_config(section) is None and ref is None:
      ref = policy_params
    policy, policy_axes, policy_opt = lora.setup(section, policy_params, gpt.param_axes(policy_cfg), policy_opt,
                                                 jax.random.fold_in(rng, LORA_SEED))
    axes = {"policy": policy_axes, "ref": gpt.param_axes(policy_cfg),
            "score": heads.param_axes(score_cfg) if score_params else {}}
    state, shardings = group_rl.create_group_state(policy, ref, score_params, policy_opt, mesh, axes, rng)
    rollout_fn = group_rl.make_group_rollout_from_config(policy_cfg, policy_cfg, score_fn, config.pg, eos_id=eos_id,
                                                         pad_id=pad_id)
    return state, shardings, group_rl.make_group_step(rollout_fn, policy_cfg, policy_opt, config.pg)

  return _fit(config, workdir, section=config.pg, optims=("optim",), build=build, prompt_batches=prompt_batches,
              ptx_batches=ptx_batches, eval_fn=eval_fn, name=name, hooks=hooks)
