"""Runs an RL stage (PPO / PPO-ptx) through the shared loop: the RL mirror of `supervised.fit`.

An experiment supplies the models (policy, frozen reference, value, frozen scorer), a score
function, this host's prompt iterator and (for PPO-ptx) a pretraining-row iterator; `fit_rl`
does the rest the same way for every RL run: mesh, optimizers, the RL state created directly
sharded, the rollout + PPO-epochs step as one jitted program with declared shardings, and the
shared loop with exact resume of both data streams.
"""
from __future__ import annotations

from typing import Callable

import jax

from rlhf_jax import parallel
from rlhf_jax.data import pipeline
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import loop, ppo, rollout, state as state_lib

PROMPT_KEYS = {"tokens": "prompt_tokens", "attention_mask": "prompt_mask"}
PTX_KEYS = {"tokens": "ptx_tokens", "targets": "ptx_targets", "mask": "ptx_mask"}


def fit_rl(config, workdir: str, *, policy_cfg, value_cfg, policy_params, ref_params, value_params,
           score_params, score_fn: rollout.ScoreFn, prompt_batches, ptx_batches=None, eos_id: int,
           pad_id: int, eval_fn: Callable | None = None, name: str = "ppo", hooks=()):
  """Trains with config sections `mesh`, `optim` (policy), `value_optim`, `ppo`, `loop`, `batch_size`, `seed`.

  policy_cfg: the policy's and reference's GPTConfig; value_cfg: the value model's and scorer's.
  score_params: frozen scorer params handed to score_fn (the RM; may be {} for a host scorer).
  prompt_batches: host iterator of {"tokens","attention_mask"} int32 [B,Tp] (left padded), as
    `pipeline.prompt_batches` yields; ptx_batches: {"tokens","targets","mask"} [Bp,T] rows, read
    only when config.ppo.ptx_coef > 0.
  eval_fn(policy_params) -> dict of held-out metrics, every loop.eval_every iterations.
  Schedules count optimizer updates: iterations x ppo_epochs x num_minibatches.
  Returns (final state, last metrics, mesh).
  """
  updates = int(config.loop.num_steps) * int(config.ppo.ppo_epochs) * int(config.ppo.num_minibatches)
  with config.unlocked():
    config.optim.total_steps = config.value_optim.total_steps = updates
  mesh = parallel.make_mesh(config.mesh.to_dict())
  parallel.check_batch_divisible(int(config.batch_size), mesh)
  policy_opt = state_lib.make_optimizer(config.optim)
  value_opt = state_lib.make_optimizer(config.value_optim)
  axes = {"policy": gpt.param_axes(policy_cfg), "ref": gpt.param_axes(policy_cfg),
          "value": heads.param_axes(value_cfg), "score": heads.param_axes(value_cfg) if score_params else {}}
  state, shardings = ppo.create_rl_state(policy_params, value_params, ref_params, score_params, policy_opt,
                                         value_opt, mesh, axes, jax.random.PRNGKey(int(config.seed)),
                                         float(config.ppo.init_kl_beta))
  rollout_fn = rollout.make_rollout_from_config(policy_cfg, value_cfg, policy_cfg, score_fn, config.ppo,
                                                eos_id=eos_id, pad_id=pad_id)
  step = state_lib.jit_step(ppo.make_rl_step(rollout_fn, policy_cfg, value_cfg, policy_opt, value_opt, config.ppo),
                            shardings, mesh)
  members = {"prompt": (prompt_batches, PROMPT_KEYS)}
  if float(config.ppo.ptx_coef) > 0:
    if ptx_batches is None:
      raise ValueError(f"{name}: ppo.ptx_coef={config.ppo.ptx_coef} > 0 needs pretraining rows (ptx data)")
    members["ptx"] = (ptx_batches, PTX_KEYS)
  batches = parallel.ShardedBatches(pipeline.ZipBatches(**members), mesh)
  loop_cfg = loop.LoopConfig.from_config(config.loop, name=name)
  state, last = loop.run(state, step, batches, loop_cfg, workdir,
                         eval_fn=None if eval_fn is None else (lambda s: eval_fn(s["policy"]["params"])),
                         hooks=hooks)
  return state, last, mesh
