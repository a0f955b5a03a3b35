"""The GPT-1 task head: a linear layer W_y on the final hidden state at the extract token.

Params of a fine-tuned model: {"gpt": <gpt params>, "task_head": {"kernel": [D, C], "bias": [C]}}
with C = n_classes (classification, entailment, similarity) or 1 (multiple choice: one scalar
per option, softmax over the options).

Inputs are always [B, N, T] (N sequences per example, see `batches.py`); the N extract
features [B, N, D] are combined per task before/after the head:
  classification, entailment  N = 1:  h[:, 0] @ W               -> [B, C]
  similarity                  N = 2:  (h[:, 0] + h[:, 1]) @ W   -> [B, C]  (order-free)
  multiple choice             N = K:  (h @ W)[..., 0]           -> [B, K]  (padding options masked)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.gpt1 import transforms
from rlhf_jax.model import gpt
from rlhf_jax.model.layers import dropout

NEG = -1e9  # score of a padding option: exp underflows to 0 in float32, never NaN


def n_outputs(task: str, n_classes: int) -> int:
  return 1 if transforms.check_task(task) == "multiple_choice" else int(n_classes)


def init_head(d_model: int, n_out: int, rng, std: float = 0.02) -> dict:
  """N(0, std) kernel [D, n_out] and zero bias [n_out], float32 (GPT-1 used std 0.02 throughout)."""
  return {"kernel": std * jax.random.normal(rng, (d_model, n_out), jnp.float32),
          "bias": jnp.zeros((n_out,), jnp.float32)}


def init(gpt_params: dict, model_cfg, task: str, n_classes: int, rng) -> dict:
  """Fine-tuning params: the (pretrained) trunk plus a fresh task head."""
  cfg = gpt.GPTConfig.from_dict(model_cfg)
  return {"gpt": gpt_params, "task_head": init_head(cfg.d_model, n_outputs(task, n_classes), rng, cfg.init_std)}


def param_axes(model_cfg) -> dict:
  return {"gpt": gpt.param_axes(model_cfg), "task_head": {"kernel": ("embed", None), "bias": (None,)}}


def grow_vocab(gpt_params: dict, new_vocab_size: int, rng, std: float = 0.02) -> dict:
  """Appends N(0, std) rows to the token table `wte` [V, D] -> [new_vocab_size, D] (new tokens
  such as the task specials), and to an untied `lm_head` when there is one; every other
  parameter and the old rows are unchanged. (GPT-1 initialises new embeddings randomly;
  `gpt.resize_vocab` is the mean-row variant used for chat templates.)"""
  wte = gpt_params["wte"]
  extra = int(new_vocab_size) - wte.shape[0]
  if extra < 0:
    raise ValueError(f"gpt1: cannot shrink the vocabulary from {wte.shape[0]} to {new_vocab_size}")

  def grown(table, key):
    rows = std * jax.random.normal(key, (extra, table.shape[1]), jnp.float32)
    return jnp.concatenate([table, rows.astype(table.dtype)], axis=0)
  out = {**gpt_params, "wte": grown(wte, rng)}
  if "lm_head" in gpt_params:
    out["lm_head"] = grown(gpt_params["lm_head"], jax.random.fold_in(rng, 1))
  return out


def extract_features(hidden, index):
  """hidden [M, T, D], index int [M] -> [M, D]: the hidden state at each row's extract token."""
  return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def combine(task: str, head: dict, features, option_mask):
  """features [B, N, D] float, option_mask bool [B, N] -> float32 task logits (module docstring)."""
  f = features.astype(jnp.float32)
  w, b = head["kernel"].astype(jnp.float32), head["bias"].astype(jnp.float32)
  if task == "multiple_choice":
    scores = (f @ w + b)[..., 0]
    return jnp.where(option_mask, scores, NEG)
  pooled = f.sum(axis=1) if task == "similarity" else f[:, 0]
  return pooled @ w + b


def forward(params: dict, model_cfg, task: str, batch: dict, dropout_rng=None, head_dropout: float = 0.0):
  """One trunk pass over all N sequences of each example.

  batch: tokens, attention_mask int32 [B, N, T]; extract_index int32 [B, N]; option_mask bool [B, N].
  Returns (task logits float32 [B, C] or [B, K], hidden [B*N, T, D] for the auxiliary LM loss).
  """
  transforms.check_task(task)
  b, n, t = batch["tokens"].shape
  keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  hidden = gpt.hidden_states(params["gpt"], model_cfg, batch["tokens"].reshape(b * n, t),
                             batch["attention_mask"].reshape(b * n, t), dropout_rng=keys[0])
  feats = extract_features(hidden, batch["extract_index"].reshape(b * n)).reshape(b, n, -1)
  feats = dropout(feats, head_dropout, keys[1])  # GPT-1: dropout 0.1 on the classifier input
  return combine(task, params["task_head"], feats, batch["option_mask"]), hidden
