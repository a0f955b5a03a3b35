"""InstructGPT step 3 — PPO / PPO-ptx against a reward model, on prompts from any source.

  python -m rlhf_jax.main --config experiments/ppo.py --workdir runs/ppo \
      --config.init_from=runs/sft --config.rm_from=runs/rm --config.data.train=prompts.jsonl \
      --config.ptx_from=../shared/data/tinyshakespeare/input.txt --config.ppo.ptx_coef=1.0
  python -m rlhf_jax.main --config experiments/ppo.py --workdir runs/ppo --config.init_from=runs/sft \
      --config.rm_from=runs/rm   # the built-in world (data.train=synthetic), evaluated by the gold labeler

Policy and frozen reference start from SFT (a stage workdir or an HF directory); the value function
starts from the RM (a stage workdir or an HF sequence-classification directory); the policy and
the RM must share a tokenizer. Each iteration (one shared-loop step, one jitted program): sample →
score → reference log-probs and values → KL-penalised rewards → GAE → PPO epochs over shuffled
minibatches with the ptx term on pretraining rows → adaptive-KL update. data.train: prompt-only
JSONL (`prompt` string or message list), any preference/demonstration file (its prompts), a builder,
or `synthetic`. ptx_from: a text file, a JSONL of {"text"}, or a pretraining workdir ("" = the SFT
stage's own pretraining workdir, when there is one).
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.model import lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.recipes import ppo
from rlhf_jax.train import ppo as ppo_lib

PRESETS = {
    "default": {},
    "smoke": {"data.n_train": 64, "data.n_eval": 16, "data.limit": 64, "data.eval_limit": 16, "n_eval_prompts": 16,
              "batch_size": 16, "ptx_batch_size": 8, "loop.num_steps": 2, "loop.eval_every": 2, "loop.log_every": 1,
              "loop.ckpt_every": 2, "ppo.max_new_tokens": 12, "ppo.ppo_epochs": 2, "ppo.num_minibatches": 2,
              "ptx_limit": 200},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""             # policy + frozen reference
  c.ref_from = ""              # another frozen reference (e.g. SFT when continuing a PPO stage); "" = init_from
  c.rm_from = ""               # reward model + value init
  c.ptx_from = ""              # pretraining text for PPO-ptx and the alignment-tax metric
  c.ptx_seq_len = 128          # rows of ptx_seq_len + 1 tokens from a text/JSONL file (0: a workdir's own)
  c.ptx_limit = 0              # cap on ptx documents (0 = all)
  # "rm": InstructGPT. "gold": the gold labeler itself is the training reward -- an oracle ablation
  # (built-in world only). The value function starts from the RM either way.
  c.reward = "rm"
  c.data = data_lib.data_config(n_train=2000, n_eval=128, seed=1)
  c.n_eval_prompts = 128
  c.max_prompt_len = 64
  c.batch_size = 64            # prompts (rollouts) per PPO iteration
  c.ptx_batch_size = 32        # pretraining rows per iteration (split over the minibatches)
  c.ppo = ppo_lib.default_config()
  c.ppo.kl_target, c.ppo.init_kl_beta = 0.0, 0.05   # fixed beta by default; kl_target > 0: adaptive
  # Schedules count optimizer updates: iterations x ppo_epochs x num_minibatches.
  c.optim = rcfg.optim(lr=3e-5, warmup_steps=20, weight_decay=0.0, schedule="linear", grad_clip=1.0)
  c.value_optim = rcfg.optim(lr=1e-4, warmup_steps=20, weight_decay=0.0, schedule="linear", grad_clip=1.0)
  c.loop = rcfg.loop(num_steps=100, log_every=5, eval_every=10, ckpt_every=25)
  c.mesh = rcfg.mesh()
  # rank > 0: LoRA adapters on the policy and the value model (+ its head); the reference is the
  # policy's base and the scorer the value model's base (adapters off), not second copies.
  c.lora = lora.config()
  return c


def get_sweep():
  """PPO vs PPO-ptx, and the KL coefficient (too little KL over-optimises the RM)."""
  return ([{"ppo.ptx_coef": g} for g in (0.0, 1.0)]
          + [{"ppo.init_kl_beta": b} for b in (0.0, 0.02, 0.1, 0.5)])


def train(config, workdir):
  return ppo.run(rcfg.apply_preset(config, PRESETS), workdir)
