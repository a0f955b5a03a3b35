"""Reward model on real human preferences: Anthropic HH-RLHF (helpful) chosen/rejected pairs.

  python -m rlhf_jax.main --config experiments/rm_hh_rlhf.py --workdir runs/rm_hh
  python -m rlhf_jax.main --config experiments/rm_hh_rlhf.py --workdir runs/rm_hh_smoke --config.preset=smoke
  python -m rlhf_jax.main --config experiments/rm_hh_rlhf.py --workdir runs/rm_hh_sweep --sweep
  (the sweep: RM from scratch vs after 150 steps of LM warm-up on the train dialogues)

Data: the shared TEST files of helpful-base, helpful-online and helpful-rejection-sampled (~6.2k
pairs; the HH train files are not in ../shared/data), split train/eval by a hash of the prompt
dialogue, so no prompt is on both sides. A byte-level BPE is trained on the train side's text.
Model: a small GPT from scratch (optionally first `lm.num_steps` of next-token pretraining on the
train dialogues) with a scalar head read at the response's EOS; each pair is a K=2 comparison
through the same K-wise loss and pipeline as InstructGPT's K-way rankings. Headline: held-out
pairwise accuracy, next to the "longer answer wins" baseline on the same held-out pairs.
Reference: Bai et al. 2022 RMs are 52B; GPT-2-large-sized RMs reach ~0.73 on helpful-base with
the 43k-pair train split, which this CPU setup cannot approach with ~5k pairs and a ~1M-param trunk.
"""
import os
import time

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.recipes import rm as rm_recipe
from rlhf_jax.train import rm_data

PRESETS = {
    "default": {},
    # Seconds of compute (mostly jit compiles): what the tests run.
    "smoke": {"data.subsets": "helpful-base", "data.max_train": 128, "data.max_eval": 32, "data.vocab_size": 1024,
              "model.preset": "nano", "max_len": 64, "batch_size": 16, "epochs": 1, "loop.log_every": 4,
              "loop.eval_every": 0, "loop.ckpt_every": 0, "lm.num_steps": 2, "lm.seq_len": 64, "lm.batch_size": 8,
              "lm.eval_batches": 0},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  # manual_dir: the HH-RLHF folder (<subset>/test.jsonl.gz), relative paths from the repo root.
  # data_dir: where the TFDS array_record build is cached ("" = <workdir>/tfds).
  c.data = mlc.ConfigDict(dict(manual_dir="../shared/data/hh_rlhf", data_dir="", split="test",
                               subsets="helpful-base,helpful-online,helpful-rejection-sampled",
                               eval_fraction=0.15, split_salt="", split_by="dialogue", vocab_size=4096,
                               max_train=-1, max_eval=-1))
  c.model = rcfg.model("tiny", dropout=0.1)
  c.max_len = 160          # prompt + response tokens; prompts lose their oldest turns first
  c.epochs = 1            # InstructGPT: one epoch; a 2nd epoch overfit here (eval 0.60 -> 0.58)
  c.batch_size = 32        # pairs per batch
  c.optim = rcfg.optim(lr=5e-4, warmup_steps=20, weight_decay=0.01, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=20, eval_every=50, ckpt_every=200)
  c.mesh = rcfg.mesh()
  # Optional LM warm-up on the train dialogues (0 = reward model from scratch).
  c.lm = mlc.ConfigDict(dict(num_steps=0, seq_len=128, batch_size=32, eval_batches=8,
                             optim=rcfg.optim(lr=2e-3, warmup_steps=20, weight_decay=0.1)))
  return c


def get_sweep():
  """RM from scratch vs after a short LM warm-up on the same train dialogues."""
  return [{"lm.num_steps": 0}, {"lm.num_steps": 150}]


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  d = config.data
  manual = rm_data.resolve_data_dir(d.manual_dir, "data.manual_dir", "<subset>/test.jsonl.gz from anthropics/hh-rlhf")
  names = [f"hh_rlhf/{s.strip()}" for s in d.subsets.split(",") if s.strip()]
  t0, c0 = time.perf_counter(), time.process_time()
  recs = rm_data.load_comparisons(names, d.split, manual, d.data_dir or os.path.join(workdir, "tfds"))
  train_recs, eval_recs = rm_data.split_by_prompt(recs, d.eval_fraction, d.split_salt, d.split_by)
  train_recs = train_recs[:d.max_train] if d.max_train > 0 else train_recs
  eval_recs = eval_recs[:d.max_eval] if d.max_eval > 0 else eval_recs
  tok = rm_data.get_tokenizer(train_recs, d.vocab_size, workdir)
  model_cfg = rm_data.model_config(config.model, tok, config.max_len)
  lm_params, lm_result = rm_data.lm_warmup(config, workdir, model_cfg, tok, train_recs, eval_recs)
  t1 = time.perf_counter()
  _, rm = rm_recipe.fit_reward_model(config, os.path.join(workdir, "rm"), model_cfg, tok, train_recs, eval_recs,
                                     params=rm_data.fresh_rm_params(model_cfg, config.seed, lm_params), k_max=2)
  result = {"eval_pairwise_accuracy": rm["eval_pairwise_accuracy"], "eval_pairs": rm["eval_pairs"],
            "length_baseline_eval": rm_data.length_baseline(eval_recs)["accuracy"],
            "eval_loss": rm["eval_loss"], "train_loss": rm["train_loss"], "train_accuracy": rm["train_accuracy"],
            "rm_steps": rm["steps"], "rm_s_per_step": rm_data.steady_s_per_step(os.path.join(workdir, "rm"), "rm"),
            "rm_wall_s": time.perf_counter() - t1, "total_wall_s": time.perf_counter() - t0,
            "total_cpu_s": time.process_time() - c0,
            "lm_warmup": lm_result, "num_params": model_cfg.num_params(), "vocab_size": tok.vocab_size,
            "train_data": rm_data.describe(train_recs), "eval_data": rm_data.describe(eval_recs),
            "truncated_train": rm["train_pipeline"]["truncated"], "skipped_train": rm["train_pipeline"]["skipped"]}
  rm_data.write_json(os.path.join(workdir, "result.json"), result)
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
         if k in ("eval_pairwise_accuracy", "length_baseline_eval", "eval_pairs", "rm_steps", "rm_wall_s")})
  return result
