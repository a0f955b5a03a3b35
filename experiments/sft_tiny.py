"""InstructGPT step 1 in the built-in world: `experiments/sft.py` with a pretraining workdir to start from.

  python -m rlhf_jax.main --config experiments/sft_tiny.py --workdir runs/sft --config.init_from=runs/pretrain

Demonstrations: the synthetic world's (`data.n_train`, `data.filler_rate` for imperfect ones).
Every key, preset and the sweep are `sft.py`'s.
"""
from pathlib import Path

from rlhf_jax.config import load_experiment

_SFT = load_experiment(str(Path(__file__).resolve().parent / "sft.py"))
PRESETS, get_sweep, train = _SFT.PRESETS, _SFT.get_sweep, _SFT.train


def get_config():
  c = _SFT.get_config()
  c.init_from = "runs/pretrain"
  c.data.train = "synthetic"
  # Sized to the world: its longest demonstration (a rambling one) is 66 tokens with the system
  # prompt and EOS, so 96 would be a third padding (the pipeline reports any truncation).
  c.max_len = 72
  return c
