"""The results table and the InstructGPT claims, checked against measured numbers.

A summary is a JSON-serialisable dict:
  {"models": {name: evaluate_policy(...) dict, optionally with "num_params"},
   "roles": {role: model name} (optional; missing roles default to DEFAULT_ROLES),
   "rm": {"heldout_accuracy": float, "noise_temperature": float (optional)},
   "beta_sweep": {beta: PPO metric history (read_metrics list)}}
Every claim gets {"claim", "holds": bool, "evaluated": bool, "numbers": {...}, "reason"}; a claim
whose inputs are missing is not evaluated and does not hold.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.eval.plots import series, value_at

_WHERE = "rlhf_jax/eval/report.py"

DEFAULT_ROLES = {"pretrained": "pretrained", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx",
                 "large_pretrained": "pretrained_large", "aligned": "ppo_ptx"}


# ------------------------------------------------------------------------------------- table


def _num(v, fmt: str = "{:.3f}") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return fmt.format(v)


def _params(v) -> str:
  if v is None:
    return "-"
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if v >= div:
      return f"{v / div:.1f}{unit}"
  return str(int(v))


def _gold(m: Mapping) -> str:
  g = _num(m.get("gold_mean"))
  return g if m.get("gold_se") is None or g == "-" else f"{g} ± {m['gold_se']:.3f}"


def _ci(w: Mapping | None) -> str:
  return "-" if not w else f"[{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"


def _wtl(w: Mapping | None) -> str:
  return "-" if not w else f"{w['wins']} / {w['ties']} / {w['losses']}"


Column = tuple[str, Callable[[Mapping], str]]
COLUMNS: tuple[Column, ...] = (
    ("params", lambda m: _params(m.get("num_params"))),
    ("gold ± SE", _gold),
    ("win vs SFT (gold)", lambda m: _num(m.get("win_rate_vs_sft_gold"))),
    ("95% CI", lambda m: _ci(m.get("vs_sft_gold"))),
    ("W / T / L", lambda m: _wtl(m.get("vs_sft_gold"))),
    ("win vs SFT (RM)", lambda m: _num(m.get("win_rate_vs_sft_rm"))),
    ("RM score", lambda m: _num(m.get("rm_score_mean"))),
    ("KL", lambda m: _num(m.get("kl_to_sft"))),
    ("KL/token", lambda m: _num(m.get("kl_to_sft_per_token"), "{:.4f}")),
    ("pretrain loss", lambda m: _num(m.get("pretrain_val_loss"))),
    ("harmful comply", lambda m: _num(m.get("harmful_compliance_rate"))),
    ("benign refuse", lambda m: _num(m.get("refusal_rate_on_benign"))),
    ("length", lambda m: _num(m.get("mean_response_length"), "{:.1f}")),
)


def _models(summary: Mapping) -> Mapping[str, Mapping]:
  models = summary.get("models")
  if not isinstance(models, Mapping):
    raise ValueError(f"{_WHERE}: summary lacks a 'models' dict (got keys {sorted(summary)})")
  return models


def format_table(summary: Mapping, columns: Sequence[Column] = COLUMNS) -> str:
  """Markdown table, one row per model (summary order), every column padded to a fixed width.
  Missing values show as '-'."""
  models = _models(summary)
  header = ["model"] + [h for h, _ in columns]
  rows = [[name] + [fmt(m) for _, fmt in columns] for name, m in models.items()]
  widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), rule] + [line(r) for r in rows])


# ------------------------------------------------------------------------------------ claims


def _claim(text: str, holds: bool = False, evaluated: bool = True, reason: str = "", **numbers) -> dict:
  return {"claim": text, "holds": bool(holds and evaluated), "evaluated": evaluated, "reason": reason,
          "numbers": numbers}


def _role_name(summary: Mapping, role: str) -> str:
  return {**DEFAULT_ROLES, **summary.get("roles", {})}[role]


def _get(summary: Mapping, role: str, metric: str):
  """(value, missing-reason) of `metric` for the model playing `role`."""
  name = _role_name(summary, role)
  m = _models(summary).get(name)
  if m is None:
    return None, f"no model {name!r} (role {role!r}) in the summary"
  if m.get(metric) is None:
    return None, f"model {name!r} has no {metric!r}"
  return float(m[metric]), ""


def _need(summary, *pairs):
  vals, missing = [], []
  for role, metric in pairs:
    v, why = _get(summary, role, metric)
    vals.append(v)
    if why:
      missing.append(why)
  return vals, "; ".join(missing)


def _claim_sft_beats_pretrained(summary) -> dict:
  text = "(a) SFT beats the pretrained model on gold score"
  (sft, pre), missing = _need(summary, ("sft", "gold_mean"), ("pretrained", "gold_mean"))
  if missing:
    return _claim(text, evaluated=False, reason=missing)
  return _claim(text, sft > pre, gold_sft=sft, gold_pretrained=pre, diff=sft - pre)


def _claim_rm_accuracy(summary, threshold: float) -> dict:
  text = f"(b) RM held-out pairwise accuracy >= {threshold:.2f} (noise-free labels)"
  rm = summary.get("rm") or {}
  acc = rm.get("heldout_accuracy")
  if acc is None:
    return _claim(text, evaluated=False, reason="summary['rm'] has no 'heldout_accuracy'")
  noise = rm.get("noise_temperature")
  reason = "" if not noise else f"labels were noisy (noise_temperature={noise}); the claim is for noise-free labels"
  return _claim(text, float(acc) >= threshold, reason=reason, heldout_accuracy=float(acc), threshold=threshold,
                noise_temperature=noise)


def _claim_ppo_beats_sft(summary, threshold: float) -> dict:
  text = f"(c) PPO beats SFT: gold win rate vs SFT > {threshold:.2f}, its 95% CI above 0.5"
  (win,), missing = _need(summary, ("ppo", "win_rate_vs_sft_gold"))
  if missing:
    return _claim(text, evaluated=False, reason=missing)
  wtl = _models(summary)[_role_name(summary, "ppo")].get("vs_sft_gold") or {}
  ci = wtl.get("ci95")
  stats = {k: wtl[k] for k in ("wins", "ties", "losses") if k in wtl}
  if ci is not None:
    stats.update(ci_low=float(ci[0]), ci_high=float(ci[1]))
  bon = (summary.get("rm") or {}).get("best_of_n_sft") or {}
  extra = {k: bon[k] for k in ("gold_mean_sample", "gold_best_of_n_rm", "gold_best_of_n_oracle",
                               "onpolicy_pair_accuracy") if bon.get(k) is not None}
  reason = ""
  if win <= threshold and len(extra) == 4:
    # What bounds PPO's gain: how well the RM ranks the samples PPO starts from.
    reason = (f"RM on SFT's own samples: its best-of-n pick scores {extra['gold_best_of_n_rm']:.3f} on gold vs "
              f"{extra['gold_mean_sample']:.3f} for a random sample and {extra['gold_best_of_n_oracle']:.3f} for "
              f"gold's pick; it orders {extra['onpolicy_pair_accuracy']:.1%} of gold-distinct sample pairs right")
  holds = win > threshold and (ci is None or ci[0] > 0.5)
  return _claim(text, holds, reason=reason, win_rate_vs_sft_gold=win, threshold=threshold, **stats, **extra)


def _claim_ptx(summary, n_se: float) -> dict:
  text = (f"(d) PPO-ptx keeps PPO's gold gain over SFT (gold within {n_se:g} SE of PPO's) with a lower held-out "
          "pretraining loss than PPO")
  (g_sft, g_ppo, g_ptx, l_sft, l_ppo, l_ptx), missing = _need(
      summary, ("sft", "gold_mean"), ("ppo", "gold_mean"), ("ppo_ptx", "gold_mean"),
      ("sft", "pretrain_val_loss"), ("ppo", "pretrain_val_loss"), ("ppo_ptx", "pretrain_val_loss"))
  if missing:
    return _claim(text, evaluated=False, reason=missing)
  gain_ppo, gain_ptx = g_ppo - g_sft, g_ptx - g_sft
  tax_ppo, tax_ptx = l_ppo - l_sft, l_ptx - l_sft
  # The SE of PPO-ptx's gold mean minus PPO's, paired over prompts when per-prompt scores are there.
  ppo_m, ptx_m = (_models(summary)[_role_name(summary, r)] for r in ("ppo", "ppo_ptx"))
  if ppo_m.get("gold_per_prompt") and ptx_m.get("gold_per_prompt"):
    d = np.asarray(ptx_m["gold_per_prompt"], np.float64) - np.asarray(ppo_m["gold_per_prompt"], np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
  else:
    se = float(math.hypot(ppo_m.get("gold_se") or 0.0, ptx_m.get("gold_se") or 0.0))
  keeps = g_ptx >= g_ppo - n_se * se
  reason = "" if gain_ppo > 0 else "PPO itself has no gold gain over SFT, so 'keeping' it is vacuous"
  return _claim(text, keeps and l_ptx < l_ppo and gain_ppo > 0, reason=reason, gold_gain_ppo=gain_ppo,
                gold_gain_ptx=gain_ptx, gold_diff_se=se, n_se=n_se, pretrain_loss_ppo=l_ppo,
                pretrain_loss_ptx=l_ptx, loss_regression_ppo=tax_ppo, loss_regression_ptx=tax_ptx)


def _claim_small_beats_large(summary, ratio: float) -> dict:
  text = f"(e) the aligned small model beats a >= {ratio:g}x larger pretrained-only model on gold score"
  (g_small, g_large, n_small, n_large), missing = _need(
      summary, ("aligned", "gold_mean"), ("large_pretrained", "gold_mean"), ("aligned", "num_params"),
      ("large_pretrained", "num_params"))
  if missing:
    return _claim(text, evaluated=False, reason=missing)
  size = n_large / n_small
  if size < ratio:
    return _claim(text, evaluated=False, reason=f"the pretrained model is only {size:.2f}x larger",
                  size_ratio=size)
  return _claim(text, g_small > g_large, gold_aligned=g_small, gold_large_pretrained=g_large, size_ratio=size)


def overoptimisation(history: Sequence[Mapping], *, rm_key: str = "ppo/score", gold_key: str = "eval/gold_mean",
                     margin: float = 0.02) -> dict:
  """Whether a PPO run over-optimises the RM: the final RM score exceeds the RM score at the step
  of peak gold score, and the final gold score is below that peak by more than `margin`.

  RM scores are read as of a step (the last logged at or before it). Returns the numbers, with
  "overoptimised": bool, or {"error": reason} when a series is missing.
  """
  g_steps, g_vals = series(history, gold_key)
  r_steps, r_vals = series(history, rm_key)
  if len(g_steps) < 2 or not len(r_steps):
    return {"error": f"needs >= 2 {gold_key!r} and >= 1 {rm_key!r} values, got {len(g_steps)} and {len(r_steps)}"}
  peak = int(np.argmax(g_vals))
  rm_at_peak = float(value_at(r_steps, r_vals, [g_steps[peak]])[0])
  out = {"peak_gold": float(g_vals[peak]), "peak_step": int(g_steps[peak]), "rm_at_gold_peak": rm_at_peak,
         "final_gold": float(g_vals[-1]), "final_rm": float(r_vals[-1]), "final_step": int(g_steps[-1])}
  out["gold_drop"] = out["peak_gold"] - out["final_gold"]
  out["overoptimised"] = bool(out["final_rm"] > rm_at_peak and out["gold_drop"] > margin)
  return out


def _claim_overoptimisation(summary, margin: float, rm_key: str, gold_key: str) -> dict:
  text = (f"(f) with the smallest KL coefficient, the RM score keeps rising while the gold score falls "
          f"> {margin} below its peak (over-optimisation)")
  sweep = summary.get("beta_sweep") or {}
  if not sweep:
    return _claim(text, evaluated=False, reason="summary has no 'beta_sweep'")
  by_beta = {float(b): h for b, h in sweep.items()}
  per_beta = {str(b): overoptimisation(by_beta[b], rm_key=rm_key, gold_key=gold_key, margin=margin)
              for b in sorted(by_beta)}
  smallest = per_beta[str(min(by_beta))]
  if "error" in smallest:
    return _claim(text, evaluated=False, reason=f"beta={min(by_beta)}: {smallest['error']}", per_beta=per_beta)
  return _claim(text, smallest["overoptimised"], smallest_beta=min(by_beta), margin=margin, per_beta=per_beta)


def check_claims(summary: Mapping, *, rm_accuracy_threshold: float = 0.70, win_threshold: float = 0.6,
                 ptx_within_se: float = 1.0, size_ratio: float = 4.0, overopt_margin: float = 0.02,
                 rm_key: str = "ppo/score", gold_key: str = "eval/gold_mean") -> dict:
  """The InstructGPT claims (a)-(f) on a summary (module docstring); keys a..f -> claim dicts."""
  return {
      "a_sft_beats_pretrained": _claim_sft_beats_pretrained(summary),
      "b_rm_heldout_accuracy": _claim_rm_accuracy(summary, rm_accuracy_threshold),
      "c_ppo_beats_sft": _claim_ppo_beats_sft(summary, win_threshold),
      "d_ptx_keeps_gain_with_less_tax": _claim_ptx(summary, ptx_within_se),
      "e_small_aligned_beats_large_pretrained": _claim_small_beats_large(summary, size_ratio),
      "f_overoptimisation_at_small_beta": _claim_overoptimisation(summary, overopt_margin, rm_key, gold_key),
  }


# -------------------------------------------------------------------------------------- JSON


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None  # strict JSON has no NaN/inf
  if x is None or isinstance(x, str):
    return x
  raise ValueError(f"{_WHERE}: cannot write a {type(x).__name__} to the JSON summary")


def write_summary(summary: Mapping, path: str) -> str:
  """Writes `summary` as strict JSON (numpy scalars/arrays converted, NaN/inf -> null); returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(_jsonable(summary), indent=2, allow_nan=False)
  with open(path, "w") as f:
    f.write(text + "\n")
  return path


def read_summary(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
