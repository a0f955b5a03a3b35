"""Evaluates every model of an InstructGPT pipeline run and writes summary.json, a table and plots.

Models: pretrained, pretrained_large (pretraining only), sft, ppo, ppo_ptx — each sampled on the
same held-out prompts with the same settings but its own PRNG key (independent samples: a shared key
would make two similar policies tie on most prompts), judged by the gold labeler (never used in
training except to label comparisons), the RM, KL to SFT and held-out pretraining loss; Elo
ratings from all pairwise gold comparisons; the paper's claims checked with their numbers.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections as mlc

from rlhf_jax.data import lm_data, synthetic
from rlhf_jax.eval import bootstrap, elo, plots, policy_eval, report, rm_diagnostics
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import loop, stages

TRACE_KEYS = ("ppo/approx_kl", "ppo/clip_frac", "ppo/explained_variance", "ppo/value_clip_frac", "ppo/kl",
              "ppo/score", "eval/gold_mean", "eval/win_rate_vs_sft_gold")
MODELS = {"pretrained": "pretrain", "pretrained_large": "pretrain_large", "sft": "sft", "ppo": "ppo",
          "ppo_ptx": "ppo_ptx"}


def evaluate_all(config, workdir: str, stage_results: dict) -> dict:
  ev = config.eval
  join = lambda n: os.path.join(workdir, n)
  prompts = synthetic.prompts(ev.n_prompts, seed=ev.prompt_seed, split="eval")
  settings = policy_eval.SampleSettings(max_prompt_len=ev.max_prompt_len, max_new_tokens=ev.max_new_tokens,
                                        temperature=ev.temperature)
  max_len = ev.max_prompt_len + ev.max_new_tokens + 1
  rm_info, rm_cfg, _, rm_params = stages.load_stage(join("rm"), expect="rm")
  pre_info = stages.read_stage(join("pretrain"))
  data_cfg = mlc.ConfigDict(pre_info["data"])
  _, _, val_rows = lm_data.prepare_lm_data(data_cfg, data_cfg.seq_len, join("pretrain"))

  loaded, responses = {}, {}
  rng = jax.random.PRNGKey(int(config.seed) + 99)
  for i, (name, stage) in enumerate(MODELS.items()):
    _, cfg, tok, params = stages.load_stage(join(stage))
    loaded[name] = (cfg, tok, params)
    responses[name] = policy_eval.sample_policy(cfg, params, tok, prompts, jax.random.fold_in(rng, i), settings)
    print(f"sampled {name}: {responses[name][:3]}")
  sft_cfg, sft_tok, sft_params = loaded["sft"]

  models = {}
  for name, (cfg, tok, params) in loaded.items():
    same_vocab = tok.vocab_size == sft_tok.vocab_size and cfg.vocab_size == sft_cfg.vocab_size
    m = policy_eval.evaluate_policy(
        name, cfg, params, tok, prompts, responses[name], ref_params=sft_params if same_vocab and
        cfg.d_model == sft_cfg.d_model and cfg.n_layer == sft_cfg.n_layer else None,
        sft_responses=responses["sft"], rm=(rm_cfg, rm_params, rm_info["reward_offset"]),
        pretrain_val_rows=val_rows[:256], max_len=max_len, temperature=ev.temperature, per_prompt=True)
    m["num_params"] = gpt.num_params(params)
    models[name] = m

  comparisons = [json.loads(line) for line in open(join("rm/comparisons_eval.jsonl"))]
  shifted_rm = heads.shift_bias(rm_params, rm_info["reward_offset"])
  rm_acc = policy_eval.rm_pairwise_accuracy(rm_cfg, shifted_rm, sft_tok, comparisons, max_len=max_len)
  # Can this RM guide PPO at all? Best-of-n of SFT samples by the RM vs by gold (see rm_diagnostics).
  bon = rm_diagnostics.best_of_n(sft_cfg, sft_params, sft_tok, rm_cfg, shifted_rm, prompts,
                                 jax.random.PRNGKey(int(config.seed) + 123), n=ev.best_of_n,
                                 temperature=ev.temperature, max_prompt_len=ev.max_prompt_len,
                                 max_new_tokens=ev.max_new_tokens)
  matches = elo.gold_matches(prompts, responses)
  ratings = elo.fit_elo(list(MODELS), matches, anchor="sft")
  histories = {n: loop.read_metrics(join(n)) for n in stage_results if n.startswith(("ppo", "beta_"))}
  summary = {
      "models": models,
      "rm": {"heldout_accuracy": rm_acc, "noise_temperature": float(config.stages.rm.label.noise_temperature),
             "train": stage_results.get("rm", {}).get("result"), "best_of_n_sft": bon},
      "elo": {k: ratings[k] for k in ("ratings", "se", "method", "anchor")},
      "pairwise_gold": pairwise(matches),
      "beta_sweep": {float(n.split("_", 1)[1]): histories[n] for n in histories if n.startswith("beta_")},
      "stage_seconds": {n: r.get("seconds") for n, r in stage_results.items()},
      "settings": {"n_eval_prompts": ev.n_prompts, "temperature": ev.temperature},
  }
  summary["ppo_traces"] = {n: [{k: h[k] for k in ("step",) + TRACE_KEYS if k in h} for h in histories.get(n, [])
                               if any(k in h for k in TRACE_KEYS)] for n in ("ppo", "ppo_ptx")}
  summary["claims"] = report.check_claims(summary)
  summary["_histories"] = {"rm": loop.read_metrics(join("rm")), "ppo": histories.get("ppo", []),
                           "ppo_ptx": histories.get("ppo_ptx", [])}
  return summary


def pairwise(matches) -> dict:
  """{"a vs b": `bootstrap.win_tie_loss` of a's per-prompt outcomes against b} for every model pair of
  `elo.gold_matches` (a listed first: MODELS order)."""
  by_pair = {}
  for a, b, outcome in matches:
    by_pair.setdefault(f"{a} vs {b}", []).append(outcome)
  return {k: bootstrap.win_tie_loss(v) for k, v in by_pair.items()}


def format_pairwise(pairs: dict) -> str:
  rows = ["| pair | wins | ties | losses | win rate (ties ½) | 95% CI |", "|---|---|---|---|---|---|"]
  rows += [f"| {k} | {w['wins']} | {w['ties']} | {w['losses']} | {w['win_rate']:.3f} | "
           f"[{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] |" for k, w in pairs.items()]
  return "\n".join(rows)


def _bon_line(b: dict) -> str:
  acc = b["onpolicy_pair_accuracy"]
  return (f"RM on SFT's own samples (best of {b['n']}, gold): random sample {b['gold_mean_sample']:.3f}, "
          f"RM's pick {b['gold_best_of_n_rm']:.3f}, gold's pick {b['gold_best_of_n_oracle']:.3f}; "
          f"pair accuracy {'-' if acc is None else f'{acc:.3f}'} over {b['n_pairs']} pairs")


def write(summary: dict, workdir: str) -> None:
  hist = summary.pop("_histories")
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  p = lambda n: os.path.join(workdir, "plots", n)
  plots.plot_rm_accuracy(hist["rm"], p("rm_accuracy.png"))
  plots.plot_ppo_curves({"ppo": hist["ppo"], "ppo_ptx": hist["ppo_ptx"]}, p("ppo_curves.png"))
  plots.plot_ppo_curves({"ppo": hist["ppo"], "ppo_ptx": hist["ppo_ptx"]}, p("ppo_trust_region.png"),
                        panels=plots.TRUST_PANELS)
  plots.plot_gold_bars(summary, p("gold_by_model.png"))
  if summary["beta_sweep"]:
    plots.plot_beta_sweep(summary["beta_sweep"], p("beta_sweep.png"), x="step")
  table = report.format_table(summary)
  lines = [table, "", "Gold pairwise (each model its own samples; 95% percentile bootstrap over prompts):",
           format_pairwise(summary["pairwise_gold"]), "", "Elo (Bradley-Terry, SFT = 1000): " + ", ".join(
      f"{k} {v:.0f}" for k, v in summary["elo"]["ratings"].items()),
      f"RM held-out pairwise accuracy: {summary['rm']['heldout_accuracy']:.3f}", _bon_line(summary["rm"]["best_of_n_sft"]),
      "", "Claims:"]
  for key, c in summary["claims"].items():
    nums = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in c["numbers"].items()
                     if not isinstance(v, (dict, list)))
    status = "HOLDS" if c["holds"] else ("FAILS" if c["evaluated"] else "NOT EVALUATED")
    lines.append(f"  [{status}] {key}: {c['claim']} ({nums}) {c['reason']}".rstrip())
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  report.write_summary(summary, os.path.join(workdir, "summary.json"))
