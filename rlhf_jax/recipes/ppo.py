"""InstructGPT step 3 — PPO (γ = 0) or PPO-ptx (γ > 0) against the reward model, KL-penalised to SFT.

The policy and the frozen reference start from `init_from` (an SFT stage workdir or an HF model
directory); the value function starts from the RM (`rm_from`: an RM stage workdir or an HF
sequence-classification directory), whose bias is shifted so demonstrations score mean 0. Prompts
come from `data` (`recipes.data.stage_records`, kind "prompts"); the ptx rows from `ptx_from`
(a pretraining workdir, a text file or a JSONL of {"text"}). The RL step and the loop are
`train.rl.fit_rl`'s. `ref_from` gives another frozen reference (iterated RLHF continues PPO from a
PPO stage with SFT as the reference). `setup` (models, prompts, ptx rows, monitor) is shared with
`recipes/rloo.py`. Every `loop.eval_every` iterations the policy is measured on held-out
prompts (`eval.ppo_monitor`): in the built-in world with the gold labeler; on real data by the RM
(score, win rate vs SFT), KL to SFT and the pretraining loss.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from rlhf_jax.data import gold, pipeline
from rlhf_jax.eval import ppo_monitor
from rlhf_jax.model import heads, lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.train import rl, rollout, stages

log = logging.getLogger(__name__)

RESULT_KEYS = ("score", "kl", "kl_beta", "ptx_loss", "approx_kl", "clip_frac", "eval/gold_mean",
               "eval/rm_score_mean", "eval/kl_to_sft", "eval/pretrain_val_loss", "eval/win_rate_vs_sft_gold",
               "eval/win_rate_vs_sft_rm")


def score_fn(reward: str, rm_cfg, tok) -> rollout.ScoreFn:
  """'rm': InstructGPT. 'gold': the gold labeler itself (an oracle ablation; built-in world only)."""
  if reward == "rm":
    return rollout.reward_model_score_fn(rm_cfg)
  if reward == "gold":
    return rollout.host_text_score_fn(lambda ps, rs: [gold.score(p, r) for p, r in zip(ps, rs)], tok)
  raise ValueError(f"config key 'reward' must be 'rm' or 'gold', got {reward!r}")


def _ptx_source(config, policy: stages.Model) -> str:
  if config.ptx_from:
    return config.ptx_from
  parent = policy.info.get("init_from", "")
  if parent and stages.is_stage_dir(parent) and stages.read_stage(parent)["stage"] == "pretrain":
    return parent
  return ""


@dataclasses.dataclass
class RLInputs:
  """What every RL recipe (PPO, RLOO, GRPO) reads: models, prompt / ptx streams and the monitor."""
  policy: stages.Model           # the starting policy (init_from)
  ref: stages.Model              # the frozen reference (ref_from, else the starting policy)
  rm: stages.Model
  rm_params: dict                # the RM with its reward offset folded into the bias
  ptx_spec: str
  ptx: Any                       # pretraining-row iterator, or None when ptx_coef == 0
  train_prompts: list
  eval_prompts: list
  prompts: Any                   # the prompt iterator
  monitor: Any                   # ppo_monitor.Monitor, or None when n_eval_prompts == 0
  report: dict


def setup(config, workdir: str, algo) -> RLInputs:
  """Loads and checks the models and builds the data streams of an RL stage.

  algo: the algorithm's config section (ptx_coef, temperature, max_new_tokens). Config keys:
  init_from, ref_from ("" = init_from), rm_from, ptx_from, ptx_seq_len, ptx_limit, reward, data,
  max_prompt_len, batch_size, ptx_batch_size, n_eval_prompts (0 = no monitor), seed.
  """
  policy = stages.load_model(config.init_from, expect=stages.POLICY_STAGES)
  ref = (stages.load_model(config.ref_from, expect=stages.POLICY_STAGES, key="ref_from")
         if config.get("ref_from") else policy)
  rm, offset = stages.load_reward_model(config.rm_from)
  stages.check_same_tokenizer(policy, rm)
  stages.check_same_tokenizer(policy, ref)
  tok = policy.tok
  rm_params = heads.shift_bias(rm.params, offset)
  synthetic_world = config.data.train == "synthetic"
  if config.reward == "gold" and not synthetic_world:
    raise ValueError("reward='gold' (the oracle ablation) needs data.train=synthetic: only the built-in world "
                     "has a gold labeler")
  ptx_spec = _ptx_source(config, policy)
  needs_rows = float(algo.ptx_coef) > 0 or int(config.n_eval_prompts) > 0   # the ptx term / the monitor's LM loss
  if ptx_spec and needs_rows:
    ptx_rows, val_rows = data_lib.ptx_rows(ptx_spec, tok, int(config.ptx_seq_len) or 0, workdir,
                                           limit=int(config.get("ptx_limit", 0)))
  elif float(algo.ptx_coef) > 0:
    raise ValueError(f"ptx_coef={algo.ptx_coef} needs pretraining text: set ptx_from to a text file, "
                     "a JSONL of {'text'} lines or a pretraining workdir")
  else:
    ptx_rows, val_rows = None, np.zeros((0, 2), np.int32)
  train_prompts, eval_prompts, report = data_lib.stage_records(config.data, "prompts", workdir)
  eval_prompts = eval_prompts[:int(config.n_eval_prompts)]
  prompts = pipeline.prompt_batches(train_prompts, tok, config.batch_size, config.max_prompt_len, seed=config.seed)
  ptx = (pipeline.lm_batches(ptx_rows, config.ptx_batch_size, seed=config.seed)
         if ptx_rows is not None and float(algo.ptx_coef) > 0 else None)
  monitor = None
  if eval_prompts:
    monitor = ppo_monitor.Monitor(policy.config, rm.config, tok, eval_prompts, val_rows[:128], ref.params, rm_params,
                                  temperature=algo.temperature, max_prompt_len=config.max_prompt_len,
                                  max_new_tokens=algo.max_new_tokens, seed=config.seed, gold=synthetic_world)
  return RLInputs(policy, ref, rm, rm_params, ptx_spec, ptx, train_prompts, eval_prompts, prompts, monitor, report)


def result(last: dict, inputs: RLInputs, keys=RESULT_KEYS) -> dict:
  """The stage's result: the final logged metrics named in `keys`, the monitor's initial
  (reference) metrics and the prompt pipeline's counts."""
  out = {k: last.get(k) for k in keys if last.get(k) is not None}
  if inputs.monitor is not None:
    out["initial"] = inputs.monitor.initial
  stats = inputs.prompts.stats.as_dict()
  out["prompts"] = {"train": len(inputs.train_prompts), "eval": len(inputs.eval_prompts),
                    "skipped": stats["skipped"], "truncated": stats["truncated"]}
  return out


def run(config, workdir: str) -> dict:
  """PPO(-ptx): the keys of `setup`, plus ppo, optim, value_optim, loop, mesh, lora (optional: rank > 0
  trains LoRA adapters on the policy and the value model; the reference and the scorer are then their
  bases, not copies). Returns final metrics."""
  s = setup(config, workdir, config.ppo)
  cfg, tok = s.policy.config, s.policy.tok
  stages.write_stage(workdir, "ppo", cfg, tok, init_from=config.init_from, ref_from=config.get("ref_from", ""),
                     rm_from=config.rm_from, ptx_from=s.ptx_spec, ptx_coef=float(config.ppo.ptx_coef),
                     reward=config.reward, data=s.report, **lora.stage_info(config.get("lora")))
  # None: the reference is the starting policy and the scorer the value model's start (the RM); with
  # LoRA they are then the bases of the trained models (no second copy), else frozen copies.
  _, last, _ = rl.fit_rl(config, workdir, policy_cfg=cfg, value_cfg=s.rm.config, policy_params=s.policy.params,
                         ref_params=None if s.ref is s.policy else s.ref.params, value_params=s.rm_params,
                         score_params=None if config.reward == "rm" else {},
                         score_fn=score_fn(config.reward, s.rm.config, tok), prompt_batches=s.prompts,
                         ptx_batches=s.ptx, eos_id=tok.eos_id, pad_id=tok.pad_id, eval_fn=s.monitor)
  out = result(last, s)
  print(out)
  return out
