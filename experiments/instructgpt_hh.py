"""InstructGPT's three steps on real human preferences (Anthropic HH-RLHF), from any HF checkpoint.

  python -m rlhf_jax.main --config experiments/instructgpt_hh.py --workdir runs/hh --config.init_from=/models/gpt2
  python -m rlhf_jax.main --config experiments/instructgpt_hh.py --workdir runs/hh_smoke \
      --config.init_from=/models/tiny --config.preset=smoke

1. SFT on the chosen dialogues (loss on the assistant reply; the checkpoint's own chat template, or
   our role tokens for a tokenizer without one).
2. A reward model on the chosen/rejected pairs with the K-wise loss (K = 2 here), held-out accuracy
   next to the "longer answer wins" baseline.
3. PPO-ptx from SFT against the RM (value function from the RM, per-token KL to SFT), with the
   pretraining term on Tiny Shakespeare or any text file (`ptx_from`).
Then the held-out prompts are answered by SFT and by PPO-ptx: the RM-judged win rate of PPO-ptx
vs SFT (ties half, with a 95% bootstrap CI), KL to SFT, the ptx loss, and sample outputs, in
summary.json and results.md. There is no gold labeler on real data: the RM's verdict is the RM's,
not a human's. The shared data holds only HH's test files, so train/eval is a hash split of them
(`data.train_split=test`); point `data.train` at HH's train files for the full set.
"""
import json
import os
import time
from pathlib import Path

import jax
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.eval import bootstrap, ppo_monitor
from rlhf_jax.model import heads
from rlhf_jax.recipes import chain
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.train import stages

HERE = Path(__file__).resolve().parent
SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
STAGES = ("sft", "rm", "ppo_ptx")
_FILES = {"sft": "sft.py", "rm": "rm.py", "ppo_ptx": "ppo.py"}
PRESETS = {"default": {},
           # A 2-core CPU with a ~1M-parameter model (experiments/hh_base_model.py): the PPO stage shortened.
           "cpu": {"stages.ppo_ptx.loop.num_steps": 30, "stages.ppo_ptx.batch_size": 16,
                   "stages.ppo_ptx.max_prompt_len": 128, "stages.ppo_ptx.ppo.max_new_tokens": 32,
                   "stages.ppo_ptx.optim.lr": 1e-5, "stages.ppo_ptx.value_optim.lr": 1e-4,
                   "stages.ppo_ptx.loop.eval_every": 10, "stages.ppo_ptx.n_eval_prompts": 64,
                   "eval.n_prompts": 200, "eval.max_new_tokens": 32},
           # Seconds on a tiny checkpoint: what the tests run (each stage also runs its own smoke preset).
           "smoke": {"eval.n_prompts": 16, "eval.max_new_tokens": 8, "eval.n_samples": 2, "eval.bootstrap": 200,
                     "stages.sft.max_len": 64, "stages.rm.max_len": 64, "stages.ppo_ptx.max_prompt_len": 48,
                     "stages.ppo_ptx.ppo.max_new_tokens": 8, "stages.ppo_ptx.ptx_seq_len": 32,
                     "stages.ppo_ptx.loop.num_steps": 2}}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""   # an HF model directory (GPT-2, SmolLM2, Qwen2.5, Llama 3 ...) or a stage workdir
  c.data = data_lib.data_config(train="hh_rlhf/helpful-base", train_split="test", eval_fraction=0.1)
  c.ptx_from = str(SHAKESPEARE)
  c.stages = mlc.ConfigDict({n: load_experiment(str(HERE / f)).get_config() for n, f in _FILES.items()})
  s = c.stages
  s.sft.max_len, s.sft.epochs, s.sft.batch_size, s.sft.optim.lr = 256, 1, 16, 2e-5
  s.rm.max_len, s.rm.epochs, s.rm.batch_size, s.rm.k_max, s.rm.optim.lr = 256, 1, 16, 2, 1e-5
  p = s.ppo_ptx
  p.ppo.ptx_coef, p.max_prompt_len, p.ppo.max_new_tokens, p.batch_size, p.loop.num_steps = 1.0, 192, 48, 32, 100
  p.ppo.temperature, p.optim.lr, p.value_optim.lr, p.ptx_seq_len = 0.7, 1e-6, 1e-5, 128
  c.eval = mlc.ConfigDict(dict(n_prompts=256, max_new_tokens=48, n_samples=5, bootstrap=2000))
  return c


def _wire(config, workdir):
  s = config.stages
  for name in STAGES:
    s[name].seed = config.seed
    s[name].data = config.data.copy_and_resolve_references()
    if config.preset == "smoke":
      s[name].preset = "smoke"
  s.sft.init_from = config.init_from
  s.rm.init_from = os.path.join(workdir, "sft")
  p = s.ppo_ptx
  p.init_from, p.rm_from, p.ptx_from = os.path.join(workdir, "sft"), os.path.join(workdir, "rm"), config.ptx_from


def evaluate(config, workdir) -> dict:
  """SFT vs PPO-ptx on the held-out prompts, judged by the RM (see the module docstring)."""
  p = config.stages.ppo_ptx
  sft = stages.load_model(p.init_from)
  pol = stages.load_model(os.path.join(workdir, "ppo_ptx"), expect="ppo")
  rm, offset = stages.load_reward_model(p.rm_from)
  rm_params = heads.shift_bias(rm.params, offset)
  _, prompts, _ = data_lib.stage_records(p.data, "prompts", os.path.join(workdir, "ppo_ptx"))
  prompts = prompts[:int(config.eval.n_prompts)]
  _, val_rows = data_lib.ptx_rows(p.ptx_from, sft.tok, int(p.ptx_seq_len), workdir, limit=int(p.get("ptx_limit", 0)))
  mon = ppo_monitor.Monitor(sft.config, rm.config, sft.tok, prompts, val_rows[:128], sft.params, rm_params,
                            temperature=p.ppo.temperature, max_prompt_len=p.max_prompt_len,
                            max_new_tokens=int(config.eval.max_new_tokens), seed=config.seed + 1, gold=False)
  responses = mon.sample(pol.params)
  after = mon.model_metrics(pol.params, responses)
  before = mon.initial
  r_pol, r_sft = mon.rm_scores(responses), mon.sft_rm_scores
  wins = (r_pol > r_sft) + 0.5 * (r_pol == r_sft)
  lo, hi = bootstrap.mean_ci(wins, config.eval.bootstrap, config.seed)
  samples = [{"prompt": prompts[i]["messages"][-1]["content"], "sft": mon.sft_responses[i], "ppo_ptx": responses[i]}
             for i in range(min(int(config.eval.n_samples), len(prompts)))]
  return {"n_prompts": len(prompts), "sft": before, "ppo_ptx": after,
          "win_rate_vs_sft_rm": {"mean": float(wins.mean()), "ci95": [lo, hi], "wins": int((wins == 1).sum()),
                                 "ties": int((wins == 0.5).sum()), "losses": int((wins == 0).sum())},
          "samples": samples}


def _markdown(summary) -> str:
  rm, ev = summary["stages"]["rm"]["result"], summary["eval"]
  w = ev["win_rate_vs_sft_rm"]
  lines = ["# InstructGPT on HH-RLHF", "",
           f"RM held-out pairwise accuracy: {rm['eval_pairwise_accuracy']:.3f} "
           f"(longer-answer baseline {rm['length_baseline_eval']:.3f}; {rm['eval_pairs']} pairs)",
           f"PPO-ptx vs SFT, judged by the RM on {ev['n_prompts']} held-out prompts: win rate {w['mean']:.3f} "
           f"[95% CI {w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] ({w['wins']} wins / {w['ties']} ties / {w['losses']} losses)",
           "", "| model | RM score | KL to SFT | ptx loss | length |", "|---|---|---|---|---|"]
  for name in ("sft", "ppo_ptx"):
    m = ev[name]
    lines.append(f"| {name} | {m['rm_score_mean']:.3f} | {m['kl_to_sft']:.3f} | {m.get('pretrain_val_loss', float('nan')):.3f} "
                 f"| {m['mean_response_length']:.1f} |")
  lines += ["", "## Samples", ""]
  for s in ev["samples"]:
    lines += [f"**prompt**: {s['prompt']!r}", f"- SFT: {s['sft']!r}", f"- PPO-ptx: {s['ppo_ptx']!r}", ""]
  return "\n".join(lines) + "\n"


def train(config, workdir):
  t0 = time.time()
  config = rcfg.apply_preset(config, PRESETS)
  if not config.init_from:
    raise ValueError("instructgpt_hh.py: set --config.init_from to a Hugging Face model directory (e.g. GPT-2)")
  _wire(config, workdir)
  results = {}
  for name in STAGES:
    chain.run_stage(name, HERE / _FILES[name], config.stages[name], workdir, results)
  summary = {"stages": results, "eval": evaluate(config, workdir), "wall_seconds": time.time() - t0,
             "init_from": config.init_from, "devices": [str(d) for d in jax.devices()][:1]}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(_markdown(summary))
  print(_markdown(summary))
  return {"rm_accuracy": results["rm"]["result"]["eval_pairwise_accuracy"],
          "win_rate_vs_sft_rm": summary["eval"]["win_rate_vs_sft_rm"]["mean"]}
