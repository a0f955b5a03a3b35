"""The frontier: alignment methods from one SFT model and one set of comparisons, at equal policy compute,
each evaluated at several checkpoints on the same held-out prompts (`eval.frontier`).

A method is a stage (an experiment file's train(config, workdir), run through `chain.run_stage`, so a
re-run skips finished methods) of one of four kinds, which say how it is sized and where its
checkpoints are:
  ppo       experiments/ppo.py (PPO, PPO-ptx)
  group     experiments/rloo.py (RLOO, GRPO)
  dpo       experiments/dpo.py (K-wise / pairwise / Plackett-Luce / IPO DPO)
  iterated  experiments/iterated_rlhf.py (its PPO rounds; round r's checkpoints follow round r-1's)
Best-of-n (n in config.best_of_n) is evaluation only.

Budget: `budget.policy_tokens`, the token positions (padding included) that go through the policy's
trained forward + backward passes, ptx rows included. Per step that is
  ppo / iterated  batch_size x (max_prompt_len + max_new_tokens) x ppo_epochs  (+ ptx_batch_size x ptx_len x ppo_epochs)
  group           batch_size x group_size x (max_prompt_len + max_new_tokens) x ppo_epochs  (+ the ptx term)
  dpo             batch_size x k_max x max_len
and a method runs round(budget / per step) steps. Not counted: sampling, reference / value / RM
passes, DPO's one-off reference log-probs, iterated RLHF's labelling and RM updates (all reported
as wall time instead).
"""
from __future__ import annotations

import json
import math
import os
import time

import ml_collections as mlc
import numpy as np

from rlhf_jax.data import lm_data, synthetic
from rlhf_jax.eval import bootstrap, frontier as frontier_eval, plots
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.recipes import chain
from rlhf_jax.train import checkpoint, stages

KINDS = ("ppo", "group", "dpo", "iterated")
MEASURE = ("policy forward+backward token positions (padded; ptx rows included; sampling, reference/value/RM "
           "passes, DPO's one-off reference log-probs and iterated RLHF's labelling/RM updates not counted)")


# ----------------------------------------------------------------------------- sizing


def _ptx_len(c, base: str) -> int:
  if int(c.get("ptx_seq_len", 0)) > 0:
    return int(c.ptx_seq_len)
  return int(stages.read_stage(os.path.join(base, "pretrain"))["data"]["seq_len"])


def tokens_per_step(kind: str, c, base: str) -> int:
  """Policy forward+backward token positions of one step of a method's stage config `c`."""
  if kind == "dpo":
    return int(c.batch_size) * int(c.k_max) * int(c.max_len)
  if kind == "iterated":
    return tokens_per_step("ppo", c.ppo, base)
  algo = c.ppo if kind == "ppo" else c.pg
  rows = int(c.batch_size) * (int(algo.group_size) if kind == "group" else 1)
  per = rows * (int(c.max_prompt_len) + int(algo.max_new_tokens))
  if float(algo.ptx_coef) > 0:
    per += int(c.ptx_batch_size) * _ptx_len(c, base)
  return per * int(algo.ppo_epochs)


def _set_loop(loop_cfg, steps: int, n_checkpoints: int) -> None:
  with loop_cfg.unlocked():
    loop_cfg.num_steps = steps
    loop_cfg.ckpt_every = max(1, math.ceil(steps / max(1, n_checkpoints)))
    loop_cfg.max_to_keep = n_checkpoints + 2
    loop_cfg.eval_every = 0
    loop_cfg.log_every = max(1, min(int(loop_cfg.log_every), steps))
    loop_cfg.progress = False


def size_stage(kind: str, c, base: str, budget: int, n_checkpoints: int) -> dict:
  """Sets the stage's steps (and checkpoint spacing) from the budget; returns its sizing record."""
  per = tokens_per_step(kind, c, base)
  steps = max(1, int(round(budget / per)))
  if kind == "iterated":
    rounds = int(c.rounds)
    per_round = max(1, steps // rounds)
    _set_loop(c.ppo.loop, per_round, max(1, math.ceil(n_checkpoints / rounds)))
    steps = per_round * rounds
  else:
    _set_loop(c.loop, steps, n_checkpoints)
  return {"kind": kind, "steps": steps, "tokens_per_step": per, "policy_tokens": steps * per}


def wire(kind: str, c, base: str, seed: int) -> None:
  """Points a method's stage config at the shared SFT model, RM, comparisons and pretraining data."""
  join = lambda n: os.path.join(base, n)
  with c.unlocked():
    c.seed = seed
    c.init_from = join("sft")
    if kind == "dpo":
      c.data.train, c.comparisons_from = "synthetic", join("rm")
      return
    c.rm_from, c.ptx_from = join("rm"), join("pretrain")
    if kind == "iterated":
      return
    c.data.train, c.ptx_seq_len, c.n_eval_prompts = "synthetic", 0, 0


def checkpoints(kind: str, stage_dir: str, c) -> list[tuple[int, str, int]]:
  """(global step, stage dir, checkpoint step) of every saved checkpoint of a finished method."""
  if kind == "iterated":
    per_round = int(c.ppo.loop.num_steps)
    dirs = [(os.path.join(stage_dir, f"round{r}", "ppo"), r * per_round) for r in range(int(c.rounds))]
  else:
    dirs = [(stage_dir, 0)]
  return [(offset + s, d, s) for d, offset in dirs for s in checkpoint.saved_steps(os.path.join(d, "checkpoints"))]


# ----------------------------------------------------------------------------- evaluation


def _cached(path: str, fn):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  out = fn()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, default=float)
  return out


def make_evaluator(config, base: str) -> frontier_eval.FrontierEval:
  ev = config.eval
  sft = stages.load_model(os.path.join(base, "sft"), expect="sft")
  rm, offset = stages.load_reward_model(os.path.join(base, "rm"))
  stages.check_same_tokenizer(sft, rm)
  pre = os.path.join(base, "pretrain")
  data_cfg = stages.read_stage(pre)["data"]
  _, _, val_rows = lm_data.prepare_lm_data(mlc.ConfigDict(data_cfg), int(data_cfg["seq_len"]), pre)
  prompts = synthetic.prompts(int(ev.n_prompts), seed=int(ev.prompt_seed), split="eval")
  return frontier_eval.FrontierEval(sft, rm, offset, prompts, val_rows[:int(ev.n_val_rows)],
                                    temperature=float(ev.temperature), max_prompt_len=int(ev.max_prompt_len),
                                    max_new_tokens=int(ev.max_new_tokens), seed=int(config.seed),
                                    n_boot=int(ev.n_boot))


def evaluate_method(ev, name: str, kind: str, stage_dir: str, c, tokens_per_step: int, cache_dir: str) -> list[dict]:
  """The method's points, one per saved checkpoint (cached as JSON under cache_dir)."""
  points = []
  for step, d, ckpt_step in checkpoints(kind, stage_dir, c):
    cfg = GPTConfig(**stages.read_stage(d)["model"])

    def score(d=d, cfg=cfg, ckpt_step=ckpt_step, step=step):
      t = time.time()
      params = checkpoint.load_params(os.path.join(d, "checkpoints"), step=ckpt_step)
      return {**ev(f"{name}@{step}", cfg, params), "eval_seconds": time.time() - t}
    point = _cached(os.path.join(cache_dir, f"{name}@{step}.json"), score)
    points.append({"step": step, "policy_tokens": step * tokens_per_step, **point})
  return points


def gold_per_nat(point: dict, sft_gold: float, kl_floor: float) -> float | None:
  """(gold - SFT's gold) / KL to SFT, or None below kl_floor nats (the ratio is noise there)."""
  kl = point.get("kl_to_sft")
  if kl is None or not kl >= kl_floor:
    return None
  return (float(point["gold_mean"]) - sft_gold) / float(kl)


def _paired(a: dict, b: dict, config) -> dict:
  diff = np.asarray(a["gold_per_prompt"]) - np.asarray(b["gold_per_prompt"])
  lo, hi = bootstrap.mean_ci(diff, int(config.eval.n_boot), int(config.seed))
  return {"gold_difference": float(diff.mean()), "ci95": [lo, hi]}


# ----------------------------------------------------------------------------- the run


def run(config, workdir: str, base: str, methods: dict) -> dict:
  """Runs and evaluates every method in config.methods (comma-separated names of `methods`:
  {name: (experiment file, kind)}) from the pretrain/sft/rm stages in `base`. config sections:
  stages.<name> (each method's stage config), budget (policy_tokens, n_checkpoints), best_of_n
  (ns), eval, kl_floor, seed. Writes summary.json, results.md and frontier.png; returns the summary."""
  t0 = time.time()
  names = [n.strip() for n in str(config.methods).split(",") if n.strip()]
  unknown = [n for n in names if n not in methods and n != "best_of_n"]
  if unknown:
    raise ValueError(f"config.methods: unknown method(s) {unknown}; known: {sorted(methods) + ['best_of_n']}")
  ev = make_evaluator(config, base)
  sft_gold = float(ev.sft_point["gold_mean"])
  cache = os.path.join(workdir, "eval")
  results, summary = {}, {"methods": {}}
  for name in names:
    if name == "best_of_n":
      def bon_points():
        t = time.time()
        points = {str(n): p for n, p in ev.best_of_n(tuple(config.best_of_n)).items()}
        return {"points": points, "eval_seconds": time.time() - t}
      bon = _cached(os.path.join(cache, "best_of_n.json"), bon_points)
      summary["methods"]["best_of_n"] = {"kind": "best_of_n", "steps": 0, "tokens_per_step": 0, "policy_tokens": 0,
                                         "train_seconds": 0.0, "eval_seconds": bon["eval_seconds"],
                                         "points": [bon["points"][str(n)] for n in config.best_of_n]}
      continue
    file, kind = methods[name]
    c = config.stages[name]
    wire(kind, c, base, int(config.seed))
    sizing = size_stage(kind, c, base, int(config.budget.policy_tokens), int(config.budget.n_checkpoints))
    stage = chain.run_stage(name, file, c, workdir, results)
    points = evaluate_method(ev, name, kind, os.path.join(workdir, name), c, sizing["tokens_per_step"], cache)
    summary["methods"][name] = {**sizing, "train_seconds": stage["seconds"],
                                "eval_seconds": sum(p["eval_seconds"] for p in points),
                                "points": points, "stage_result": stage["result"]}
    print(f"==> {name}: " + ", ".join(f"step {p['step']}: gold {p['gold_mean']:.3f} KL {p['kl_to_sft']:.3f}"
                                      for p in points))
  _conclude(summary, config, ev.sft_point, sft_gold)
  summary["wall_seconds"] = time.time() - t0     # this invocation (finished methods come from the cache)
  summary["method_seconds"] = {n: m["train_seconds"] + m["eval_seconds"] for n, m in summary["methods"].items()}
  write(summary, workdir)
  return summary


def _conclude(summary: dict, config, sft_point: dict, sft_gold: float) -> None:
  methods = summary["methods"]
  ratios = {}
  for name, m in methods.items():
    final = m["points"][-1] if m["points"] else None
    m["final_gold_per_nat"] = gold_per_nat(final, sft_gold, float(config.kl_floor)) if final else None
    if m["final_gold_per_nat"] is not None:
      ratios[name] = m["final_gold_per_nat"]
  summary["sft"] = sft_point
  summary["budget"] = {"measure": MEASURE, "policy_tokens": int(config.budget.policy_tokens),
                       "n_checkpoints": int(config.budget.n_checkpoints)}
  summary["settings"] = config.eval.to_dict()
  summary["kl_floor"] = float(config.kl_floor)
  summary["most_gold_per_nat"] = max(ratios, key=ratios.get) if ratios else None
  finals = {n: m["points"][-1]["gold_mean"] for n, m in methods.items() if m["points"]}
  summary["highest_gold"] = max(finals, key=finals.get) if finals else None
  if "dpo_kwise" in methods and "dpo_pairwise" in methods:
    k, p = methods["dpo_kwise"], methods["dpo_pairwise"]
    summary["kwise_vs_pairwise_dpo"] = {
        **_paired(k["points"][-1], p["points"][-1], config),
        "kwise_final_gold": k["points"][-1]["gold_mean"], "pairwise_final_gold": p["points"][-1]["gold_mean"],
        "kwise_heldout_pair_accuracy": k["stage_result"].get("eval_pairwise_accuracy"),
        "pairwise_heldout_pair_accuracy": p["stage_result"].get("eval_pairwise_accuracy"),
        "note": "same train comparisons and equal policy tokens (dpo.expand_pairs); gold difference kwise - "
                "pairwise at the final checkpoints, paired bootstrap over prompts"}


# ----------------------------------------------------------------------------- outputs


def _fmt(x, spec=".3f") -> str:
  return "-" if x is None else format(float(x), spec)


def format_table(summary: dict) -> str:
  sft = summary["sft"]
  floor = summary["kl_floor"]
  lines = ["| method | step | policy tokens (k) | KL to SFT | gold [95% CI] | RM score | pretrain loss | "
           "Δgold / KL | train s |", "|---|---|---|---|---|---|---|---|---|",
           f"| sft | 0 | 0 | 0.000 | {_fmt(sft['gold_mean'])} [{_fmt(sft['gold_ci95'][0])}, {_fmt(sft['gold_ci95'][1])}] "
           f"| {_fmt(sft['rm_score_mean'])} | {_fmt(sft['pretrain_val_loss'])} | - | - |"]
  for name, m in summary["methods"].items():
    for i, p in enumerate(m["points"]):
      last = i == len(m["points"]) - 1
      step = f"n={p['n']}" if "n" in p else str(p["step"])
      ratio = gold_per_nat(p, sft["gold_mean"], floor)
      lines.append(f"| {name} | {step} | {p.get('policy_tokens', 0) / 1e3:.0f} | {_fmt(p['kl_to_sft'])} | "
                   f"{_fmt(p['gold_mean'])} [{_fmt(p['gold_ci95'][0])}, {_fmt(p['gold_ci95'][1])}] | "
                   f"{_fmt(p.get('rm_score_mean'))} | {_fmt(p.get('pretrain_val_loss'))} | {_fmt(ratio, '+.3f')} | "
                   f"{_fmt(m['train_seconds'], '.0f') if last else ''} |")
  return "\n".join(lines)


def headline(summary: dict) -> list[str]:
  b = summary["budget"]
  secs = summary.get("method_seconds", {})
  out = [f"Budget per method: {b['policy_tokens'] / 1e3:.0f}k {b['measure']}.",
         f"SFT gold {summary['sft']['gold_mean']:.3f}. Most gold per nat of KL (final checkpoints, KL >= "
         f"{summary['kl_floor']} nats): {summary['most_gold_per_nat']}; highest final gold: {summary['highest_gold']}.",
         f"Time: {sum(secs.values()):.0f} s of training + evaluation over all methods "
         f"({', '.join(f'{n} {v:.0f}' for n, v in secs.items())}); this invocation {summary.get('wall_seconds', 0):.0f} s."]
  kp = summary.get("kwise_vs_pairwise_dpo")
  if kp:
    out.append(f"K-wise vs pairwise DPO (equal data and policy tokens): gold {kp['kwise_final_gold']:.3f} vs "
               f"{kp['pairwise_final_gold']:.3f}, difference {kp['gold_difference']:+.3f} "
               f"[95% CI {kp['ci95'][0]:+.3f}, {kp['ci95'][1]:+.3f}]; held-out implicit-reward pair accuracy "
               f"{_fmt(kp['kwise_heldout_pair_accuracy'])} vs {_fmt(kp['pairwise_heldout_pair_accuracy'])}.")
  return out


def _strip(x):
  if isinstance(x, dict):
    return {k: _strip(v) for k, v in x.items() if k not in ("gold_per_prompt", "samples")}
  if isinstance(x, list):
    return [_strip(v) for v in x]
  return x


def write(summary: dict, workdir: str) -> None:
  curves = {name: ([summary["sft"]] if m["kind"] != "best_of_n" else []) + m["points"]
            for name, m in summary["methods"].items()}
  plots.plot_frontier(curves, os.path.join(workdir, "frontier.png"), baseline=summary["sft"]["gold_mean"],
                      title=f"Gold vs KL to SFT, {summary['budget']['policy_tokens'] / 1e3:.0f}k policy tokens per method")
  text = "\n".join(["# Frontier: gold score vs KL to SFT", "", *headline(summary), "", format_table(summary)])
  print(text)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(_strip(summary), f, indent=2, default=float)
