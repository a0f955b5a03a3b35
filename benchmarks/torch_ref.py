"""The PyTorch side of the comparisons: the same GPT-2 weights in transformers, and an AdamW
configured like ours (`rlhf_jax.train.state.make_optimizer`: decay on matrices except the
position table, global-norm clipping, constant LR in the benchmarks)."""
from __future__ import annotations

import os
import tempfile

import numpy as np


def torch_setup(threads: int | None = None):
  """torch with `threads` intra-op threads (default: the cores this process may use)."""
  import torch
  torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
  return torch


def hf_model(cfg, params, kind: str = "lm", extra_config: dict | None = None):
  """Our params as a transformers GPT-2 model (kind: lm -> GPT2LMHeadModel, cls -> GPT2ForSequenceClassification
  with a fresh 1-logit score head). Loaded through rlhf_jax.model.hf.save (float32)."""
  import transformers
  from rlhf_jax.model import hf
  with tempfile.TemporaryDirectory() as d:
    hf.save(cfg, params, d, extra_config=extra_config)
    if kind == "lm":
      return transformers.GPT2LMHeadModel.from_pretrained(d)
    return transformers.GPT2ForSequenceClassification.from_pretrained(d, num_labels=1)


def adamw(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
  """AdamW with our decay mask: >=2-D weights decay, except the position table (wpe)."""
  import torch
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (decay if p.ndim >= 2 and "wpe" not in name else no_decay).append(p)
  groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def masked_lm_loss(logits, targets, mask):
  """Mean next-token cross-entropy over mask==1 positions (our lm_loss); logits [B,T,V]."""
  import torch
  lp = torch.log_softmax(logits.float(), dim=-1)
  nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
  m = mask.float()
  return (nll * m).sum() / m.sum().clamp_min(1.0)


def to_torch(batch: dict):
  import torch
  return {k: torch.from_numpy(np.ascontiguousarray(v)).long() for k, v in batch.items()}
