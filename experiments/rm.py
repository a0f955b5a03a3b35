"""InstructGPT step 2 — a reward model with the K-wise loss, on comparisons from any source.

  python -m rlhf_jax.main --config experiments/rm.py --workdir runs/rm \
      --config.init_from=runs/sft --config.data.train=prefs.jsonl
  python -m rlhf_jax.main --config experiments/rm.py --workdir runs/rm_oasst \
      --config.init_from=/models/SmolLM2-135M --config.data.train=oasst_rankings/rankings --config.data.train_split=validation
  python -m rlhf_jax.main --config experiments/rm.py --workdir runs/rm --config.init_from=runs/sft \
      --config.data.train=synthetic   # the built-in world: gold-labelled K-way samples of the SFT model

init_from: the SFT stage (or any stage/HF model directory); the RM is that model with a scalar head
read at the response's EOS. data.train: a JSONL of TRL preference pairs (`prompt`/`chosen`/`rejected`,
strings or message lists, or implicit-prompt dialogues) or our K-way `{"prompt","responses","ranks"}`,
a builder (`hh_rlhf/helpful-base`, `oasst_rankings/rankings`), or `synthetic`. All C(K,2) pairs of a
prompt are one batch element. Reported: held-out pairwise accuracy next to the "longer answer wins"
baseline, and the bias that makes demonstrations (the best-ranked responses) score mean 0.
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.model import lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.recipes import rm

PRESETS = {
    "default": {},
    "smoke": {"label.n_train_prompts": 96, "label.n_eval_prompts": 32, "label.k_min": 2, "label.k_max": 4,
              "data.limit": 64, "data.eval_limit": 16, "epochs": 1, "batch_size": 8, "loop.log_every": 4,
              "loop.ckpt_every": 8, "n_norm_demos": 64},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""
  c.dropout = 0.0
  c.data = data_lib.data_config()
  c.label = rm.label_config()   # data.train=synthetic only
  c.k_max = 9                   # response slots per prompt for file/builder data (more: a seeded subset)
  c.max_prompt_len = 64
  c.max_len = 96
  c.epochs = 2                  # InstructGPT: 1 epoch on ~33k prompts (more overfits)
  c.batch_size = 16             # prompts per batch; each carries up to k_max responses
  c.optim = rcfg.optim(lr=3e-4, warmup_steps=10, weight_decay=0.0, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=10, eval_every=20, ckpt_every=100)
  c.mesh = rcfg.mesh()
  c.n_norm_demos = 512
  c.lora = lora.config()        # rank > 0: LoRA adapters on the trunk, the head in full
  return c


def get_sweep():
  """Labeler noise: noise-free vs InstructGPT-like ~73% inter-labeler agreement (temperature 0.2)."""
  return [{"label.noise_temperature": t} for t in (0.0, 0.2)]


def train(config, workdir):
  return rm.run(rcfg.apply_preset(config, PRESETS), workdir)
