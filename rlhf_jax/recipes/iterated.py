"""Iterated RLHF (the ChatGPT recipe): label the current policy's samples, update the RM, continue PPO.

Round 0 is PPO from the SFT policy against the given RM. Each later round r:
  1. samples K ~ U[k_min, k_max] responses from the current policy on fresh train prompts
     (label.prompt_seed + r) and has the gold labeler rank them (`rm.label_synthetic`);
  2. continues training the current RM (head included) on them, mixed with `replay` x as many
     earlier comparisons (the original RM's and earlier rounds'), with the K-wise loss
     (`rm.fit_reward_model`), and re-centres it so demonstrations score mean 0;
  3. continues PPO from the current policy against the new RM (`recipes.ppo.run`); the frozen
     reference stays the SFT policy, so every round's KL is to SFT.
Each round lives in <workdir>/round<r>/{rm,ppo}, each a normal stage (resumable, cached by its
stage.json / checkpoints). The policy's compute is the PPO rounds'; labelling and RM training come
on top (their sizes are in the result).
"""
from __future__ import annotations

import json
import os

import numpy as np

from rlhf_jax.data import synthetic
from rlhf_jax.model import lora
from rlhf_jax.recipes import ppo, rm as rm_lib
from rlhf_jax.train import stages


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _k(records) -> int:
  return max(len(r["responses"]) for r in records)


def update_reward_model(config, workdir: str, policy_dir: str, rm_dir: str, old: list, eval_records: list,
                        round_index: int) -> tuple[list, dict]:
  """Round `round_index`'s RM in `workdir` (an "rm" stage): new gold-labelled samples of the policy in
  `policy_dir`, then the RM of `rm_dir` trained further on them (+ replayed `old` comparisons).

  config: the iterated config (sections rm, seed, replay). Returns (the new comparisons, result).
  """
  if stages.is_stage_dir(workdir):
    return _read_jsonl(os.path.join(workdir, "comparisons_train.jsonl")), stages.read_stage(workdir)["result"]
  rm_cfg = config.rm.copy_and_resolve_references()
  with rm_cfg.unlocked():
    rm_cfg.label.prompt_seed = int(config.rm.label.prompt_seed) + round_index
    rm_cfg.label.pretrained_fraction = 0.0          # all K from the current policy
    rm_cfg.seed = int(config.seed) + round_index
  policy = stages.load_model(policy_dir)
  reward = stages.load_model(rm_dir, expect="rm")
  stages.check_same_tokenizer(policy, reward)
  new = rm_lib.label_synthetic(rm_cfg, workdir, policy.config, policy.tok, (policy.params, None), "train")
  n_old = min(len(old), int(round(float(config.replay) * len(new))))
  rng = np.random.default_rng(int(config.seed) + round_index)
  replayed = [old[i] for i in rng.choice(len(old), n_old, replace=False)] if n_old else []
  train = new + replayed
  state, fit = rm_lib.fit_reward_model(rm_cfg, workdir, reward.config, reward.tok, train, eval_records,
                                       params=reward.params, k_max=_k(train), eval_k_max=_k(eval_records))
  demos = [(d["messages"], d["response"]) for d in synthetic.demonstrations(int(rm_cfg.n_norm_demos), seed=rm_cfg.seed)]
  offset, demo_std = rm_lib.demonstration_offset(lora.merged(state["params"]), reward.config, reward.tok, demos,
                                                 rm_cfg.max_len)
  result = {"eval_pairwise_accuracy": fit["eval_pairwise_accuracy"], "eval_loss": fit["eval_loss"],
            "train_loss": fit["train_loss"], "steps": fit["steps"], "new_comparisons": len(new),
            "replayed_comparisons": n_old, "reward_offset": offset, "demo_score_std": demo_std}
  stages.write_stage(workdir, "rm", reward.config, reward.tok, init_from=rm_dir, reward_offset=offset,
                     data={"source": f"gold-labelled samples of {os.path.abspath(policy_dir)}"}, result=result,
                     **lora.stage_info(rm_cfg.get("lora")))
  return new, result


def run(config, workdir: str) -> dict:
  """Config keys: init_from (the SFT stage: first policy and the reference), rm_from (an RM stage;
  its comparisons_train/eval.jsonl are replayed / held out), ptx_from, rounds, replay, seed,
  ppo (an `experiments/ppo.py` config: loop.num_steps iterations per round), rm (an
  `experiments/rm.py` config: label, epochs, optim, loop). Returns {"rounds": [...], "policy_dirs",
  "rm_dirs", "labelled_comparisons"}."""
  if int(config.rounds) < 1:
    raise ValueError(f"config.rounds must be >= 1, got {config.rounds}")
  old = _read_jsonl(os.path.join(config.rm_from, "comparisons_train.jsonl"))
  eval_records = _read_jsonl(os.path.join(config.rm_from, "comparisons_eval.jsonl"))
  if not eval_records:
    raise ValueError(f"rm_from={config.rm_from!r} holds no comparisons_eval.jsonl (give the RM stage of the "
                     "built-in world, data.train=synthetic): its held-out comparisons score every round's RM")
  policy_dir, rm_dir = config.init_from, config.rm_from
  rounds, policy_dirs, rm_dirs, labelled = [], [], [], 0
  for r in range(int(config.rounds)):
    round_dir = os.path.join(workdir, f"round{r}")
    out = {"round": r}
    if r > 0:
      new_dir = os.path.join(round_dir, "rm")
      new, out["rm"] = update_reward_model(config, new_dir, policy_dir, rm_dir, old, eval_records, r)
      old, rm_dir, labelled = old + new, new_dir, labelled + len(new)
    p = config.ppo.copy_and_resolve_references()
    with p.unlocked():
      p.init_from, p.rm_from, p.ptx_from = policy_dir, rm_dir, config.ptx_from
      p.ref_from = config.init_from if r > 0 else ""
      p.seed = int(config.seed) + r
    policy_dir = os.path.join(round_dir, "ppo")
    out["ppo"] = ppo.run(p, policy_dir)
    rounds.append(out)
    policy_dirs.append(policy_dir)
    rm_dirs.append(rm_dir)
  return {"rounds": rounds, "policy_dirs": policy_dirs, "rm_dirs": rm_dirs, "labelled_comparisons": labelled}
