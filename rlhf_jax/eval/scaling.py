"""GPT-4's predictable scaling: fit L(C) = a * C**b + c on small runs, extrapolate to a big one.

The fit is by variable projection (numpy only): for a fixed exponent b the model is linear in
(a, c), so the least-squares (a, c) is a 2x2 linear solve; the sum of squared errors is then a
function of b alone, minimised by a dense grid over b followed by golden-section refinement.
This needs no starting guess and cannot diverge. c is constrained to c >= 0 (a loss floor); when
the unconstrained solve gives c < 0, the best fit on the boundary c = 0 is used instead.

Public API:
  training_compute(model_cfg, seq_len, tokens) -> float FLOPs (flops_per_token * tokens)
  fit_power_law(compute, loss, b_range=(-2.0, -1e-4)) -> PowerLawFit
  PowerLawFit.predict(compute) -> loss
  prediction_error(predicted, actual) -> {"abs_error", "rel_error"}
  plot_fit(path, compute, loss, fit, held_out=None, title="")  (matplotlib, Agg)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

_WHERE = "rlhf_jax/eval/scaling.py"
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def training_compute(model_cfg, seq_len: int, tokens: float) -> float:
  """Training FLOPs C ~= 6 N D: GPTConfig.flops_per_token(seq_len) (6 N + attention) times tokens."""
  return float(model_cfg.flops_per_token(int(seq_len)) * float(tokens))


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(C) = a * C**b + c (C in FLOPs). sse: sum of squared residuals on the fitted points."""
  a: float
  b: float
  c: float
  sse: float
  n_points: int

  def predict(self, compute) -> np.ndarray:
    """compute: float array (or scalar) of FLOPs > 0 -> predicted loss, float64, same shape."""
    compute = np.asarray(compute, np.float64)
    return self.a * np.power(compute, self.b) + self.c

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _solve_ac(xb: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """Least-squares (a, c >= 0) of y ~ a * xb + c for fixed basis xb; returns (a, c, sse)."""
  design = np.stack([xb, np.ones_like(xb)], axis=1)
  (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
  if c < 0.0:  # the optimum on the boundary c = 0 of a convex problem
    a, c = float(xb @ y / max(xb @ xb, 1e-300)), 0.0
  r = y - a * xb - c
  return float(a), float(c), float(r @ r)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], b_range: tuple[float, float] = (-2.0, -1e-4),
                  n_grid: int = 2000, tol: float = 1e-10) -> PowerLawFit:
  """Least-squares fit of loss = a * compute**b + c with c >= 0 and b in b_range.

  compute: FLOPs (> 0), loss: finite floats, both length >= 3 (three parameters).
  Raises ValueError on fewer than 3 points, non-positive compute or non-finite values.
  """
  x = np.asarray(compute, np.float64).ravel()
  y = np.asarray(loss, np.float64).ravel()
  if x.shape != y.shape or x.size < 3:
    raise ValueError(f"{_WHERE}: fit_power_law needs >= 3 (compute, loss) pairs of equal length, "
                     f"got {x.size} and {y.size}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0):
    raise ValueError(f"{_WHERE}: fit_power_law needs finite losses and finite compute > 0, got {x}, {y}")
  lo, hi = sorted(float(v) for v in b_range)
  # Rescale compute to ~1 so x**b stays well conditioned; a is mapped back at the end.
  ref = float(np.exp(np.mean(np.log(x))))
  xs = x / ref
  sse = lambda b: _solve_ac(np.power(xs, b), y)[2]
  grid = np.linspace(lo, hi, n_grid)
  errs = np.array([sse(b) for b in grid])
  i = int(np.argmin(errs))
  left, right = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
  # Golden-section search on the bracket around the best grid point.
  p, q = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
  fp, fq = sse(p), sse(q)
  while right - left > tol:
    if fp < fq:
      right, q, fq = q, p, fp
      p = right - _GOLDEN * (right - left)
      fp = sse(p)
    else:
      left, p, fp = p, q, fq
      q = left + _GOLDEN * (right - left)
      fq = sse(q)
  b = min([(errs[i], grid[i]), (fp, p), (fq, q)])[1]
  a_s, c, err = _solve_ac(np.power(xs, b), y)
  return PowerLawFit(a=float(a_s * ref ** (-b)), b=float(b), c=float(c), sse=float(err), n_points=int(x.size))


def prediction_error(predicted: float, actual: float) -> dict[str, float]:
  """abs_error = |predicted - actual|, rel_error = abs_error / |actual|."""
  err = abs(float(predicted) - float(actual))
  return {"predicted": float(predicted), "actual": float(actual), "abs_error": err,
          "rel_error": err / max(abs(float(actual)), 1e-12)}


def plot_fit(path: str, compute, loss, fit: PowerLawFit, held_out: tuple[float, float] | None = None,
             title: str = "") -> None:
  """Log-log plot of the fitted points, the fitted curve (extended past the held-out point) and
  the held-out (compute, loss) measured after the prediction."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = np.asarray(compute, np.float64)
  hi = max(xs.max(), held_out[0] if held_out else xs.max()) * 3
  curve = np.geomspace(xs.min() / 3, hi, 200)
  fig, ax = plt.subplots(figsize=(6, 4.2))
  ax.loglog(curve, fit.predict(curve), "-", color="C0",
            label=f"fit: {fit.a:.3g} C^{fit.b:.3f} + {fit.c:.3f}")
  ax.axhline(fit.c, ls=":", color="gray", lw=1, label="irreducible c")
  ax.loglog(xs, loss, "o", color="C0", label="fitted runs")
  if held_out is not None:
    ax.loglog([held_out[0]], [fit.predict(held_out[0])], "x", ms=10, color="C3", label="predicted")
    ax.loglog([held_out[0]], [held_out[1]], "*", ms=12, color="C2", label="actual (trained after)")
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel("final validation loss (nats/token)")
  ax.set_title(title or "predictable scaling")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
