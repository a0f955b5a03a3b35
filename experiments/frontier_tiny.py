"""The frontier in the built-in world: which method buys the most gold score per nat of KL, at equal compute?

  python -m rlhf_jax.main --config experiments/frontier_tiny.py --workdir runs/frontier \
      --config.from_workdir=runs/instructgpt      # reuse the main job's pretrain/ sft/ rm/ stages
  python -m rlhf_jax.main --config experiments/frontier_tiny.py --workdir runs/frontier   # runs them first
  python -m rlhf_jax.main --config experiments/frontier_tiny.py --workdir runs/frontier_smoke --config.preset=smoke

One SFT model, one RM and one set of gold-labelled K-way comparisons (the main job's); every method
gets the same policy-compute budget (`budget.policy_tokens`, see `rlhf_jax/recipes/frontier.py`) and
is evaluated at `budget.n_checkpoints` checkpoints on the same held-out prompts (independent sampling
keys per model): gold score with a 95% bootstrap CI over prompts, KL to SFT, RM score, held-out
pretraining loss. Methods: PPO, PPO-ptx, DPO (pairwise on the rankings cut into pairs, K-wise,
Plackett-Luce, IPO), RLOO, GRPO, iterated PPO (rounds of gold-labelling the current policy and
updating the RM) and best-of-n of SFT by the RM (n in `best_of_n`, KL = log n - (n-1)/n).
Outputs in the workdir: frontier.png (gold vs KL, one curve per method), results.md, summary.json.
"""
import os
from pathlib import Path

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.recipes import chain, frontier

HERE = Path(__file__).resolve().parent
# name -> (experiment file, kind), and each method's own settings (flattened overrides of that file's config).
METHODS = {"ppo": (HERE / "ppo.py", "ppo"), "ppo_ptx": (HERE / "ppo.py", "ppo"),
           "dpo_pairwise": (HERE / "dpo.py", "dpo"), "dpo_kwise": (HERE / "dpo.py", "dpo"),
           "dpo_plackett_luce": (HERE / "dpo.py", "dpo"), "dpo_ipo": (HERE / "dpo.py", "dpo"),
           "rloo": (HERE / "rloo.py", "group"), "grpo": (HERE / "rloo.py", "group"),
           "iterated_ppo": (HERE / "iterated_rlhf.py", "iterated")}
_RL = {"max_prompt_len": 32, "batch_size": 64, "ptx_batch_size": 16, "loop.log_every": 10}
_DPO = {"max_len": 64, "k_max": 9, "batch_size": 16, "ref_batch_size": 64, "loop.log_every": 10}
OVERRIDES = {
    "ppo": {**_RL, "ppo.ppo_epochs": 2},
    "ppo_ptx": {**_RL, "ppo.ppo_epochs": 2, "ppo.ptx_coef": 1.0},
    "dpo_pairwise": {**_DPO, "dpo.kind": "pairs", "dpo.expand_pairs": True},
    "dpo_kwise": {**_DPO, "dpo.kind": "pairs"},
    "dpo_plackett_luce": {**_DPO, "dpo.kind": "plackett_luce"},
    "dpo_ipo": {**_DPO, "dpo.kind": "ipo"},
    # 16 prompts x 4 samples = PPO's 64 rollouts; 4 minibatches of 16 rows, as PPO's.
    "rloo": {**_RL, "batch_size": 16, "algo": "rloo", "pg.group_size": 4, "pg.num_minibatches": 4},
    "grpo": {**_RL, "batch_size": 16, "algo": "grpo", "pg.group_size": 4, "pg.num_minibatches": 4},
    "iterated_ppo": {"rounds": 2, "ppo.max_prompt_len": 32, "ppo.batch_size": 64, "ppo.ppo.ppo_epochs": 2,
                     "ppo.loop.log_every": 10, "rm.label.n_train_prompts": 300},
}
PRESETS = {
    "default": {},
    # Structure only (tests/test_instructgpt_smoke.py): one method of each kind (PPO-ptx, GRPO, iterated PPO;
    # K-wise and pairwise DPO for their comparison) and best-of-n, 1-2 steps each (1 per iterated round), few
    # prompts. The others are the same code with other settings (tests/test_frontier.py sizes every method).
    "smoke": {"methods": "ppo_ptx,dpo_pairwise,dpo_kwise,grpo,iterated_ppo,best_of_n",
              "budget.policy_tokens": 1500, "budget.n_checkpoints": 2, "best_of_n": (1, 2, 4),
              "eval.n_prompts": 16, "eval.n_val_rows": 8, "eval.max_new_tokens": 12, "eval.n_boot": 100,
              **{f"stages.{m}.batch_size": 8 for m in METHODS if m != "iterated_ppo"},
              **{f"stages.{m}.ppo.max_new_tokens": 12 for m in ("ppo", "ppo_ptx")},
              **{f"stages.{m}.pg.max_new_tokens": 12 for m in ("rloo", "grpo")},
              **{f"stages.{m}.pg.group_size": 2 for m in ("rloo", "grpo")},
              **{f"stages.{m}.data.limit": 32 for m in METHODS if m.startswith("dpo")},
              **{f"stages.{m}.data.eval_limit": 8 for m in METHODS if m.startswith("dpo")},
              "stages.ppo_ptx.ptx_batch_size": 4, "stages.ppo_ptx.ptx_limit": 200,
              "stages.iterated_ppo.ppo.batch_size": 8, "stages.iterated_ppo.ppo.ppo.max_new_tokens": 12,
              "stages.iterated_ppo.rm.label.n_train_prompts": 16, "stages.iterated_ppo.rm.label.k_min": 2,
              "stages.iterated_ppo.rm.label.k_max": 3, "stages.iterated_ppo.rm.batch_size": 8,
              "stages.iterated_ppo.rm.n_norm_demos": 16},
}


def _stage_config(name):
  file, _ = METHODS[name]
  c = load_experiment(str(file)).get_config()
  c.update_from_flattened_dict(OVERRIDES[name])
  return c


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.from_workdir = ""          # a main-job workdir (experiments/instructgpt_tiny.py) with pretrain/ sft/ rm/
  c.methods = ",".join(list(METHODS) + ["best_of_n"])
  c.stages = mlc.ConfigDict({name: _stage_config(name) for name in METHODS})
  # 50 PPO iterations of 64 prompts x (32 + 24) tokens x 2 epochs.
  c.budget = mlc.ConfigDict(dict(policy_tokens=358_400, n_checkpoints=3))
  c.best_of_n = (1, 2, 4, 8, 16)
  c.eval = mlc.ConfigDict(dict(n_prompts=200, prompt_seed=7, temperature=0.7, max_prompt_len=32, max_new_tokens=24,
                               n_val_rows=64, n_boot=1000))
  c.kl_floor = 0.05            # gold per nat is reported for points at least this far from SFT
  return c


def base_stages(config, workdir: str) -> str:
  """The workdir holding pretrain/ sft/ rm/: config.from_workdir, else the main job's stages run here."""
  if config.from_workdir:
    for name in ("pretrain", "sft", "rm"):
      if not os.path.isfile(os.path.join(config.from_workdir, name, "stage.json")):
        raise ValueError(f"from_workdir={config.from_workdir!r} has no finished {name}/ stage (run "
                         "experiments/instructgpt_tiny.py there first, or leave from_workdir empty)")
    return config.from_workdir
  main = load_experiment(str(HERE / "instructgpt_tiny.py"))
  mc = main.get_config()
  mc.seed = config.seed
  mc.preset = "smoke" if config.preset == "smoke" else "default"
  mc = rcfg.apply_preset(mc, main.PRESETS)
  main._wire(mc, workdir)
  results = {}
  for name in ("pretrain", "sft", "rm"):
    chain.run_stage(name, HERE / main.STAGE_FILES[name], mc.stages[name], workdir, results)
  return workdir


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  summary = frontier.run(config, workdir, base_stages(config, workdir), METHODS)
  return {"most_gold_per_nat": summary["most_gold_per_nat"], "highest_gold": summary["highest_gold"],
          "wall_seconds": summary["wall_seconds"]}
