"""Direct preference optimisation on K-way rankings (Rafailov et al. 2023), with IPO and Plackett-Luce.

A policy's implicit reward for response y to prompt x is ``beta * h`` with
``h = log pi(y|x) - log pi_ref(y|x)``, both summed over the response tokens. Three kinds:

  pairs          per prompt, the mean over strict pairs (w ranked above l) of
                 ``-log sigmoid(beta * (h_w - h_l))``. K = 2 is textbook DPO; for K > 2 all C(K,2)
                 pairs of a prompt share one element, the DPO analogue of InstructGPT's K-wise RM
                 loss (it is ``ranking.kwise_ranking_loss`` on the rewards ``beta * h``).
  ipo            the same pairs with the squared loss ``(h_w - h_l - 1 / (2 beta))**2`` (Azar et
                 al. 2023), which regresses the log-ratio gap to a target instead of pushing it up.
  plackett_luce  the listwise likelihood of the whole ranking (the DPO paper's appendix A.3): over
                 the n valid responses in rank order, ``-sum_{i<n-1} [beta h_(i) -
                 logsumexp_{j>=i} beta h_(j)]``, unnormalised (a prompt with more responses
                 weighs more). With n = 2 it equals DPO.

Prompts are then averaged: over prompts with a strict pair (pairs, ipo) or with >= 2 valid
responses (plackett_luce).

Conventions, as in ``ranking.py``: ``ranks`` is 0 for the best response, larger is worse; equal
ranks form no pair; entries with ``valid == False`` (ragged K) are inert - h is zeroed there before
any arithmetic, so even NaN/inf there gives a finite loss and exactly 0 gradient; a batch in which
no prompt contributes gives loss 0, not NaN.

Ties under Plackett-Luce: the listwise likelihood needs a total order, so tied valid responses are
ordered by slot index (the earlier slot is taken as better). That is a preference the data does not
state; the metrics count such pairs as ``tied_pairs`` so that a caller can refuse or warn (the DPO
recipe warns). Under ``pairs`` and ``ipo`` ties simply form no pair.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.ranking import pair_matrix

Metrics = Dict[str, jax.Array]
KINDS = ("pairs", "ipo", "plackett_luce")
_WHERE = "rlhf_jax/losses/dpo.py:dpo_loss"
_NEG = -1e30  # stands in for -inf in the listwise logsumexp (exp underflows to exactly 0)


def _check(policy_logps, ref_logps, ranks, valid, beta, kind) -> float:
  if kind not in KINDS:
    raise ValueError(f"{_WHERE}: kind must be one of {KINDS}, got {kind!r}")
  if policy_logps.ndim != 2:
    raise ValueError(f"{_WHERE}: policy_logps must be [B,K], got {tuple(policy_logps.shape)}")
  for name, arr in (("ref_logps", ref_logps), ("ranks", ranks), ("valid", valid)):
    if tuple(arr.shape) != tuple(policy_logps.shape):
      raise ValueError(f"{_WHERE}: {name} shape {tuple(arr.shape)} != policy_logps shape "
                       f"{tuple(policy_logps.shape)}")
  for name, arr in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"{_WHERE}: {name} must be floating point, got {arr.dtype}")
  if not jnp.issubdtype(ranks.dtype, jnp.integer):
    raise ValueError(f"{_WHERE}: ranks must be integer, got {ranks.dtype}")
  if valid.dtype != jnp.bool_:
    raise ValueError(f"{_WHERE}: valid must be bool, got {valid.dtype}")
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
    raise ValueError(f"{_WHERE}: beta must be a positive Python number (a static hyper-parameter), got {beta!r}")
  return float(beta)


def _plackett_luce_nll(s: jax.Array, ranks: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-prompt listwise NLL, float32 [B], of scores s [B,K] (s zeroed where invalid).

  ``before[b, i, j]``: i precedes j in the total order (rank, then slot index). When i is picked,
  the pool is i and every valid j after it; the last valid response's term (pool of one, exactly
  0) is left out, which is the ``i < n - 1`` of the formula.
  """
  k = s.shape[1]
  idx = jnp.arange(k)
  r_i, r_j = ranks[:, :, None], ranks[:, None, :]
  before = (r_i < r_j) | ((r_i == r_j) & (idx[:, None] < idx[None, :]))          # [B,K,K]
  both = valid[:, :, None] & valid[:, None, :]
  pool = (before | jnp.eye(k, dtype=bool)) & both
  lse = jax.nn.logsumexp(jnp.where(pool, s[:, None, :], _NEG), axis=-1)          # [B,K]
  not_last = valid & jnp.any(before & both, axis=-1)
  return -jnp.sum(jnp.where(not_last, s - lse, 0.0), axis=-1)


def dpo_loss(policy_logps: jax.Array, ref_logps: jax.Array, ranks: jax.Array, valid: jax.Array,
             beta: float, kind: str = "pairs") -> Tuple[jax.Array, Metrics]:
  """DPO / IPO / Plackett-Luce DPO loss on K responses per prompt (see the module docstring).

  Args:
    policy_logps: float [B, K], summed response log-probs under the policy (math in float32).
    ref_logps: float [B, K], the same under the frozen reference (no gradient flows into it).
    ranks: int [B, K], 0 = best; equal ranks form no pair.
    valid: bool [B, K], False for padding responses (ragged K).
    beta: positive Python float, the KL strength (static).
    kind: "pairs" | "ipo" | "plackett_luce" (static).

  Returns:
    (loss, metrics). loss: float32 scalar. metrics (float32 scalars, no gradient):
      loss; accuracy (fraction of strict pairs whose implicit rewards beta*h order them correctly,
      pooled over pairs; equal rewards count as wrong); prompt_mean_accuracy (per prompt, averaged
      over prompts with pairs); margin (mean beta*(h_w - h_l), pooled over pairs); num_pairs;
      num_prompts (prompts that enter the loss's mean); tied_pairs (valid pairs with equal ranks);
      logratio_mean (mean h over valid responses: how far the policy moved on them).
  """
  beta = _check(policy_logps, ref_logps, ranks, valid, beta, kind)
  h_raw = policy_logps.astype(jnp.float32) - jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
  pairs, diff, h = pair_matrix(h_raw, ranks, valid)   # diff[b, w, l] = h_w - h_l on strict pairs, else 0
  pairs_f = pairs.astype(jnp.float32)
  n_pairs_b = jnp.sum(pairs_f, axis=(1, 2))                                       # [B]
  safe_np = jnp.maximum(n_pairs_b, 1.0)

  if kind == "plackett_luce":
    nll_b = _plackett_luce_nll(beta * h, ranks, valid)
    counts = jnp.sum(valid.astype(jnp.float32), axis=1) >= 2
  else:
    per_pair = -jax.nn.log_sigmoid(beta * diff) if kind == "pairs" else jnp.square(diff - 0.5 / beta)
    nll_b = jnp.sum(per_pair * pairs_f, axis=(1, 2)) / safe_np
    counts = n_pairs_b > 0
  counts_f = counts.astype(jnp.float32)
  num_prompts = jnp.sum(counts_f)
  loss = jnp.sum(jnp.where(counts, nll_b, 0.0)) / jnp.maximum(num_prompts, 1.0)

  sg = jax.lax.stop_gradient
  correct = ((sg(diff) > 0) & pairs).astype(jnp.float32)
  num_pairs = jnp.sum(n_pairs_b)
  has_pairs = (n_pairs_b > 0).astype(jnp.float32)
  acc_b = jnp.sum(correct, axis=(1, 2)) / safe_np
  both = valid[:, :, None] & valid[:, None, :]
  upper = jnp.triu(jnp.ones(both.shape[1:], bool), k=1)
  tied = jnp.sum((both & upper & (ranks[:, :, None] == ranks[:, None, :])).astype(jnp.float32))
  valid_f = valid.astype(jnp.float32)
  metrics = {
      "loss": sg(loss),
      "accuracy": jnp.sum(correct) / jnp.maximum(num_pairs, 1.0),
      "prompt_mean_accuracy": jnp.sum(acc_b * has_pairs) / jnp.maximum(jnp.sum(has_pairs), 1.0),
      "margin": beta * jnp.sum(sg(diff) * pairs_f) / jnp.maximum(num_pairs, 1.0),
      "num_pairs": num_pairs,
      "num_prompts": num_prompts,
      "tied_pairs": tied,
      "logratio_mean": jnp.sum(sg(h) * valid_f) / jnp.maximum(jnp.sum(valid_f), 1.0),
  }
  return loss, metrics
