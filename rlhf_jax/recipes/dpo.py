"""Direct preference optimisation: the policy learns from comparisons without a reward model or RL.

`run(config, workdir)` starts from `config.init_from` (an SFT/pretraining/policy stage workdir or
a Hugging Face model directory), which is also the frozen reference. Comparisons come from
`config.data` (`recipes.data.stage_records`: TRL preference pairs, our K-way rankings, builders
such as `hh_rlhf/helpful-base` or `oasst_rankings/rankings`), or with `data.train=synthetic`
from the main job's gold-labelled comparisons in an RM stage workdir (`config.comparisons_from`:
its comparisons_train.jsonl / comparisons_eval.jsonl).

Each batch element holds all K responses of a prompt (`pipeline.comparison_batches`), and the loss
is `losses.dpo.dpo_loss` of kind `dpo.kind` (pairs: K-wise DPO, ipo, plackett_luce). With
`dpo.expand_pairs` the K-way rankings are first cut into K = 2 pairs
(`comparisons.comparisons_to_pairs`): pairwise DPO. Its steps then match the K-wise run's
response passes (`rm_data.equal_compute_plan`, `dpo.compute_unit`), and both are scored on the
same held-out K-way records, i.e. the same held-out pairs.

The reference log-probs are computed once, before training (`train.dpo.reference_logps`), so
training runs no reference forward passes. Training is `supervised.fit` (the shared loop, exact
resume). Writes stage "dpo" (policy params, tokenizer, result): `stages.load_model(workdir,
expect="dpo")`, `python -m rlhf_jax.export` and chat read it like any policy.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from rlhf_jax.data import comparisons, pipeline
from rlhf_jax.losses.dpo import KINDS
from rlhf_jax.model import gpt
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.train import dpo as dpo_lib
from rlhf_jax.train import rm_data, stages, supervised

log = logging.getLogger(__name__)


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def gold_comparisons(config) -> tuple[list, list, dict]:
  """(train, eval, report) from the RM stage workdir `config.comparisons_from` (data.train=synthetic)."""
  src = config.get("comparisons_from", "")
  if not src:
    raise ValueError("data.train=synthetic needs config.comparisons_from: the workdir of an RM stage trained on "
                     "synthetic data (it holds the gold-labelled comparisons_train.jsonl / comparisons_eval.jsonl)")
  info = stages.read_stage(src)
  paths = [os.path.join(src, f"comparisons_{split}.jsonl") for split in ("train", "eval")]
  if info["stage"] != "rm" or not all(os.path.exists(p) for p in paths):
    raise ValueError(f"comparisons_from={src!r} is a {info['stage']!r} stage without comparisons_train.jsonl and "
                     "comparisons_eval.jsonl; give the workdir of an RM stage run with data.train=synthetic")
  train, held = _read_jsonl(paths[0]), _read_jsonl(paths[1])
  if int(config.data.limit) > 0:
    train = train[:int(config.data.limit)]
  if int(config.data.eval_limit) > 0:
    held = held[:int(config.data.eval_limit)]
  return train, held, {"source": f"gold-labelled comparisons of {os.path.abspath(src)}", "train": len(train),
                       "eval": len(held)}


def tied_pairs(records) -> int:
  """Pairs of equally ranked responses over all records."""
  return sum(int(np.sum(np.triu(np.equal.outer(r["ranks"], r["ranks"]), 1))) for r in records)


def _pairwise_plan(config, train_recs) -> tuple[list, int, dict]:
  """(pair records, pairs per batch, equal-compute plan {"kwise", "pairs"}) of K-way train records."""
  n = rm_data.describe(train_recs)
  per_batch = int(config.dpo.pairs_batch_size)
  if per_batch <= 0:
    per_batch = max(1, int(config.batch_size) * int(config.k_max) // 2)   # the K-wise run's slots per step
  # The K-wise run's steps as `supervised.resolve_steps` counts them (floor), as epochs for the plan.
  kwise_steps = max(1, int(float(config.epochs) * n["records"]) // int(config.batch_size))
  plan = rm_data.equal_compute_plan(n["records"], n["responses"], n["pairs"],
                                    kwise_steps * int(config.batch_size) / n["records"], int(config.batch_size),
                                    per_batch, int(config.k_max), config.dpo.compute_unit)
  return comparisons.comparisons_to_pairs(train_recs), per_batch, plan


def run(config, workdir: str) -> dict:
  """Config keys: init_from, dropout, comparisons_from, data, dpo (kind, beta, expand_pairs,
  pairs_batch_size, compute_unit), k_max, max_len, epochs, batch_size, ref_batch_size, optim,
  loop (num_steps -1 = epochs), mesh, seed. Returns the result dict (also in stage.json)."""
  d = config.dpo
  if d.kind not in KINDS:
    raise ValueError(f"config.dpo.kind must be one of {KINDS}, got {d.kind!r}")
  init = stages.load_model(config.init_from, dropout=config.dropout)
  cfg, tok = init.config, init.tok
  if config.data.train == "synthetic":
    train_recs, eval_recs, report = gold_comparisons(config)
  else:
    train_recs, eval_recs, report = data_lib.stage_records(config.data, "comparisons", workdir)
  k_max, max_len = int(config.k_max), int(config.max_len)
  eval_bs, batch_size, k_train = int(config.batch_size), int(config.batch_size), k_max
  pair_recs, pairs_bs, plan = _pairwise_plan(config, train_recs)
  mode = "pairwise" if d.expand_pairs else "kwise"
  if d.expand_pairs:
    train_recs, batch_size, k_train = pair_recs, pairs_bs, 2
    with config.unlocked():
      if int(config.loop.num_steps) < 0:
        config.loop.num_steps = int(plan["pairs"]["steps"])
      config.batch_size = batch_size
  ties = tied_pairs(train_recs)
  if d.kind == "plackett_luce" and ties:
    log.warning("dpo: %d tied pairs in the train comparisons; Plackett-Luce orders tied responses by position "
                "(see losses/dpo.py), which states a preference the labels do not", ties)

  # Reference log-probs, once, with the frozen starting model.
  ref_bs = int(config.ref_batch_size)
  train_ref = dpo_lib.reference_logps(init.params, cfg, tok, train_recs, max_len, k_train, ref_bs)
  eval_ref = dpo_lib.reference_logps(init.params, cfg, tok, eval_recs, max_len, k_max, ref_bs)
  batches = pipeline.comparison_batches(train_ref, tok, batch_size, max_len, k_train, seed=int(config.seed))
  evals = pipeline.comparison_eval_batches(eval_ref, tok, eval_bs, max_len, k_max)
  num_steps = supervised.resolve_steps(config, batches.stats.kept)
  state, last, _ = supervised.fit(
      config, workdir, loss_fn=dpo_lib.dpo_loss_fn(cfg, float(d.beta), d.kind), param_axes=gpt.param_axes(cfg),
      params=init.params, host_batches=batches, eval_batches=evals, eval_weight_key="num_pairs", name="dpo")

  policy = dpo_lib.slot_logps(state["params"], cfg, tok, eval_ref, max_len, k_max, ref_bs)[0]
  held = dpo_lib.heldout_pair_accuracy(policy, eval_ref, tok, max_len, k_max, seed=int(config.seed))
  result = {"kind": d.kind, "beta": float(d.beta), "mode": mode,
            "eval_pairwise_accuracy": held["accuracy"], "eval_accuracy_ci95": [held["ci_low"], held["ci_high"]],
            "eval_pairs": held["num_pairs"], "eval_loss": last.get("eval/loss"),
            "eval_margin": last.get("eval/margin"), "eval_logratio_mean": last.get("eval/logratio_mean"),
            "length_baseline_eval": rm_data.length_baseline(eval_recs)["accuracy"],
            "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"), "steps": num_steps,
            "batch_size": batch_size, "k_max": k_train, "tied_train_pairs": ties,
            "num_train_comparisons": len(train_recs), "num_eval_comparisons": len(eval_recs),
            "skipped_train": batches.stats.as_dict()["skipped"], "truncated_train": batches.stats.as_dict()["truncated"],
            "compute_plan": {**plan["pairs" if d.expand_pairs else "kwise"], "unit": d.compute_unit}}
  stages.write_stage(workdir, "dpo", cfg, tok, init_from=config.init_from, data=report, dpo=d.to_dict(),
                     result=result)
  print({k: v for k, v in result.items() if not isinstance(v, dict)})
  return result
