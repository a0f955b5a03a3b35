"""The real-data recipe in smoke form: HH-RLHF through SFT -> K-wise RM -> PPO-ptx from a GPT-2-style
HF checkpoint with no chat template (so our role tokens are added and the embedding grows)."""
import json
from pathlib import Path

import numpy as np
import transformers

import hf_fixtures  # tests/ is on sys.path (pytest's rootdir-less import)
from rlhf_jax.config import load_experiment
from rlhf_jax.train import stages

EXP = Path(__file__).resolve().parents[1] / "experiments"


def test_instructgpt_hh_smoke(tmp_path, shared_data):
  ckpt = hf_fixtures.make_checkpoint(str(tmp_path / "gpt2"), "gpt2", chat_template=None)
  exp = load_experiment(str(EXP / "instructgpt_hh.py"))
  c = exp.get_config()
  c.preset, c.init_from = "smoke", ckpt
  c.ptx_from = str(shared_data / "tinyshakespeare" / "input.txt")
  c.stages.ppo_ptx.ptx_limit = 200
  c.data.cache_dir = str(tmp_path / "data")   # one HH build for the three stages (same builder and split)
  out = exp.train(c, str(tmp_path / "run"))
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  rm = summary["stages"]["rm"]["result"]
  assert 0 <= rm["eval_pairwise_accuracy"] <= 1 and 0 <= rm["length_baseline_eval"] <= 1
  w = summary["eval"]["win_rate_vs_sft_rm"]
  assert w["wins"] + w["ties"] + w["losses"] == summary["eval"]["n_prompts"] > 0
  assert w["ci95"][0] <= w["mean"] <= w["ci95"][1] and out["win_rate_vs_sft_rm"] == w["mean"]
  for name in ("sft", "ppo_ptx"):
    for k in ("rm_score_mean", "kl_to_sft", "pretrain_val_loss", "mean_response_length"):
      assert np.isfinite(summary["eval"][name][k]), (name, k)
  assert (tmp_path / "run" / "results.md").read_text().startswith("# InstructGPT on HH-RLHF")
  sft = stages.load_model(str(tmp_path / "run" / "sft"))
  # GPT-2's tokenizer has no chat template: pad and the three role tokens were added, rows grown.
  assert sft.tok.chat_template is None or "<|assistant|>" in sft.tok.chat_template
  base = len(transformers.AutoTokenizer.from_pretrained(ckpt))
  assert sft.config.vocab_size == sft.tok.vocab_size == base + 4
  assert sft.tok.pad_id != sft.tok.eos_id
