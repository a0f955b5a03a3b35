"""Exports a stage workdir as a Hugging Face model directory.

  python -m rlhf_jax.export --workdir runs/ppo_ptx --out exported/policy
  python -m rlhf_jax.export --workdir runs/rm --out exported/rm

A policy stage (pretrain, sft, ppo) becomes a causal LM (`AutoModelForCausalLM`: GPT-2 or the
Llama-family class of its `family`); an RM stage becomes `AutoModelForSequenceClassification`
with num_labels=1, the score read at the last non-pad token as transformers does (ours reads the
last real token; they agree because PAD is never a real token). The RM's `reward_offset` (the shift
that makes demonstrations score 0) is recorded in config.json as `rlhf_jax_reward_offset`; the
exported scores are the raw ones. Each directory gets the stage's tokenizer and chat template.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model import hf
from rlhf_jax.train import stages

POLICY = ("pretrain", "sft", "ppo", "dpo", "rloo", "grpo")


def _token_ids(tok) -> dict:
  return {"pad_token_id": int(tok.pad_id), "eos_token_id": int(tok.eos_id)}


def export(workdir: str, out: str) -> dict:
  """Writes `out` from the stage in `workdir`; returns {"kind", "stage", "out", "architectures"}."""
  m = stages.load_model(workdir, expect=POLICY + ("rm",))
  stage = m.info["stage"]
  extra = _token_ids(m.tok)
  if stage == "rm":
    extra["rlhf_jax_reward_offset"] = float(m.info.get("reward_offset", 0.0))
    hf.save_reward_model(m.config, m.params, out, extra_config=extra)
    kind = "reward_model"
  else:
    hf.save(m.config, m.params, out, extra_config=extra)
    kind = "causal_lm"
  tok_lib.save(m.tok, out)
  with open(os.path.join(out, "config.json")) as f:
    arch = json.load(f).get("architectures")
  return {"kind": kind, "stage": stage, "out": os.path.abspath(out), "architectures": arch}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished stage's workdir (stage.json + checkpoints/)")
  p.add_argument("--out", required=True, help="the Hugging Face directory to write")
  args = p.parse_args(argv)
  try:
    info = export(args.workdir, args.out)
  except (ValueError, FileNotFoundError) as e:
    print(f"export: {e}", file=sys.stderr)
    return 2
  print(json.dumps(info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
