"""The generic stages on a Hugging Face checkpoint and TRL-format JSONL: SFT -> RM -> PPO-ptx -> export.

One module-scoped run (a random-init Qwen2-style checkpoint with a ChatML template, made here)
feeds every test; each stage runs its smoke preset.
"""
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import load_experiment
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import stages
import hf_fixtures  # tests/ is on sys.path (pytest's rootdir-less import)
from data_fixtures import write_jsonl

EXP = Path(__file__).resolve().parents[1] / "experiments"


def _data(root: Path):
  rng = np.random.default_rng(0)
  text = hf_fixtures.corpus(200, seed=1)
  msg = lambda role, content: {"role": role, "content": content}
  demos = [{"messages": [msg("user", text[i]), msg("assistant", text[i + 1])]} for i in range(0, 120, 2)]
  prefs = [{"prompt": [msg("user", text[i])], "chosen": [msg("assistant", text[i + 1])],
            "rejected": [msg("assistant", text[i + 2][:12])]} for i in range(0, 150, 3)]
  prompts = [{"prompt": [msg("user", t)]} for t in text[:60]]
  (root / "ptx.txt").write_text("\n\n".join(" ".join(rng.choice(text, 6)) for _ in range(80)))
  return (str(write_jsonl(root / "demos.jsonl", demos)), str(write_jsonl(root / "prefs.jsonl", prefs)),
          str(write_jsonl(root / "prompts.jsonl", prompts)), str(root / "ptx.txt"))


def _stage(file, workdir, **overrides):
  exp = load_experiment(str(EXP / file))
  c = exp.get_config()
  c.preset = "smoke"
  c.update_from_flattened_dict(overrides)
  return exp.train(c, str(workdir))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("generic")
  ckpt = hf_fixtures.make_checkpoint(str(root / "hf"), "qwen2")
  demos, prefs, prompts, ptx = _data(root)
  cwd = os.getcwd()
  os.chdir(root)  # nothing may be built into the current directory
  try:
    before = set(os.listdir(root))
    out = {"root": root, "hf": ckpt}
    out["sft"] = _stage("sft.py", root / "sft", init_from=ckpt, **{"data.train": demos, "max_len": 64})
    out["rm"] = _stage("rm.py", root / "rm", init_from=str(root / "sft"),
                       **{"data.train": prefs, "max_len": 64, "k_max": 2})
    out["ppo"] = _stage("ppo.py", root / "ppo", init_from=str(root / "sft"), rm_from=str(root / "rm"),
                        ptx_from=ptx, **{"data.train": prompts, "ppo.ptx_coef": 1.0, "ptx_seq_len": 32,
                                         "loop.num_steps": 2, "max_prompt_len": 32, "ppo.max_new_tokens": 8})
    out["new_in_cwd"] = sorted(set(os.listdir(root)) - before - {"sft", "rm", "ppo"})
  finally:
    os.chdir(cwd)
  return out


def test_stages_ran_and_wrote_nothing_into_cwd(run):
  assert run["new_in_cwd"] == []
  assert np.isfinite(run["sft"]["final_train_loss"]) and run["sft"]["train_records"] > 0
  assert 0.0 <= run["rm"]["eval_pairwise_accuracy"] <= 1.0
  assert np.isfinite(run["rm"]["reward_offset"])
  for k in ("score", "kl", "ptx_loss", "eval/rm_score_mean", "eval/kl_to_sft", "eval/pretrain_val_loss"):
    assert np.isfinite(run["ppo"][k]), k
  for name in ("sft", "rm", "ppo"):
    info = stages.read_stage(str(run["root"] / name))
    assert info["model"]["family"] == "qwen2"


def test_stage_tokenizer_keeps_the_chat_template(run):
  m = stages.load_model(str(run["root"] / "sft"), expect="sft")
  assert m.tok.chat_template and "<|im_start|>" in m.tok.chat_template
  assert m.tok.pad_id != m.tok.eos_id


def test_export_policy_matches_transformers(run, tmp_path):
  import transformers
  from rlhf_jax import export

  info = export.export(str(run["root"] / "ppo"), str(tmp_path / "policy"))
  assert info["kind"] == "causal_lm" and info["architectures"] == ["Qwen2ForCausalLM"]
  m = stages.load_model(str(run["root"] / "ppo"), expect="ppo")
  tokens, mask = np.array(hf_fixtures.PROBE_TOKENS, np.int32), np.array(hf_fixtures.PROBE_MASK, np.int32)
  ours = np.asarray(gpt.logits(m.params, m.config, jnp.asarray(tokens), jnp.asarray(mask)))
  theirs = hf_fixtures.hf_causal_lm_logits(tmp_path / "policy", tokens, mask)
  real = mask.astype(bool)
  assert np.max(np.abs(ours[real] - theirs[real])) < 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "policy")
  assert hf_tok.pad_token_id == m.tok.pad_id and hf_tok.chat_template == m.tok.chat_template


def test_export_reward_model_matches_transformers(run, tmp_path):
  import torch
  import transformers
  from rlhf_jax import export

  info = export.export(str(run["root"] / "rm"), str(tmp_path / "rm"))
  assert info["kind"] == "reward_model"
  m = stages.load_model(str(run["root"] / "rm"), expect="rm")
  pad = m.tok.pad_id
  tokens = np.array([[5, 17, 33, 60, 2, 9], [11, 12, 13, pad, pad, pad]], np.int32)
  mask = (tokens != pad).astype(np.int32)
  ours = np.asarray(heads.rewards(m.params, m.config, jnp.asarray(tokens), jnp.asarray(mask)))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  assert np.max(np.abs(ours - theirs)) < 1e-4
  cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
  assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
  assert cfg["rlhf_jax_reward_offset"] == pytest.approx(stages.read_stage(str(run["root"] / "rm"))["reward_offset"])


def test_policy_and_rm_tokenizer_mismatch_is_one_clear_error(run, tmp_path):
  other = hf_fixtures.make_checkpoint(str(tmp_path / "other"), "qwen2", seed=1, vocab_size=350)
  policy = stages.load_model(str(run["root"] / "sft"))
  with pytest.raises(ValueError) as e:
    stages.check_same_tokenizer(policy, stages.load_model(other))
  assert str(run["root"] / "sft") in str(e.value) and str(other) in str(e.value)


def test_init_from_that_is_neither_is_refused(tmp_path):
  with pytest.raises(ValueError, match="neither a stage workdir"):
    stages.load_model(str(tmp_path))


def test_chat_loads_a_hugging_face_directory(run):
  from rlhf_jax import chat

  info, cfg, tok, params = chat.load_chat_model(run["hf"])
  assert info["stage"] == "hf" and cfg.family == "qwen2" and tok.chat_template
  ids = tok.chat.prompt_ids([{"role": "user", "content": "hello"}])
  assert tok.decode(ids, skip_special=False).endswith("<|im_start|>assistant\n")


def test_tokenizer_larger_than_the_model_is_one_clear_error(tmp_path):
  ckpt = hf_fixtures.make_checkpoint(str(tmp_path / "m"), "llama")
  hf_fixtures.make_tokenizer(ckpt, hf_fixtures.CHATML, vocab_size=450)  # files from another checkpoint
  with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens but config.json has vocab_size=\d+"):
    stages.load_model(ckpt)


def test_ptx_rows_from_a_text_jsonl_and_a_text_file(run, tmp_path):
  from rlhf_jax.recipes import data as data_lib

  tok = stages.load_model(str(run["root"] / "sft")).tok
  texts = hf_fixtures.corpus(120, seed=3)
  jsonl = write_jsonl(tmp_path / "ptx.jsonl", [{"text": t} for t in texts])
  (tmp_path / "ptx.txt").write_text("\n\n".join(texts))
  for spec in (str(jsonl), str(tmp_path / "ptx.txt")):
    train, val = data_lib.ptx_rows(spec, tok, 16, str(tmp_path / "w"), val_fraction=0.1)
    assert train.shape[1] == val.shape[1] == 17 and len(train) > len(val) > 0
    assert train.dtype.kind == "i" and train.max() < tok.vocab_size
  with pytest.raises(ValueError, match="not a pretraining workdir or a text/JSONL file"):
    data_lib.ptx_rows(str(tmp_path / "missing.txt"), tok, 16, str(tmp_path / "w"))
