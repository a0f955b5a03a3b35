"""DPO's model side: summed response log-probs of comparison batches, the `loss_fn` for `fit`, and
the reference log-probs, computed once with the frozen starting model before training.

Token alignment (comparison examples, `pipeline.encode_comparison`): slot k holds
``tokens[k, :L] = prompt ids (ending with the generation prompt) + response ids + EOS`` with
``response_start[k] = len(prompt ids)`` and ``reward_index[k] = L - 1`` (the EOS, or the last kept
token of a cut response). ``logits[t]`` predicts ``tokens[t + 1]``, so a response's log-prob is

    sum_{p = response_start}^{reward_index} log softmax(logits[p - 1])[tokens[p]],

every response token and the closing EOS given everything before them. Prompt tokens and padding
count nothing; an invalid slot (response_start = reward_index = 0) sums to exactly 0.

Reference log-probs: `reference_logps` encodes every record exactly as the comparison pipeline will
(same max_len, k_max and record index, hence the same slots), scores it with the starting params
in jitted fixed-shape batches, and returns the records with a per-slot "ref_logps" list, which the
pipeline carries into each batch as ``ref_logps`` [B, K]. No second model sits in memory while
training. (Every host scores all records itself: simple, and cheap next to training.)
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import batching, pipeline
from rlhf_jax.losses.dpo import dpo_loss
from rlhf_jax.losses.lm import token_logprobs
from rlhf_jax.model import gpt

_WHERE = "rlhf_jax/train/dpo.py"
SLOT_KEYS = ("tokens", "attention_mask", "response_start", "reward_index")


def response_logps(params, cfg, batch: Mapping[str, jax.Array], dropout_rng=None) -> jax.Array:
  """Summed log-prob of each slot's response tokens (see the module docstring), float32 [B, K].

  batch: tokens, attention_mask int32 [B, K, T]; response_start, reward_index int32 [B, K].
  All K slots of an element go through the model as one [B*K, T] batch.
  """
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape((b * k,) + x.shape[2:])
  tokens = flat(batch["tokens"])
  logits = gpt.logits(params, cfg, tokens, flat(batch["attention_mask"]), dropout_rng=dropout_rng)
  lp = token_logprobs(logits[:, :-1], tokens[:, 1:])                     # [B*K, T-1]: log p(tokens[p])
  pos = jnp.arange(1, t)[None, :]                                         # p, the scored position
  start, end = flat(batch["response_start"])[:, None], flat(batch["reward_index"])[:, None]
  scored = (pos >= start) & (pos <= end) & (start > 0)
  return jnp.sum(jnp.where(scored, lp, 0.0), axis=-1).reshape(b, k)


def dpo_loss_fn(cfg, beta: float, kind: str):
  """loss_fn(params, batch, rng) -> (loss, metrics) for `supervised.fit`: `losses.dpo.dpo_loss` on
  the policy's `response_logps` against the batch's ``ref_logps`` (comparison batches whose
  records went through `reference_logps`)."""
  def loss_fn(params, batch, rng):
    if "ref_logps" not in batch:
      raise ValueError(f"{_WHERE}: the batch has no 'ref_logps'; build it from records returned by "
                       "train.dpo.reference_logps")
    policy = response_logps(params, cfg, batch, rng)
    return dpo_loss(policy, batch["ref_logps"], batch["ranks"], batch["valid"], beta, kind)
  return loss_fn


@functools.partial(jax.jit, static_argnames=("cfg",))
def _slot_logps_jit(params, cfg, batch):
  return response_logps(params, cfg, batch)


def slot_logps(params, cfg, tok, records: Sequence[Mapping[str, Any]], max_len: int, k_max: int,
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Per-slot summed response log-probs of every record under `params` (no dropout).

  Record i is encoded as `pipeline.encode_comparison(tok, record, max_len, k_max, index=i)`.
  Returns (logps float32 [N, k_max], encoded bool [N]); a record the pipeline would skip (or
  reject: the pipeline raises for it later) is not encoded and gets zeros.
  """
  rows, encoded = [], np.zeros(len(records), bool)
  for i, record in enumerate(records):
    try:
      ex = pipeline.encode_comparison(tok, record, max_len, k_max, index=i)
    except ValueError:
      continue
    rows.append({key: ex[key] for key in SLOT_KEYS})
    encoded[i] = True
  out = np.zeros((len(records), k_max), np.float32)
  if rows:
    padded = batching.pad_to_batches(rows, int(batch_size))
    scores = [np.asarray(jax.device_get(_slot_logps_jit(params, cfg, b))) for b in padded.batches]
    out[encoded] = padded.unpad(scores)
  return out, encoded


def reference_logps(params, cfg, tok, records: Sequence[Mapping[str, Any]], max_len: int, k_max: int,
                    batch_size: int = 16) -> list[dict]:
  """`records` (same order, so record indices, hence slots, are unchanged) each with a "ref_logps"
  list of k_max floats: the slot log-probs of the frozen reference `params` (`slot_logps`)."""
  logps, _ = slot_logps(params, cfg, tok, records, max_len, k_max, batch_size)
  return [{**record, "ref_logps": logps[i].tolist()} for i, record in enumerate(records)]


def heldout_pair_accuracy(policy: np.ndarray, records: Sequence[Mapping[str, Any]], tok, max_len: int,
                          k_max: int, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
  """Implicit-reward pairwise accuracy pooled over held-out pairs, with a 95% bootstrap CI over prompts.

  policy: float32 [N, k_max], `slot_logps` of the trained policy on `records`, which carry
  "ref_logps" (from `reference_logps`). A pair counts as correct when h_w > h_l (h = policy - ref);
  prompts are resampled with replacement (pairs of one prompt are not independent).
  """
  correct, total = [], []
  for i, record in enumerate(records):
    try:
      ex = pipeline.encode_comparison(tok, record, max_len, k_max, index=i)
    except ValueError:
      continue
    h = np.where(ex["valid"], policy[i] - ex["ref_logps"], 0.0)
    pairs = ex["valid"][:, None] & ex["valid"][None, :] & (ex["ranks"][:, None] < ex["ranks"][None, :])
    correct.append(int(np.sum(pairs & (h[:, None] > h[None, :]))))
    total.append(int(np.sum(pairs)))
  c, n = np.asarray(correct, float), np.asarray(total, float)
  if not n.sum():
    return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "num_pairs": 0,
            "num_prompts": 0}
  idx = np.random.default_rng(seed).integers(0, len(n), (int(n_boot), len(n)))
  boot = c[idx].sum(1) / np.maximum(n[idx].sum(1), 1.0)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return {"accuracy": float(c.sum() / n.sum()), "ci_low": float(lo), "ci_high": float(hi),
          "num_pairs": int(n.sum()), "num_prompts": int(np.sum(n > 0))}
