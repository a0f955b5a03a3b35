"""Elo ratings of N models from pairwise outcomes (e.g. gold-labeler comparisons of their responses).

A match is (a, b, s): models a and b answered the same prompt and s is a's score (1 win,
0.5 tie, 0 loss). Two fits:

  * `bradley_terry` (default): the deterministic maximum-likelihood fit of
    P(a beats b) = sigmoid(theta_a - theta_b), a tie counting as half a win for each side, by
    Newton's method (the log-likelihood is concave). A `prior` of virtual tied games per played
    pair keeps a model that never won (or never lost) at a finite rating. Reported on the Elo
    scale, 400 * log10 odds: elo = 1000 + 400 / ln(10) * (theta - theta_anchor), anchored on a
    named model or, by default, on the mean. Standard errors come from the inverse Fisher
    information (the pseudo-inverse of the win-probability-weighted graph Laplacian).
  * `sequential_elo`: classic online Elo updates, order-dependent (optionally averaged over
    random orders).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.data import gold

_WHERE = "rlhf_jax/eval/elo.py"
ELO_PER_NAT = 400.0 / math.log(10.0)
BASE = 1000.0

Match = tuple[str, str, float]


def expected_score(r_a: float, r_b: float) -> float:
  """Expected score of a against b under Elo ratings: 1 / (1 + 10 ** ((r_b - r_a) / 400))."""
  return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0))


def gold_matches(prompt_records: Sequence[Mapping], responses_by_model: Mapping[str, Sequence[str]]
                 ) -> list[Match]:
  """Every pair of models on every prompt, judged by the noise-free gold labeler (`gold.compare`)."""
  names = list(responses_by_model)
  for m in names:
    if len(responses_by_model[m]) != len(prompt_records):
      raise ValueError(f"{_WHERE}: model {m!r} has {len(responses_by_model[m])} responses for "
                       f"{len(prompt_records)} prompts")
  tasks = [gold.resolve_task(r) for r in prompt_records]
  out = []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      for p, task in enumerate(tasks):
        out.append((a, b, gold.compare(task, responses_by_model[a][p], responses_by_model[b][p])))
  return out


def tally(names: Sequence[str], matches: Iterable[Match]) -> tuple[np.ndarray, np.ndarray]:
  """(points, games), float64 [N, N]: points[i, j] = i's score summed over its games with j
  (a tie gives 0.5 to each), games[i, j] = games[j, i] = number of games between i and j."""
  index = {n: i for i, n in enumerate(names)}
  if len(index) != len(names):
    raise ValueError(f"{_WHERE}: duplicate model names in {list(names)}")
  n = len(names)
  points, games = np.zeros((n, n)), np.zeros((n, n))
  for k, (a, b, s) in enumerate(matches):
    if a not in index or b not in index:
      raise ValueError(f"{_WHERE}: match {k} names unknown model {a if a not in index else b!r}; "
                       f"known: {list(names)}")
    if a == b:
      raise ValueError(f"{_WHERE}: match {k} pits {a!r} against itself")
    s = float(s)
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"{_WHERE}: match {k} has score {s}, expected a value in [0, 1]")
    i, j = index[a], index[b]
    points[i, j] += s
    points[j, i] += 1.0 - s
    games[i, j] += 1.0
    games[j, i] += 1.0
  return points, games


def _reaches_all(edges: np.ndarray) -> bool:
  """Whether every node is reachable from node 0 along edges[i, j] > 0."""
  seen, stack = {0}, [0]
  while stack:
    i = stack.pop()
    for j in np.nonzero(edges[i] > 0)[0]:
      if int(j) not in seen:
        seen.add(int(j))
        stack.append(int(j))
  return len(seen) == len(edges)


def _loglik(theta, points, games) -> float:
  d = theta[:, None] - theta[None, :]
  # points[i, j] * log sigmoid(d_ij); each game appears once from each side with its own points.
  return float(np.sum(points * -np.logaddexp(0.0, -d)))


def bradley_terry(points: np.ndarray, games: np.ndarray, *, prior: float = 1.0, max_iter: int = 100,
                  tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
  """Maximum-likelihood Bradley-Terry strengths.

  points, games: float [N, N] from `tally`. prior: virtual tied games added to every pair that
  played at least once (0 = the plain MLE, which diverges for a model that never lost or won).
  Returns (theta float64 [N] in nats with mean 0, cov float64 [N, N]: the covariance of theta under
  the mean-zero constraint, pinv of the Fisher information at the optimum).
  """
  points, games = np.asarray(points, np.float64), np.asarray(games, np.float64)
  n = len(points)
  if points.shape != (n, n) or games.shape != (n, n):
    raise ValueError(f"{_WHERE}: points and games must be square [N, N], got {points.shape}, {games.shape}")
  if n < 2:
    raise ValueError(f"{_WHERE}: need at least 2 models, got {n}")
  if prior < 0:
    raise ValueError(f"{_WHERE}: prior must be >= 0, got {prior}")
  if not _reaches_all(games):
    raise ValueError(f"{_WHERE}: the comparison graph is disconnected; ratings of separate groups are "
                     "not comparable")
  if prior == 0 and not (_reaches_all(points) and _reaches_all(points.T)):
    # Ford's condition: a finite MLE needs every split of the models into two groups to have a win
    # (or tie) in both directions, i.e. a strongly connected "scored against" graph.
    raise ValueError(f"{_WHERE}: no finite maximum-likelihood fit: some group of models never scored "
                     "against the rest (e.g. a model that never won); use prior > 0")
  played = (games > 0).astype(np.float64)
  points = points + 0.5 * prior * played
  games = games + prior * played
  theta = np.zeros(n)
  ll = _loglik(theta, points, games)
  for _ in range(max_iter):
    p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
    grad = points.sum(1) - (games * p).sum(1)
    w = games * p * p.T
    lap = np.diag(w.sum(1)) - w  # Fisher information (negative Hessian), null space = ones
    step = np.linalg.solve(lap + np.ones((n, n)) / n, grad)
    t = 1.0
    while t > 1e-8:  # backtracking keeps the iteration monotone far from the optimum
      cand = theta + t * step
      cand_ll = _loglik(cand, points, games)
      if cand_ll >= ll - 1e-12:
        break
      t *= 0.5
    theta, ll = cand - cand.mean(), cand_ll
    if np.max(np.abs(t * step)) < tol:
      break
  else:
    if not np.all(np.isfinite(theta)) or np.max(np.abs(step)) > 1e-6:
      raise ValueError(f"{_WHERE}: Bradley-Terry fit did not converge in {max_iter} Newton steps "
                       "(a model that never wins or never loses needs prior > 0)")
  p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
  w = games * p * p.T
  cov = np.linalg.pinv(np.diag(w.sum(1)) - w)
  return theta, cov


def _anchor_shift(names: Sequence[str], values: np.ndarray, anchor: str | None) -> float:
  if anchor is None:
    return float(np.mean(values))
  if anchor not in names:
    raise ValueError(f"{_WHERE}: anchor {anchor!r} is not one of the models {list(names)}")
  return float(values[list(names).index(anchor)])


def sequential_elo(names: Sequence[str], matches: Sequence[Match], *, k: float = 16.0, initial: float = BASE,
                   anchor: str | None = None, shuffles: int = 0, seed: int = 0) -> dict[str, float]:
  """Classic Elo: r_a += k (s - E), r_b -= k (s - E), E = expected_score(r_a, r_b), match by match.

  shuffles = 0 uses the given order; shuffles > 0 averages the final ratings over that many random
  orders (np.random.default_rng(seed)). The result is shifted so the anchor (or the mean) is 1000.
  """
  index = {n: i for i, n in enumerate(names)}
  tally(names, matches)  # validates names and scores
  if shuffles < 0:
    raise ValueError(f"{_WHERE}: shuffles must be >= 0, got {shuffles}")
  rng = np.random.default_rng(seed)
  orders = [np.arange(len(matches))] if shuffles == 0 else [rng.permutation(len(matches)) for _ in range(shuffles)]
  finals = []
  for order in orders:
    r = np.full(len(names), float(initial))
    for m in order:
      a, b, s = matches[m]
      i, j = index[a], index[b]
      delta = k * (float(s) - expected_score(r[i], r[j]))
      r[i] += delta
      r[j] -= delta
    finals.append(r)
  r = np.mean(finals, axis=0)
  r = r - _anchor_shift(names, r, anchor) + BASE
  return {n: float(v) for n, v in zip(names, r)}


def fit_elo(names: Sequence[str], matches: Sequence[Match], *, anchor: str | None = None,
            method: str = "bradley_terry", prior: float = 1.0, k: float = 16.0, shuffles: int = 0,
            seed: int = 0) -> dict:
  """Elo ratings of `names` from `matches`.

  Returns {"method", "anchor", "ratings": {name: elo}, "se": {name: se} (Bradley-Terry only, else
  None; 0 for the anchor), "n_games": int, "points": {name: total points}, "games": {name: games}}.
  The anchor (or, if None, the mean rating) sits at 1000.
  """
  names = list(names)
  points, games = tally(names, matches)
  out = {"method": method, "anchor": anchor, "n_games": len(matches),
         "points": {n: float(v) for n, v in zip(names, points.sum(1))},
         "games": {n: int(v) for n, v in zip(names, games.sum(1))}}
  if method == "bradley_terry":
    theta, cov = bradley_terry(points, games, prior=prior)
    elo = ELO_PER_NAT * theta
    elo = elo - _anchor_shift(names, elo, anchor) + BASE
    if anchor is None:
      var = np.diag(cov)  # theta already has mean 0: the mean-zero covariance is what we need
    else:
      a = names.index(anchor)
      var = np.diag(cov) + cov[a, a] - 2.0 * cov[:, a]  # Var(theta_i - theta_anchor)
    se = ELO_PER_NAT * np.sqrt(np.maximum(var, 0.0))
    out["ratings"] = {n: float(v) for n, v in zip(names, elo)}
    out["se"] = {n: float(v) for n, v in zip(names, se)}
  elif method == "sequential":
    out["ratings"] = sequential_elo(names, matches, k=k, anchor=anchor, shuffles=shuffles, seed=seed)
    out["se"] = None
  else:
    raise ValueError(f"{_WHERE}: unknown method {method!r}; use 'bradley_terry' or 'sequential'")
  return out
