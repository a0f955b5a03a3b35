"""PNG figures of the pipeline's results (matplotlib, Agg canvas; 800 x 500 px at dpi 100).

Figures are drawn with matplotlib's object API on an Agg canvas, so importing this module changes
no global backend and needs no display. Histories are `train/loop.py:read_metrics` lists of
{"step", "<name>/<metric>", "eval/<metric>", ...}; train and eval metrics of one step may sit in
separate rows, so every series is read key by key (`series`). Metric key names are parameters.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_WHERE = "rlhf_jax/eval/plots.py"
FIGSIZE = (8.0, 5.0)
DPI = 100

PPO_PANELS: tuple[tuple[str, str], ...] = (
    ("ppo/score", "RM reward"), ("eval/gold_mean", "gold score"), ("ppo/kl", "KL to SFT"),
    ("eval/pretrain_val_loss", "held-out pretraining loss"))
# Is the trust region in play? (PPO's approx. KL per update and clipped fraction, and the value function.)
TRUST_PANELS: tuple[tuple[str, str], ...] = (
    ("ppo/approx_kl", "approx. KL old -> new policy"), ("ppo/clip_frac", "clipped fraction (policy)"),
    ("ppo/explained_variance", "value explained variance"), ("ppo/value_clip_frac", "clipped fraction (value)"))


def series(history: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int64 [M], values float64 [M]) of the rows that log a finite `key`, sorted by step.

  A step logged twice keeps its last value (e.g. a resumed run re-logging a step).
  """
  by_step = {}
  for i, row in enumerate(history):
    if key in row and row[key] is not None and math.isfinite(float(row[key])):
      if "step" not in row:
        raise ValueError(f"{_WHERE}: history row {i} logs {key!r} but has no 'step'")
      by_step[int(row["step"])] = float(row[key])
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def value_at(steps: np.ndarray, values: np.ndarray, at) -> np.ndarray:
  """The last value logged at or before each step in `at` (the first value before the first log)."""
  if len(steps) == 0:
    raise ValueError(f"{_WHERE}: value_at on an empty series")
  idx = np.searchsorted(steps, np.asarray(at), side="right") - 1
  return values[np.clip(idx, 0, len(values) - 1)]


def _figure(nrows: int = 1, ncols: int = 1):
  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes.ravel()


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  return path


def _models(summary: Mapping) -> Mapping[str, Mapping]:
  models = summary.get("models", summary)
  if not isinstance(models, Mapping) or not models:
    raise ValueError(f"{_WHERE}: summary has no models (expected {{'models': {{name: metrics}}}})")
  return models


def plot_rm_accuracy(history: Sequence[Mapping], path: str, *, eval_key: str = "eval/accuracy",
                     train_key: str = "rm/accuracy") -> str:
  """Reward-model pairwise accuracy vs step (held-out and, if logged, training), chance at 0.5."""
  fig, (ax,) = _figure()
  drawn = 0
  for key, label, style in ((train_key, "train", "-"), (eval_key, "held-out", "o-")):
    steps, vals = series(history, key)
    if len(steps):
      ax.plot(steps, vals, style, label=f"{label} ({key})")
      drawn += 1
  if not drawn:
    raise ValueError(f"{_WHERE}: plot_rm_accuracy: history logs neither {eval_key!r} nor {train_key!r}")
  ax.axhline(0.5, color="gray", ls=":", label="chance")
  ax.set(xlabel="step", ylabel="pairwise accuracy", title="Reward model accuracy", ylim=(0.0, 1.0))
  ax.legend()
  return _save(fig, path)


def plot_ppo_curves(histories: Mapping[str, Sequence[Mapping]], path: str,
                    panels: Sequence[tuple[str, str]] = PPO_PANELS) -> str:
  """One panel per (metric key, title) vs PPO iteration, one line per run (e.g. ppo vs ppo_ptx)."""
  ncols = 2 if len(panels) > 1 else 1
  fig, axes = _figure(math.ceil(len(panels) / ncols), ncols)
  drawn = 0
  for ax, (key, title) in zip(axes, panels):
    for run, history in histories.items():
      steps, vals = series(history, key)
      if len(steps):
        ax.plot(steps, vals, "o-" if len(steps) < 30 else "-", ms=3, label=run)
        drawn += 1
    ax.set(xlabel="PPO iteration", title=title)
    if ax.lines:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, f"no {key!r} logged", ha="center", va="center", transform=ax.transAxes)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  if not drawn:
    raise ValueError(f"{_WHERE}: plot_ppo_curves: no run logs any of {[k for k, _ in panels]}")
  return _save(fig, path)


def plot_gold_bars(summary: Mapping, path: str, *, metric: str = "gold_mean", se: str = "gold_se") -> str:
  """Bar per model of `metric` with +-1 SE error bars. summary: {"models": {name: metrics}} or the
  {name: metrics} mapping itself; models without the metric are left out."""
  models = {n: m for n, m in _models(summary).items() if m.get(metric) is not None}
  if not models:
    raise ValueError(f"{_WHERE}: plot_gold_bars: no model has {metric!r}")
  names = list(models)
  vals = [float(models[n][metric]) for n in names]
  errs = [float(models[n].get(se) or 0.0) for n in names]
  fig, (ax,) = _figure()
  ax.bar(range(len(names)), vals, yerr=errs, capsize=4, color="tab:blue")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=20, ha="right")
  ax.set(ylabel=metric, title=f"{metric} by model (error bars: 1 SE)")
  return _save(fig, path)


def plot_grouped_bars(groups: Mapping[str, Mapping[str, float]], path: str, *, categories: Sequence[str],
                      ylabel: str, title: str) -> str:
  """Grouped bars: one group per category (e.g. task family), one bar per series in `groups`
  ({series label: {category: value}}); categories a series lacks are left empty."""
  if not groups or not categories:
    raise ValueError(f"{_WHERE}: plot_grouped_bars needs at least one series and one category")
  fig, (ax,) = _figure()
  width = 0.8 / len(groups)
  x = np.arange(len(categories))
  for i, (label, values) in enumerate(groups.items()):
    ax.bar(x + (i - (len(groups) - 1) / 2) * width, [float(values.get(c, np.nan)) for c in categories], width,
           label=label)
  ax.set_xticks(x)
  ax.set_xticklabels(categories, rotation=20, ha="right")
  ax.set(ylabel=ylabel, title=title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_beta_sweep(results: Mapping, path: str, *, rm_key: str = "ppo/score",
                    gold_key: str = "eval/gold_mean", kl_key: str = "ppo/kl", x: str = "kl") -> str:
  """The over-optimisation picture: RM score and gold score of each beta's run vs KL (or step).

  results: {beta: metric history}. x="kl": each point's x is the run's KL logged at (or last
  before) that step; x="step": the PPO iteration.
  """
  if x not in ("kl", "step"):
    raise ValueError(f"{_WHERE}: plot_beta_sweep: x must be 'kl' or 'step', got {x!r}")
  fig, axes = _figure(1, 2)
  drawn = 0
  for beta in sorted(results, key=float):
    history = results[beta]
    kl_steps, kl_vals = series(history, kl_key)
    for ax, key in zip(axes, (rm_key, gold_key)):
      steps, vals = series(history, key)
      if not len(steps):
        continue
      if x == "kl":
        if not len(kl_steps):
          raise ValueError(f"{_WHERE}: plot_beta_sweep: run beta={beta} logs no {kl_key!r} for the x axis")
        xs = value_at(kl_steps, kl_vals, steps)
      else:
        xs = steps
      ax.plot(xs, vals, "o-" if len(steps) < 30 else "-", ms=3, label=f"beta={beta}")
      drawn += 1
  if not drawn:
    raise ValueError(f"{_WHERE}: plot_beta_sweep: no run logs {rm_key!r} or {gold_key!r}")
  xlabel = "KL to SFT" if x == "kl" else "PPO iteration"
  for ax, title in zip(axes, ("RM score (proxy)", "gold score (true)")):
    ax.set(xlabel=xlabel, title=title)
    if ax.lines:
      ax.legend(fontsize=8)
  return _save(fig, path)


def plot_frontier(curves: Mapping[str, Sequence[Mapping]], path: str, *, x: str = "kl_to_sft", y: str = "gold_mean",
                  ci: str = "gold_ci95", baseline: float | None = None, title: str = "", sqrt_x: bool = True) -> str:
  """The over-optimisation picture (Gao et al. 2022): gold score against KL to SFT, one curve per method.

  curves: {method: points in training order}, a point {x: float, y: float, ci: [low, high] (optional)};
  points without a finite x or y are left out. baseline: drawn as a horizontal line (the SFT policy's
  gold score). sqrt_x: the x axis is spaced by sqrt(KL), as Gao et al. plot against d = sqrt(KL)
  (ticks stay in nats; negative KL estimates are drawn at 0). Returns path.
  """
  fig, (ax,) = _figure()
  drawn = 0
  markers = "osD^v<>phX*"
  for i, (method, points) in enumerate(curves.items()):
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None
           and math.isfinite(float(p[x])) and math.isfinite(float(p[y]))]
    if not pts:
      continue
    xs = np.array([float(p[x]) for p in pts])
    ys = np.array([float(p[y]) for p in pts])
    lo = np.array([float(p[ci][0]) if p.get(ci) else v for p, v in zip(pts, ys)])
    hi = np.array([float(p[ci][1]) if p.get(ci) else v for p, v in zip(pts, ys)])
    style = "--" if method.startswith("best_of_n") else "-"
    ax.errorbar(xs, ys, yerr=np.stack([ys - lo, hi - ys]), fmt=markers[i % len(markers)] + style, ms=4, capsize=2,
                lw=1.2, elinewidth=0.7, alpha=0.85, label=method)
    drawn += 1
  if not drawn:
    raise ValueError(f"{_WHERE}: plot_frontier: no method has a point with finite {x!r} and {y!r}")
  if baseline is not None:
    ax.axhline(float(baseline), color="gray", ls=":", label="SFT")
  if sqrt_x:
    ax.set_xscale("function", functions=(lambda v: np.sqrt(np.maximum(v, 0.0)), np.square))
    ax.set_xlim(left=0.0)
  ax.set(xlabel="KL to SFT (nats, sqrt-spaced)" if sqrt_x else "KL to SFT (nats)", ylabel="gold score (95% CI)", title=title or "Gold score vs KL to SFT")
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)
