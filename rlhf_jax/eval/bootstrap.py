"""Percentile-bootstrap confidence intervals over prompts (the unit that is sampled in an evaluation)."""
from __future__ import annotations

import numpy as np

_WHERE = "rlhf_jax/eval/bootstrap.py"


def mean_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """(low, high): the `level` percentile-bootstrap interval of the mean of per-prompt values.

  values: float [P] (one outcome per prompt, e.g. a gold score or a 1 / 0.5 / 0 win), P >= 1.
  """
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"{_WHERE}: mean_ci needs a non-empty 1-D array of per-prompt values, got shape {x.shape}")
  if not 0 < level < 1 or int(n_boot) < 1:
    raise ValueError(f"{_WHERE}: need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
  means = np.random.default_rng(seed).choice(x, size=(int(n_boot), x.size), replace=True).mean(axis=1)
  tail = (1.0 - level) / 2
  return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def win_tie_loss(outcomes, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
  """Wins, ties and losses of per-prompt pairwise outcomes (1 win, 0.5 tie, 0 loss), the win rate
  (ties count half), its standard error and its percentile-bootstrap interval over prompts.

  outcomes: float [P], P >= 1, each in {0, 0.5, 1}. Returns a JSON-serialisable dict:
  {"wins", "ties", "losses", "n": int; "win_rate", "se": float; "ci95": [low, high]}.
  """
  x = np.asarray(outcomes, np.float64)
  if x.ndim != 1 or x.size == 0 or not np.all(np.isin(x, (0.0, 0.5, 1.0))):
    raise ValueError(f"{_WHERE}: win_tie_loss needs a non-empty 1-D array of outcomes in {{0, 0.5, 1}}, "
                     f"got shape {x.shape}")
  se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
  return {"wins": int((x == 1).sum()), "ties": int((x == 0.5).sum()), "losses": int((x == 0).sum()),
          "n": int(x.size), "win_rate": float(x.mean()), "se": se,
          "ci95": list(mean_ci(x, n_boot=n_boot, seed=seed, level=level))}
