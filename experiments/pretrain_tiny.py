"""GPT pretraining: next-token prediction on the synthetic world's web-text-like corpus.

  python -m rlhf_jax.main --config experiments/pretrain_tiny.py --workdir runs/pretrain
  python -m rlhf_jax.main --config experiments/pretrain_tiny.py --workdir runs/pretrain --config.preset=smoke
  python -m rlhf_jax.main --config experiments/pretrain_tiny.py --workdir runs/sweep --sweep

Shows: the loss of a tiny GPT falls well below the unigram entropy of the corpus.
Swap `data.source=text data.path=../shared/data/tinyshakespeare/input.txt` for real text.
"""
import ml_collections as mlc
import numpy as np

from rlhf_jax import config as rcfg
from rlhf_jax.data import lm_data
from rlhf_jax.model import gpt
from rlhf_jax.train import loop, stages, supervised

PRESETS = {
    "default": {},
    # ~1 minute on 2 CPU cores: what the tests run.
    "smoke": {"model.preset": "nano", "data.n_docs": 3000, "batch_size": 16, "loop.num_steps": 30,
              "loop.ckpt_every": 10, "loop.log_every": 10, "data.seq_len": 64},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.model = rcfg.model("tiny", dropout=0.0, vocab_size=512)
  # fewshot_fraction: share of synthetic documents that are lists of correctly solved same-family
  # tasks (synthetic.pretraining_corpus); 0 = the plain misaligned corpus the InstructGPT job uses.
  c.data = mlc.ConfigDict(dict(source="synthetic", n_docs=30000, seed=0, path="", val_fraction=0.05,
                               vocab_size=512, tokenizer_dir="", seq_len=128, fewshot_fraction=0.0))
  c.batch_size = 32
  c.optim = rcfg.optim(lr=2e-3, total_steps=600, warmup_steps=50, weight_decay=0.1)
  c.loop = rcfg.loop(num_steps=600, log_every=50, ckpt_every=200)
  c.mesh = rcfg.mesh()
  c.eval_batches = 8
  return c


def get_sweep():
  """Model size x learning rate; each point runs in workdir/sweep/<overrides>."""
  return [{"model.preset": p, "optim.lr": lr} for p in ("nano", "tiny") for lr in (1e-3, 3e-3)]


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  model_cfg = rcfg.model_config(config.model)
  if model_cfg.max_len < config.data.seq_len:
    raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model max_len={model_cfg.max_len}")
  tok, train_rows, val_rows = lm_data.prepare_lm_data(config.data, config.data.seq_len, workdir)
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}")

  stages.write_stage(workdir, "pretrain", model_cfg, data=config.data.to_dict())
  state, last, _ = supervised.fit_lm(config, workdir, model_cfg, train_rows, val_rows,
                                     eval_batches=config.eval_batches)
  history = loop.read_metrics(workdir)
  first = next(h["pretrain/loss"] for h in history if "pretrain/loss" in h)
  result = {"first_logged_train_loss": first, "final_train_loss": last.get("loss"),
            "final_eval_loss": last.get("eval/loss"), "final_eval_accuracy": last.get("eval/accuracy"),
            "unigram_entropy": unigram_entropy(train_rows), "num_params": gpt.num_params(state["params"])}
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
  return result


def parse_sizes(text: str, min_count: int = 1, why: str = "") -> list[tuple[int, int, int]]:
  """'2x64x4,4x128x4' -> [(n_layer, d_model, n_head), ...]; one ValueError for a malformed list."""
  try:
    sizes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) < min_count or any(len(s) != 3 for s in sizes):
    raise ValueError(f"config.sizes={text!r}: need >= {min_count} comma-separated 'n_layer x d_model x n_head' "
                     f"entries{why}")
  return sizes


def member_config(size, steps: int, *, seed: int, seq_len: int, vocab_size: int, batch_size: int, lr: float,
                  warmup_steps: int, data: dict, n_logs: int, progress: bool = False):
  """This experiment's config for one member of a model family (in_context.py, scaling_law.py).

  size: (n_layer, d_model, n_head) with context seq_len; `steps` steps of warmup + cosine at `lr`
  (warmup at most a fifth of the run); `n_logs` log lines; no intermediate checkpoints; `data`
  updates the data section (seq_len is set here).
  """
  n_layer, d_model, n_head = size
  c = get_config()
  c.seed = seed
  c.model = rcfg.model("nano", n_layer=n_layer, d_model=d_model, n_head=n_head, head_dim=0, d_ff=0,
                       max_len=seq_len, dropout=0.0, vocab_size=vocab_size)
  c.data.update(dict(data, seq_len=seq_len))
  c.batch_size = batch_size
  c.optim = rcfg.optim(lr=lr, total_steps=steps, warmup_steps=min(warmup_steps, steps // 5), weight_decay=0.1)
  c.loop = rcfg.loop(num_steps=steps, log_every=max(1, steps // n_logs), ckpt_every=0, progress=progress)
  return c


def unigram_entropy(rows) -> float:
  counts = np.bincount(rows[:, 1:].ravel())
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
