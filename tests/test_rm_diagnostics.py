"""Best-of-n / on-policy RM diagnostics: statistics vs brute force; an RM equal to gold is perfect."""
import itertools

import numpy as np
import pytest

from rlhf_jax.eval import rm_diagnostics


def _brute(g, r):
  picks, oracle, right, total = [], [], 0, 0
  for gi, ri in zip(g, r):
    best = max(range(len(ri)), key=lambda j: (ri[j], -j))   # first argmax
    picks.append(gi[best])
    oracle.append(max(gi))
    for a, b in itertools.combinations(range(len(gi)), 2):
      if gi[a] != gi[b]:
        total += 1
        right += int((ri[a] > ri[b]) if gi[a] > gi[b] else (ri[b] > ri[a]))
  return np.mean(picks), np.mean(oracle), right / total, total


def test_stats_match_brute_force():
  rng = np.random.default_rng(0)
  g = rng.choice([0.0, 0.05, 0.5, 1.0], size=(40, 5))
  r = np.round(rng.normal(size=(40, 5)), 1)           # rounding makes some RM ties
  s = rm_diagnostics.best_of_n_stats(g, r, ["x" if i % 2 else "y" for i in range(40)])
  pick, oracle, acc, total = _brute(g, r)
  assert s["gold_mean_sample"] == pytest.approx(g.mean())
  assert s["gold_best_of_n_rm"] == pytest.approx(pick)
  assert s["gold_best_of_n_oracle"] == pytest.approx(oracle)
  assert s["onpolicy_pair_accuracy"] == pytest.approx(acc)
  assert s["n_pairs"] == total
  fx = rm_diagnostics.best_of_n_stats(g[1::2], r[1::2])
  assert s["pair_accuracy_by_family"]["x"] == pytest.approx(fx["onpolicy_pair_accuracy"])


def test_gold_as_rm_is_the_oracle_and_noise_is_chance():
  rng = np.random.default_rng(1)
  g = rng.random((500, 4))
  s = rm_diagnostics.best_of_n_stats(g, 3 * g + 1)
  assert s["gold_best_of_n_rm"] == s["gold_best_of_n_oracle"]
  assert s["onpolicy_pair_accuracy"] == 1.0
  noise = rm_diagnostics.best_of_n_stats(g, rng.random((500, 4)))
  assert abs(noise["onpolicy_pair_accuracy"] - 0.5) < 0.05
  assert abs(noise["gold_best_of_n_rm"] - noise["gold_mean_sample"]) < 0.03


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[P, N\]"):
    rm_diagnostics.best_of_n_stats(np.zeros((3, 4)), np.zeros((3, 5)))
