"""InstructGPT step 2 in the built-in world: `experiments/rm.py` on gold-labelled K-way samples.

  python -m rlhf_jax.main --config experiments/rm_tiny.py --workdir runs/rm --config.init_from=runs/sft

For each prompt, K ~ U[k_min, k_max] responses (InstructGPT: K = 4..9) are sampled from the SFT
model and, like InstructGPT's comparison data, from a second model (a `label.pretrained_fraction`
of them from the pretrained model), and ranked by the gold labeler (optionally noisy, like human
labelers). Every key, preset and the sweep are `rm.py`'s.
"""
from pathlib import Path

from rlhf_jax.config import load_experiment

_RM = load_experiment(str(Path(__file__).resolve().parent / "rm.py"))
PRESETS, get_sweep, train = _RM.PRESETS, _RM.get_sweep, _RM.train


def get_config():
  c = _RM.get_config()
  c.init_from = "runs/sft"
  c.data.train = "synthetic"
  # Sized to the world: prompts are <= 27 tokens and samples <= label.max_new_tokens (24) + EOS, so
  # rows fit in 56 (the 64 / 96 defaults are mostly padding: the RM step cost scales with them).
  c.max_prompt_len, c.max_len = 32, 56
  return c
