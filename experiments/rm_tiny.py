"""InstructGPT step 2 — reward model on K-way rankings of SFT samples, with the K-wise loss.

  python -m rlhf_jax.main --config experiments/rm_tiny.py --workdir runs/rm --config.init_from=runs/sft

1. Labelling: for each prompt, sample K ~ U[k_min, k_max] responses (InstructGPT: K = 4..9) and have
   the gold labeler rank them (optionally noisy, like human labelers). Like InstructGPT's comparison
   data, the samples come from more than one model: a `pretrained_fraction` of each prompt's K from
   the pretrained model, the rest from SFT.
2. Training: the SFT model with its unembedding replaced by a scalar head; the reward is read at
   the EOS; loss −1/C(K,2) Σ log σ(r_w − r_l) with all K responses of a prompt in one batch element.
3. Normalisation: a bias so that the demonstrations score mean 0 (stored as `reward_offset`).
"""
import json
import os

import jax
import ml_collections as mlc
import numpy as np

from rlhf_jax import config as rcfg
from rlhf_jax import generation
from rlhf_jax.data import pipeline, synthetic
from rlhf_jax.model import heads
from rlhf_jax.train import stages, steps, supervised

PRESETS = {
    "default": {},
    "smoke": {"label.n_train_prompts": 96, "label.n_eval_prompts": 32, "label.k_min": 2, "label.k_max": 4,
              "epochs": 1, "batch_size": 8, "loop.log_every": 4, "loop.ckpt_every": 8, "n_norm_demos": 64},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = "runs/sft"
  c.dropout = 0.0
  c.label = mlc.ConfigDict(dict(n_train_prompts=1500, n_eval_prompts=300, k_min=4, k_max=9, temperature=1.0,
                                noise_temperature=0.0, max_new_tokens=24, prompt_seed=1, batch_size=128,
                                pretrained_fraction=0.5))
  c.max_prompt_len = 64
  c.max_len = 96
  c.epochs = 2            # InstructGPT: 1 epoch on ~33k prompts (more overfits); we have ~1.5k prompts
  c.batch_size = 16       # prompts per batch; each carries up to k_max responses
  c.optim = rcfg.optim(lr=3e-4, warmup_steps=10, weight_decay=0.0, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=10, eval_every=20, ckpt_every=100)
  c.mesh = rcfg.mesh()
  c.n_norm_demos = 512
  return c


def get_sweep():
  """Labeler noise: noise-free vs InstructGPT-like ~73% inter-labeler agreement (temperature 0.2)."""
  return [{"label.noise_temperature": t} for t in (0.0, 0.2)]


def label(config, workdir, cfg, tok, policies, split: str):
  """Samples K responses per prompt from the policies and gold-ranks them; cached as JSONL.

  policies: (sft_params, pretrained_params); each prompt gets round(K * pretrained_fraction)
  samples from the second, the rest from the first (shuffled, so position carries no signal).
  """
  path = os.path.join(workdir, f"comparisons_{split}.jsonl")
  if os.path.exists(path):
    return [json.loads(line) for line in open(path)]
  lc = config.label
  n = lc.n_train_prompts if split == "train" else lc.n_eval_prompts
  prompts = synthetic.prompts(n, seed=lc.prompt_seed, split=split)
  per_model = [generation.sample_responses(
      params, cfg, tok, [p["messages"] for p in prompts], jax.random.PRNGKey(config.seed * 2 + i + 2 * (split == "eval")),
      n_per_prompt=lc.k_max, max_prompt_len=config.max_prompt_len, max_new_tokens=lc.max_new_tokens,
      temperature=lc.temperature, batch_size=lc.batch_size) for i, params in enumerate(policies)
      if params is not None]
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
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return list(records)


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  _, cfg, tok, sft_params = stages.load_stage(config.init_from, expect="sft")
  cfg = cfg.__class__(**{**cfg.__dict__, "dropout": float(config.dropout)})
  stages.copy_tokenizer(config.init_from, workdir)
  sft_info = stages.read_stage(config.init_from)
  policies = (sft_params, stages.load_stage(sft_info["init_from"])[3] if config.label.pretrained_fraction > 0
              else None)
  train_recs = label(config, workdir, cfg, tok, policies, "train")
  eval_recs = label(config, workdir, cfg, tok, policies, "eval")
  k_max = config.label.k_max
  batches = pipeline.comparison_batches(train_recs, tok, config.batch_size, config.max_len, k_max, seed=config.seed)
  with config.unlocked():
    if config.loop.num_steps < 0:
      config.loop.num_steps = max(1, config.epochs * batches.stats.kept // config.batch_size)
    config.optim.total_steps = config.loop.num_steps
  rm_params = heads.from_lm(sft_params, cfg, jax.random.PRNGKey(config.seed + 7))
  state, last, _ = supervised.fit(
      config, workdir, loss_fn=steps.kwise_rm_loss_fn(cfg), param_axes=heads.param_axes(cfg), params=rm_params,
      host_batches=batches, eval_weight_key="num_pairs", name="rm",
      eval_batches=pipeline.comparison_eval_batches(eval_recs, tok, config.batch_size, config.max_len, k_max))
  # InstructGPT: before RL, shift the reward so labeler demonstrations score mean 0.
  demos = synthetic.demonstrations(config.n_norm_demos, seed=config.seed)
  demo_scores = generation.score_responses(state["params"], cfg, tok, [d["messages"] for d in demos],
                                           [d["response"] for d in demos], max_len=config.max_len)
  offset = -float(np.mean(demo_scores))
  result = {"eval_pairwise_accuracy": last.get("eval/accuracy"), "eval_loss": last.get("eval/loss"),
            "train_loss": last.get("loss"), "reward_offset": offset, "demo_score_std": float(np.std(demo_scores)),
            "num_train_comparisons": len(train_recs), "num_eval_comparisons": len(eval_recs),
            "steps": config.loop.num_steps}
  stages.write_stage(workdir, "rm", cfg, init_from=config.init_from, reward_offset=offset, result=result)
  print(result)
  return result
