"""Can the reward model guide the policy? Best-of-n and on-policy pairwise accuracy.

The RM's held-out accuracy is measured on the comparison data, whose pairs often differ in style
(e.g. an SFT answer vs a rambling pretrained one). PPO only gains where the RM can tell the
*policy's own* samples apart. Sampling n responses per prompt from the SFT policy and asking the RM
to pick one answers that directly: if the RM's pick scores no better (on gold) than a random
sample, no amount of RL against this RM can raise the gold score; the gap to the gold labeler's
own pick (the oracle) is the headroom a perfect RM would have.

Best-of-n is also a policy in its own right (evaluation only): `sample_scores` draws N samples per
prompt, `best_of_n_expected` gives the exact expected value of the RM's pick among n of them, and
`best_of_n_kl` its KL to the base policy, log n - (n - 1) / n.
"""
from __future__ import annotations

import collections
import math
from typing import Mapping, Sequence

import numpy as np

from rlhf_jax import generation
from rlhf_jax.data import gold
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.eval import policy_eval


def best_of_n_stats(gold_scores: np.ndarray, rm_scores: np.ndarray, families: Sequence[str] | None = None) -> dict:
  """Best-of-n statistics from per-sample scores.

  gold_scores, rm_scores: float [P, N] (P prompts, N samples each). families: P family names (optional).
  Returns: n, n_prompts; gold_mean_sample (mean over all samples); gold_best_of_n_rm (gold of the
  RM's argmax per prompt; ties go to the first); gold_best_of_n_oracle (max gold per prompt);
  onpolicy_pair_accuracy: over sample pairs of the same prompt with different gold, the fraction the
  RM orders like gold (an RM tie counts as wrong); n_pairs; and per family the pair accuracy.
  """
  g, r = np.asarray(gold_scores, np.float64), np.asarray(rm_scores, np.float64)
  if g.shape != r.shape or g.ndim != 2:
    raise ValueError(f"rm_diagnostics.py: gold and RM scores must both be [P, N], got {g.shape} and {r.shape}")
  p, n = g.shape
  pick = r.argmax(axis=1)
  a, b = np.triu_indices(n, k=1)
  dg, dr = g[:, a] - g[:, b], r[:, a] - r[:, b]             # [P, C(N,2)]
  ordered = dg != 0
  right = np.sign(dg) == np.sign(dr)                        # an RM tie (dr = 0) is never right here
  by_family = collections.defaultdict(lambda: [0, 0])
  for i, fam in enumerate(families if families is not None else ["all"] * p):
    by_family[fam][0] += int(right[i][ordered[i]].sum())
    by_family[fam][1] += int(ordered[i].sum())
  total = int(ordered.sum())
  return {
      "n": n, "n_prompts": p,
      "gold_mean_sample": float(g.mean()),
      "gold_best_of_n_rm": float(g[np.arange(p), pick].mean()),
      "gold_best_of_n_oracle": float(g.max(axis=1).mean()),
      "onpolicy_pair_accuracy": float(right[ordered].mean()) if total else None,
      "n_pairs": total,
      "pair_accuracy_by_family": {f: (c / t if t else None) for f, (c, t) in sorted(by_family.items())},
  }


def sample_scores(policy_cfg, policy_params, tok: Tokenizer, rm_cfg, rm_params, prompt_records: Sequence[Mapping],
                  rng, *, n: int, temperature: float = 0.7, max_prompt_len: int = 64, max_new_tokens: int = 24,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Samples n responses per prompt record ({"messages"}) from the policy and scores each with the
  RM (rm_params as given: fold a reward offset in first) and the gold labeler.

  Returns (gold float64 [P, n], rm float64 [P, n], the P prompts' task families).
  """
  if n < 1:
    raise ValueError(f"rm_diagnostics.py: sample_scores needs n >= 1, got {n}")
  msgs = [list(r["messages"]) for r in prompt_records]
  resp = generation.sample_responses(policy_params, policy_cfg, tok, msgs, rng, n_per_prompt=n,
                                     max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                                     temperature=temperature, batch_size=batch_size)
  flat_p = [m for m in msgs for _ in range(n)]
  flat_r = [x for rs in resp for x in rs]
  tasks = [gold.resolve_task(m) for m in msgs]
  rm = policy_eval.rm_scores(rm_cfg, rm_params, tok, flat_p, flat_r, max_len=max_prompt_len + max_new_tokens + 1,
                             batch_size=batch_size).reshape(len(msgs), n)
  g = np.array([gold.score(tasks[i // n], x) for i, x in enumerate(flat_r)]).reshape(len(msgs), n)
  return g.astype(np.float64), rm.astype(np.float64), [t.family for t in tasks]


def best_of_n(policy_cfg, policy_params, tok: Tokenizer, rm_cfg, rm_params, prompt_records: Sequence[Mapping],
              rng, *, n: int = 4, temperature: float = 0.7, max_prompt_len: int = 64, max_new_tokens: int = 24,
              batch_size: int = 64) -> dict:
  """Samples n responses per prompt record ({"messages"}) from the policy, scores them with the RM
  and the gold labeler, and returns `best_of_n_stats` of the result."""
  if n < 2:
    raise ValueError(f"rm_diagnostics.py: best_of_n needs n >= 2, got {n}")
  g, rm, families = sample_scores(policy_cfg, policy_params, tok, rm_cfg, rm_params, prompt_records, rng, n=n,
                                  temperature=temperature, max_prompt_len=max_prompt_len,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
  return best_of_n_stats(g, rm, families)


# ------------------------------------------------------------------ best-of-n as a policy


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || base) in nats as usually quoted: log n - (n - 1) / n (0 at n = 1).

  Exact for continuous scores without ties; an upper bound otherwise (Beirami et al. 2024).
  """
  if int(n) < 1:
    raise ValueError(f"rm_diagnostics.py: best_of_n_kl needs n >= 1, got {n}")
  return float(math.log(n) - (n - 1) / n)


def best_of_n_expected(values: np.ndarray, rm_scores: np.ndarray, n: int) -> np.ndarray:
  """Per-prompt expected `values` of the RM's pick among n of the N samples, drawn without replacement.

  values, rm_scores: float [P, N], N >= n. Over all C(N, n) subsets equally likely, the sample at
  rank j of the RM's descending order (ties: the earlier sample first) is the pick with probability
  C(N-1-j, n-1) / C(N, n) -- the unbiased, low-variance estimator of the best-of-n value from N
  samples (n = 1: the mean; n = N: the RM's argmax). Returns float64 [P].
  """
  v, r = np.asarray(values, np.float64), np.asarray(rm_scores, np.float64)
  if v.shape != r.shape or v.ndim != 2:
    raise ValueError(f"rm_diagnostics.py: values and RM scores must both be [P, N], got {v.shape} and {r.shape}")
  big_n = v.shape[1]
  if not 1 <= int(n) <= big_n:
    raise ValueError(f"rm_diagnostics.py: best_of_n_expected needs 1 <= n <= N={big_n}, got {n}")
  order = np.argsort(-r, axis=1, kind="stable")
  weights = np.array([math.comb(big_n - 1 - j, n - 1) for j in range(big_n)], np.float64) / math.comb(big_n, n)
  return np.take_along_axis(v, order, axis=1) @ weights
