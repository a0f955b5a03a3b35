"""K-wise batching vs shuffled pairs for a reward model on OpenAssistant human rankings, at equal compute.

  python -m rlhf_jax.main --config experiments/rm_oasst_kwise.py --workdir runs/rm_oasst
  python -m rlhf_jax.main --config experiments/rm_oasst_kwise.py --workdir runs/rm_oasst_smoke --config.preset=smoke
  python -m rlhf_jax.main --config experiments/rm_oasst_kwise.py --workdir runs/rm_oasst_units --sweep
  (the sweep: compare.unit real vs padded)

Data: oasst1 English validation trees -> 417 prompts with K = 2..5 ranked replies (~1,000 pairs),
split train/eval by a hash of the prompt dialogue (a new split per repeat).
(a) kwise: all K replies of a prompt in one batch element, loss over its C(K,2) pairs
    (InstructGPT); K forward passes give C(K,2) pair terms.
(b) pairs: the same train pairs (`comparisons_to_pairs`) shuffled as independent K=2 examples;
    2 forward passes per pair.
Equal compute (`rm_data.equal_compute_plan`): K-wise trains `compare.kwise_epochs` epochs; pairs
get as many steps as match its response passes — "real" (unpadded responses: the algorithmic
count) or "padded" (slots incl. K-wise padding to k_max: what is actually computed). Both modes
use the same slots per step (pairs_per_batch = prompts_per_batch * k_max / 2) and are scored on
the same held-out K-way records, i.e. the same held-out pairs. Each repeat r uses split salt
"<salt>#r" and seed seed+r; kwise and pairs share that split, BPE and init (paired comparison).
"""
import os
import time

import ml_collections as mlc
import numpy as np

from rlhf_jax import config as rcfg
from rlhf_jax.data import comparisons
from rlhf_jax.recipes import rm as rm_recipe
from rlhf_jax.train import rm_data

PRESETS = {
    "default": {},
    # Seconds of compute (mostly jit compiles): what the tests run.
    "smoke": {"data.vocab_size": 1024, "model.preset": "nano", "max_len": 64, "compare.repeats": 1,
              "compare.kwise_epochs": 0.25, "compare.prompts_per_batch": 16, "loop.log_every": 4,
              "loop.ckpt_every": 0},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.data = mlc.ConfigDict(dict(manual_dir="../shared/data/oasst1_en_validation", data_dir="", split="validation",
                               name="oasst_rankings/rankings", eval_fraction=0.2, split_salt="", split_by="dialogue",
                               vocab_size=4096))
  c.model = rcfg.model("tiny", dropout=0.1)
  c.max_len = 192
  # kwise_epochs: 1 as in InstructGPT (3 epochs overfit this small set: held-out 0.674 -> 0.640).
  c.compare = mlc.ConfigDict(dict(modes="kwise,pairs", unit="real", kwise_epochs=1.0, prompts_per_batch=8,
                                  pairs_per_batch=-1, k_max=5, repeats=3))
  c.optim = rcfg.optim(lr=5e-4, warmup_steps=10, weight_decay=0.01, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=20, eval_every=0, ckpt_every=200)  # steps: from the compute plan
  c.mesh = rcfg.mesh()
  c.lm = mlc.ConfigDict(dict(num_steps=0, seq_len=128, batch_size=32, eval_batches=4,
                             optim=rcfg.optim(lr=2e-3, warmup_steps=20, weight_decay=0.1)))
  return c


def get_sweep():
  """Equal real response passes vs equal computed (padded) slots."""
  return [{"compare.unit": u} for u in rm_data.UNITS]


def run_repeat(config, workdir, recs, r):
  d, cmp = config.data, config.compare
  train_recs, eval_recs = rm_data.split_by_prompt(recs, d.eval_fraction, f"{d.split_salt}#{r}", d.split_by)
  tok = rm_data.get_tokenizer(train_recs, d.vocab_size, workdir)
  model_cfg = rm_data.model_config(config.model, tok, config.max_len)
  lm_params, lm_result = rm_data.lm_warmup(config, workdir, model_cfg, tok, train_recs, eval_recs)
  n = rm_data.describe(train_recs)
  b_pairs = cmp.pairs_per_batch if cmp.pairs_per_batch > 0 else cmp.prompts_per_batch * cmp.k_max // 2
  plan = rm_data.equal_compute_plan(n["prompts"], n["responses"], n["pairs"], cmp.kwise_epochs,
                                    cmp.prompts_per_batch, b_pairs, cmp.k_max, cmp.unit)
  data = {"kwise": train_recs, "pairs": comparisons.comparisons_to_pairs(train_recs)}
  out = {"train": n, "eval": rm_data.describe(eval_recs), "lm_warmup": lm_result,
         "length_baseline_eval": rm_data.length_baseline(eval_recs)["accuracy"]}
  for mode in [m.strip() for m in cmp.modes.split(",") if m.strip()]:
    if mode not in plan:
      raise ValueError(f"rm_oasst_kwise.py: compare.modes: unknown mode {mode!r}; expected kwise and/or pairs")
    t, c = time.perf_counter(), time.process_time()
    _, res = rm_recipe.fit_reward_model(
        config, os.path.join(workdir, mode, "rm"), model_cfg, tok, data[mode], eval_recs,
        params=rm_data.fresh_rm_params(model_cfg, config.seed + r, lm_params),
        k_max=cmp.k_max if mode == "kwise" else 2, eval_k_max=cmp.k_max, batch_size=plan[mode]["batch_size"],
        num_steps=plan[mode]["steps"], seed=config.seed + r)
    out[mode] = {**plan[mode], "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                 "s_per_step": rm_data.steady_s_per_step(os.path.join(workdir, mode, "rm"), "rm"),
                 **{k: res[k] for k in ("eval_pairwise_accuracy", "eval_prompt_mean_accuracy", "eval_loss",
                                        "eval_pairs", "train_loss")}}
  return out


def summarise(reps, modes):
  rows = {}
  for m in modes:
    acc = np.array([x[m]["eval_pairwise_accuracy"] for x in reps], float)
    rows[m] = {"acc_mean": acc.mean(), "acc_std": acc.std(ddof=1) if len(acc) > 1 else float("nan"),
               **{k: float(np.mean([x[m][k] for x in reps]))
                  for k in ("steps", "real_passes", "padded_passes", "pair_epochs", "wall_s", "cpu_s",
                            "s_per_step")}}
  base = np.array([x["length_baseline_eval"] for x in reps], float)
  rows["length_baseline"] = {"acc_mean": base.mean(), "acc_std": base.std(ddof=1) if len(base) > 1 else float("nan")}
  if {"kwise", "pairs"} <= set(modes):
    diff = np.array([x["kwise"]["eval_pairwise_accuracy"] - x["pairs"]["eval_pairwise_accuracy"] for x in reps])
    rows["kwise_minus_pairs"] = {"acc_mean": diff.mean(),
                                 "acc_se": diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")}
  return rows


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  d = config.data
  manual = rm_data.resolve_data_dir(d.manual_dir, "data.manual_dir", "en-validation.jsonl (oasst1 message rows)")
  recs = rm_data.load_comparisons([d.name], d.split, manual, d.data_dir or os.path.join(workdir, "tfds"))
  modes = [m.strip() for m in config.compare.modes.split(",") if m.strip()]
  reps = [run_repeat(config, os.path.join(workdir, f"rep{r}"), recs, r) for r in range(config.compare.repeats)]
  summary = summarise(reps, modes)
  print(f"\nOASST RM, equal compute ({config.compare.unit} passes), {len(reps)} repeat(s):")
  print("| mode | held-out pair acc (mean ± std) | steps | real passes | padded passes | pair epochs | wall s | cpu s "
        "| s/step |")
  print("|---|---|---|---|---|---|---|---|---|")
  for m in modes:
    s = summary[m]
    print(f"| {m} | {s['acc_mean']:.3f} ± {s['acc_std']:.3f} | {s['steps']:.0f} | {s['real_passes']:.0f} | "
          f"{s['padded_passes']:.0f} | {s['pair_epochs']:.2f} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | "
          f"{s['s_per_step']:.2f} |")
  print(f"| longer-wins baseline | {summary['length_baseline']['acc_mean']:.3f} | | | | | | | |")
  if "kwise_minus_pairs" in summary:
    diff = summary["kwise_minus_pairs"]
    print(f"kwise - pairs accuracy (paired over repeats): {diff['acc_mean']:+.3f} ± {diff['acc_se']:.3f} (s.e.)")
  result = {"unit": config.compare.unit, "summary": summary, "repeats": reps}
  rm_data.write_json(os.path.join(workdir, "result.json"), result)
  return result
