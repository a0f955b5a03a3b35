"""InstructGPT step 2 — a reward model on K-way rankings, trained with the K-wise loss.

Comparisons come from one of two places:
  * a file or builder (`data.train` = JSONL path / `hh_rlhf/helpful-base` / `oasst_rankings/rankings`,
    TRL preference pairs or our K-way rankings): human (or AI) preferences, K = 2..9;
  * `data.train=synthetic`: the built-in world's labelling (`label_synthetic`): K ~ U[k_min, k_max]
    samples per prompt from the SFT (and pretrained) policies, ranked by the gold labeler.
The RM is the starting model with its unembedding replaced by a scalar head read at the EOS; its
loss is -1/C(K,2) Σ log σ(r_w − r_l) over all pairs of a prompt in one batch element
(`steps.kwise_rm_loss_fn`). Afterwards the bias is normalised so that demonstrations (the
synthetic world's, or the best-ranked responses of the train comparisons) score mean 0.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections as mlc
import numpy as np

from rlhf_jax import generation
from rlhf_jax.data import pipeline, synthetic
from rlhf_jax.model import heads, lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.train import rm_data, stages, steps, supervised


def label_config() -> mlc.ConfigDict:
  """Gold-labelling settings for `data.train=synthetic` (InstructGPT: K = 4..9)."""
  return mlc.ConfigDict(dict(n_train_prompts=1500, n_eval_prompts=300, k_min=4, k_max=9, temperature=1.0,
                             noise_temperature=0.0, max_new_tokens=24, prompt_seed=1, batch_size=128,
                             pretrained_fraction=0.5))


def _samples_needed(lc, has_second: bool) -> tuple[int, int]:
  """Samples per prompt to draw from (first, second) policy: the most any K in [k_min, k_max] takes
  (a prompt with K answers takes round(K * pretrained_fraction) from the second), not k_max from each."""
  ks = range(int(lc.k_min), int(lc.k_max) + 1)
  n_pre = {k: int(round(k * lc.pretrained_fraction)) if has_second else 0 for k in ks}
  return max(k - n_pre[k] for k in ks), max(n_pre.values())


def label_synthetic(config, workdir: str, cfg, tok, policies, split: str) -> list[dict]:
  """Samples K responses per prompt from the policies and gold-ranks them; cached as JSONL.

  policies: (sft_params, pretrained_params or None); each prompt gets round(K * pretrained_fraction)
  samples from the second, the rest from the first (shuffled, so position carries no signal).
  """
  path = os.path.join(workdir, f"comparisons_{split}.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      return [json.loads(line) for line in f]
  lc = config.label
  n = lc.n_train_prompts if split == "train" else lc.n_eval_prompts
  prompts = synthetic.prompts(n, seed=lc.prompt_seed, split=split)
  need = _samples_needed(lc, has_second=policies[1] is not None)
  per_model = [generation.sample_responses(
      params, cfg, tok, [p["messages"] for p in prompts],
      jax.random.PRNGKey(config.seed * 2 + i + 2 * (split == "eval")), n_per_prompt=need[i],
      max_prompt_len=config.max_prompt_len, max_new_tokens=lc.max_new_tokens, temperature=lc.temperature,
      batch_size=lc.batch_size) for i, params in enumerate(policies) if params is not None and need[i] > 0]
  if len(per_model) == 1:
    per_model.append([[] for _ in prompts])
  rng = np.random.default_rng(config.seed + (split == "eval"))
  samples = []
  for sft_s, pre_s in zip(*per_model):
    k = int(rng.integers(lc.k_min, lc.k_max + 1))                      # K ~ U[k_min, k_max]
    n_pre = min(int(round(k * lc.pretrained_fraction)), len(pre_s))
    mixed = sft_s[:k - n_pre] + pre_s[:n_pre]
    samples.append([mixed[j] for j in rng.permutation(k)])
  records = pipeline.label_comparisons(prompts, samples, rng, noise_temperature=lc.noise_temperature)
  print(f"labelled {split}: {len(records)} comparisons; {records.stats}")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return list(records)


def fit_reward_model(config, run_dir: str, cfg, tok, train_records, eval_records, *, params, k_max: int,
                     eval_k_max: int | None = None, batch_size: int | None = None, num_steps: int | None = None,
                     seed: int | None = None):
  """The one RM training path: K-wise loss through `supervised.fit` (K = 2 pairs go the same way).

  config: sections seed, batch_size, epochs, optim, loop, mesh, max_len; batch_size / num_steps /
  seed override them (num_steps < 0 or None with loop.num_steps < 0: `epochs` passes).
  params: starting scalar-model params ({"gpt", "head"}). eval_k_max: slots of the held-out
  batches (default k_max), so a model trained on pairs is scored on the same K-way eval pairs.
  With config.lora.rank > 0 the trunk trains LoRA adapters and the head in full (state["params"]
  is then the training tree: `lora.merged` gives the RM).
  Checkpoints and metrics go to run_dir. Returns (state, result dict).
  """
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    if batch_size is not None:
      sub.batch_size = int(batch_size)
    if num_steps is not None:
      sub.loop.num_steps = int(num_steps)
    if seed is not None:
      sub.seed = int(seed)
  batches = pipeline.comparison_batches(train_records, tok, sub.batch_size, sub.max_len, k_max, seed=sub.seed)
  evals = pipeline.comparison_eval_batches(eval_records, tok, sub.batch_size, sub.max_len, eval_k_max or k_max)
  steps_run = supervised.resolve_steps(sub, batches.stats.kept)
  state, last, _ = supervised.fit(
      sub, run_dir, loss_fn=steps.kwise_rm_loss_fn(cfg), param_axes=heads.param_axes(cfg), params=params,
      host_batches=batches, eval_batches=evals, eval_weight_key="num_pairs", name="rm")
  result = {"eval_pairwise_accuracy": last.get("eval/accuracy"),
            "eval_prompt_mean_accuracy": last.get("eval/prompt_mean_accuracy"),
            "eval_loss": last.get("eval/loss"), "eval_pairs": sum(rm_data.batch_pairs(b) for b in evals),
            "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"), "steps": steps_run,
            "batch_size": int(sub.batch_size), "k_max": int(k_max),
            "train_pipeline": batches.stats.as_dict(), "eval_pipeline": evals.stats.as_dict()}
  return state, result


def demonstration_offset(params, cfg, tok, demos: list[tuple[list, str]], max_len: int) -> tuple[float, float]:
  """(offset, std): the bias shift that makes the demonstrations' mean reward 0 (InstructGPT)."""
  scores = generation.score_responses(params, cfg, tok, [m for m, _ in demos], [r for _, r in demos],
                                      max_len=max_len)
  return -float(np.mean(scores)), float(np.std(scores))


def _best_responses(records, n: int) -> list[tuple[list, str]]:
  out = []
  for r in records[:n]:
    best = int(np.argmin(r["ranks"]))
    out.append((list(r["messages"]), r["responses"][best]))
  return out


def run(config, workdir: str) -> dict:
  """Config keys: init_from, dropout, data, label (synthetic), max_prompt_len, max_len, k_max, epochs,
  batch_size, n_norm_demos, optim, loop, mesh, seed, lora (optional). Returns the result dict (also
  in stage.json)."""
  init = stages.load_model(config.init_from, expect=("sft", "pretrain", "hf"), dropout=config.dropout)
  cfg, tok = init.config, init.tok
  if config.data.train == "synthetic":
    pre = None
    if config.label.pretrained_fraction > 0 and init.info.get("init_from"):
      pre = stages.load_model(init.info["init_from"], expect=("pretrain", "hf")).params
    policies = (init.params, pre)
    train_recs = label_synthetic(config, workdir, cfg, tok, policies, "train")
    eval_recs = label_synthetic(config, workdir, cfg, tok, policies, "eval")
    k_max, report = int(config.label.k_max), {"source": "synthetic (gold-labelled policy samples)"}
    demos = [(d["messages"], d["response"]) for d in synthetic.demonstrations(config.n_norm_demos, seed=config.seed)]
  else:
    train_recs, eval_recs, report = data_lib.stage_records(config.data, "comparisons", workdir)
    k_max = int(config.k_max)
    demos = _best_responses(train_recs, int(config.n_norm_demos))
  rm_params = heads.from_lm(init.params, cfg, jax.random.PRNGKey(config.seed + 7))
  state, fit = fit_reward_model(config, workdir, cfg, tok, train_recs, eval_recs, params=rm_params, k_max=k_max)
  offset, demo_std = demonstration_offset(lora.merged(state["params"]), cfg, tok, demos, config.max_len)
  result = {"eval_pairwise_accuracy": fit["eval_pairwise_accuracy"], "eval_loss": fit["eval_loss"],
            "eval_pairs": fit["eval_pairs"], "length_baseline_eval": rm_data.length_baseline(eval_recs)["accuracy"],
            "train_loss": fit["train_loss"], "reward_offset": offset, "demo_score_std": demo_std,
            "num_train_comparisons": len(train_recs), "num_eval_comparisons": len(eval_recs),
            "steps": fit["steps"], "skipped_train": fit["train_pipeline"]["skipped"],
            "truncated_train": fit["train_pipeline"]["truncated"]}
  stages.write_stage(workdir, "rm", cfg, tok, init_from=config.init_from, reward_offset=offset, data=report,
                     result=result, **lora.stage_info(config.get("lora")))
  print({k: v for k, v in result.items() if not isinstance(v, dict)})
  return result
