"""InstructGPT step 1 — SFT on demonstrations from any source, starting from any model.

  python -m rlhf_jax.main --config experiments/sft.py --workdir runs/sft \
      --config.init_from=/models/SmolLM2-135M --config.data.train=demos.jsonl
  python -m rlhf_jax.main --config experiments/sft.py --workdir runs/sft_hh \
      --config.init_from=/models/gpt2 --config.data.train=hh_rlhf/helpful-base --config.data.train_split=test
  python -m rlhf_jax.main --config experiments/sft.py --workdir runs/sft --config.init_from=runs/pretrain  # built-in world

init_from: a pretraining/SFT stage workdir or a Hugging Face model directory (config.json +
safetensors + tokenizer files; its chat template renders the dialogues; a tokenizer without one
gets our role tokens, and the embedding grows by those rows). data.train: `synthetic`, a JSONL
file in any of TRL's formats (messages, prompt/completion, preference pairs: the chosen reply,
K-way rankings: the best reply), or a builder name; data.eval the same, else a hash split of the
prompts. The loss covers the assistant tokens only. InstructGPT trained 16 epochs on ~13k
demonstrations; `epochs` is swept 1 / 4 / 16.
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.model import lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.recipes import sft

PRESETS = {
    "default": {},
    # Seconds, whatever the data source: what the tests run.
    "smoke": {"data.n_train": 256, "data.n_eval": 64, "data.limit": 64, "data.eval_limit": 16, "epochs": 1,
              "batch_size": 16, "loop.log_every": 4, "loop.ckpt_every": 8},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""          # stage workdir or HF model directory (required)
  c.dropout = 0.0           # overrides the starting model's dropout for this stage
  c.data = data_lib.data_config()
  c.max_len = 96            # prompt + response tokens; prompts lose their oldest turns first
  c.history_loss = False    # also train on earlier assistant turns kept in the prompt
  c.epochs = 4
  c.batch_size = 32
  c.optim = rcfg.optim(lr=5e-4, warmup_steps=20, weight_decay=0.0, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=20, ckpt_every=100)  # -1: epochs x records / batch
  c.mesh = rcfg.mesh()
  c.lora = lora.config()    # rank > 0: train LoRA adapters only (merged into the stage's weights)
  return c


def get_sweep():
  return [{"epochs": e} for e in (1, 4, 16)]


def train(config, workdir):
  return sft.run(rcfg.apply_preset(config, PRESETS), workdir)
