"""RLOO and GRPO: critic-free RL against the reward model, K samples per prompt, KL to SFT.

  python -m rlhf_jax.main --config experiments/rloo.py --workdir runs/rloo \
      --config.init_from=runs/instructgpt/sft --config.rm_from=runs/instructgpt/rm   # the built-in world
  python -m rlhf_jax.main --config experiments/rloo.py --workdir runs/grpo --config.algo=grpo \
      --config.init_from=runs/sft --config.rm_from=runs/rm --config.data.train=prompts.jsonl
  ... --config.reward=gold      # the oracle ablation: the gold labeler is the reward (built-in world)

Every iteration (one shared-loop step, one jitted program) samples pg.group_size responses for each
of batch_size prompts, scores them, and updates the policy with PPO's clipped surrogate on the
group advantages: RLOO's leave-one-out baseline with the KL penalty in the reward, or GRPO's
normalised advantages with the k3 KL term in the loss (`pg.kl_mode` overrides either). There is no
value model. init_from / ref_from / rm_from / ptx_from / data / reward mean what they mean in
`experiments/ppo.py`; the stage written is "rloo" or "grpo".
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.model import lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.recipes import rloo
from rlhf_jax.train import group_rl

PRESETS = {
    "default": {},
    "smoke": {"data.n_train": 64, "data.n_eval": 16, "data.limit": 64, "data.eval_limit": 16, "n_eval_prompts": 16,
              "batch_size": 8, "ptx_batch_size": 8, "loop.num_steps": 4, "loop.eval_every": 2, "loop.log_every": 1,
              "loop.ckpt_every": 2, "pg.max_new_tokens": 12, "pg.group_size": 2, "pg.ppo_epochs": 1,
              "ptx_limit": 200},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.algo = "rloo"              # rloo | grpo
  c.seed = 0
  c.init_from = ""             # policy + frozen reference
  c.ref_from = ""              # another frozen reference; "" = init_from
  c.rm_from = ""               # the reward model (and the monitor's RM score)
  c.ptx_from = ""              # pretraining text for the ptx term and the alignment-tax metric
  c.ptx_seq_len = 128
  c.ptx_limit = 0
  c.reward = "rm"              # rm | gold (the oracle ablation; built-in world only)
  c.data = data_lib.data_config(n_train=2000, n_eval=128, seed=1)
  c.n_eval_prompts = 128
  c.max_prompt_len = 64
  c.batch_size = 16            # prompts per iteration, each sampled pg.group_size times
  c.ptx_batch_size = 32
  c.pg = group_rl.default_config()
  c.pg.kl_mode = ""            # "" = the algorithm's: rloo -> reward, grpo -> k3
  c.pg.group_size = 4
  c.optim = rcfg.optim(lr=3e-5, warmup_steps=20, weight_decay=0.0, schedule="linear", grad_clip=1.0)
  c.loop = rcfg.loop(num_steps=100, log_every=5, eval_every=10, ckpt_every=25)
  c.mesh = rcfg.mesh()
  c.lora = lora.config()       # rank > 0: LoRA adapters on the policy; the reference is its base
  return c


def get_sweep():
  """RLOO vs GRPO, and the KL coefficient."""
  return [{"algo": a} for a in ("rloo", "grpo")] + [{"pg.kl_coef": b} for b in (0.0, 0.02, 0.2)]


def train(config, workdir):
  return rloo.run(rcfg.apply_preset(config, PRESETS), workdir)
