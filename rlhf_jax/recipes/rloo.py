"""RLOO / GRPO — K samples per prompt, the other samples as the baseline, no value model.

The models, prompts, ptx rows and the held-out monitor are PPO's (`recipes.ppo.setup`): the policy
and the frozen reference start from `init_from` (`ref_from` overrides the reference), the reward is
the RM (`rm_from`) or, as an oracle ablation in the built-in world, the gold labeler. The step and
the loop are `train.rl.fit_group_rl`'s. `algo` picks the advantage estimator and, unless
`pg.kl_mode` is set, where the KL to the reference goes:
  rloo   sequence reward score - pg.kl_coef * KL (InstructGPT's penalty), leave-one-out baseline
  grpo   score alone, (score - mean) / std over the group, pg.kl_coef * k3 KL in the loss
Writes stage "rloo" or "grpo".
"""
from __future__ import annotations

from rlhf_jax.model import lora
from rlhf_jax.recipes import ppo
from rlhf_jax.train import rl, stages

KL_MODE = {"rloo": "reward", "grpo": "k3"}      # each algorithm's default place for the KL term
RESULT_KEYS = ppo.RESULT_KEYS + ("reward", "ref_kl_k3", "reward_group_std", "zero_advantage_frac")


def resolve(config):
  """config with pg.advantage = algo and the algorithm's default pg.kl_mode (when empty)."""
  if config.algo not in KL_MODE:
    raise ValueError(f"config.algo must be one of {sorted(KL_MODE)}, got {config.algo!r}")
  with config.unlocked():
    config.pg.advantage = config.algo
    if not config.pg.kl_mode:
      config.pg.kl_mode = KL_MODE[config.algo]
  return config


def run(config, workdir: str) -> dict:
  """Config keys: algo, the keys of `recipes.ppo.setup`, pg (`train.group_rl.default_config`), optim,
  loop, mesh. batch_size counts prompts; each iteration trains on batch_size x pg.group_size samples."""
  config = resolve(config)
  s = ppo.setup(config, workdir, config.pg)
  cfg, tok = s.policy.config, s.policy.tok
  use_rm = config.reward == "rm"
  stages.write_stage(workdir, config.algo, cfg, tok, init_from=config.init_from, ref_from=config.get("ref_from", ""),
                     rm_from=config.rm_from, ptx_from=s.ptx_spec, ptx_coef=float(config.pg.ptx_coef),
                     reward=config.reward, kl_mode=config.pg.kl_mode, group_size=int(config.pg.group_size),
                     data=s.report, **lora.stage_info(config.get("lora")))
  _, last, _ = rl.fit_group_rl(config, workdir, policy_cfg=cfg, policy_params=s.policy.params,
                               ref_params=None if s.ref is s.policy else s.ref.params,
                               score_params=s.rm_params if use_rm else {},
                               score_cfg=s.rm.config if use_rm else None,
                               score_fn=ppo.score_fn(config.reward, s.rm.config, tok), prompt_batches=s.prompts,
                               ptx_batches=s.ptx, eos_id=tok.eos_id, pad_id=tok.pad_id, eval_fn=s.monitor,
                               name=config.algo)
  out = ppo.result(last, s, RESULT_KEYS)
  print(out)
  return out
