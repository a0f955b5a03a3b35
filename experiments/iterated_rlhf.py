"""Iterated RLHF in the built-in world: rounds of (label the current policy, update the RM, continue PPO).

  python -m rlhf_jax.main --config experiments/iterated_rlhf.py --workdir runs/iterated \
      --config.init_from=runs/instructgpt/sft --config.rm_from=runs/instructgpt/rm \
      --config.ptx_from=runs/instructgpt/pretrain [--config.rounds=3]

Round 0 is PPO from SFT against `rm_from`; every later round gold-labels K samples per prompt of
the current policy, trains the RM further on them (with `replay` x as many earlier comparisons)
and continues PPO from the current policy against it, KL-penalised to SFT throughout
(`rlhf_jax/recipes/iterated.py`). `ppo` and `rm` are `experiments/ppo.py`'s and `rm.py`'s configs;
`ppo.loop.num_steps` is per round.
"""
from pathlib import Path

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.recipes import iterated

HERE = Path(__file__).resolve().parent
PRESETS = {
    "default": {},
    "smoke": {"rounds": 2, "ppo.data.n_train": 64, "ppo.n_eval_prompts": 0, "ppo.batch_size": 16,
              "ppo.loop.num_steps": 2, "ppo.loop.log_every": 1, "ppo.ppo.max_new_tokens": 12,
              "ppo.ppo.ppo_epochs": 1, "ppo.ppo.num_minibatches": 2, "rm.label.n_train_prompts": 32,
              "rm.label.k_min": 2, "rm.label.k_max": 3, "rm.batch_size": 8, "rm.n_norm_demos": 32},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""             # the SFT stage: the first policy and the frozen reference of every round
  c.rm_from = ""               # the first RM (an RM stage of the built-in world, with its comparisons)
  c.ptx_from = ""              # pretraining workdir / text (ptx term and held-out LM loss)
  c.rounds = 3
  c.replay = 1.0               # earlier comparisons mixed into each RM update, per new comparison
  c.ppo = load_experiment(str(HERE / "ppo.py")).get_config()
  c.ppo.data.train = "synthetic"
  c.ppo.ptx_seq_len = 0        # the pretraining workdir's own
  c.ppo.n_eval_prompts = 0     # no in-training monitor (evaluate the rounds' policies afterwards)
  c.ppo.loop.num_steps = 20
  c.rm = load_experiment(str(HERE / "rm.py")).get_config()
  c.rm.data.train = "synthetic"
  c.rm.label.n_train_prompts, c.rm.label.k_min, c.rm.label.k_max = 300, 4, 6
  c.rm.epochs = 1
  c.rm.optim.lr = 1e-4
  return c


def train(config, workdir):
  return iterated.run(rcfg.apply_preset(config, PRESETS), workdir)
