"""InstructGPT step 3 in the built-in world: `experiments/ppo.py` on the synthetic prompts.

  python -m rlhf_jax.main --config experiments/ppo_tiny.py --workdir runs/ppo --config.init_from=runs/sft \
      --config.rm_from=runs/rm [--config.ppo.ptx_coef=1.0] [--config.reward=gold]

The ptx data is the SFT stage's pretraining corpus; every `loop.eval_every` iterations the policy
is evaluated on held-out prompts: RM score, gold score (the gold labeler is used only here), KL to
SFT, and held-out pretraining loss. `reward=gold` is the oracle-reward ablation. Every key, preset
and the sweep are `ppo.py`'s.
"""
from pathlib import Path

from rlhf_jax.config import load_experiment

_PPO = load_experiment(str(Path(__file__).resolve().parent / "ppo.py"))
PRESETS, get_sweep, train = _PPO.PRESETS, _PPO.get_sweep, _PPO.train


def get_config():
  c = _PPO.get_config()
  c.init_from, c.rm_from = "runs/sft", "runs/rm"
  c.data.train = "synthetic"
  c.ptx_seq_len = 0            # the pretraining workdir's own sequence length
  c.max_prompt_len = 32        # the world's prompts are <= 27 tokens (64 would be half left padding)
  return c
