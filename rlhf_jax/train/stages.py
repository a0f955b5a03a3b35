"""Hand-over between pipeline stages, and the two kinds of starting point a stage accepts.

A stage writes `<workdir>/stage.json` ({"stage", "model": GPTConfig fields, ...}) and keeps its
tokenizer in `<workdir>/tokenizer` (a Hugging Face tokenizer directory: tokenizer.json,
tokenizer_config.json with the chat template). The next stage names it with `init_from` (or
`rm_from`) and `load_model` returns its model config, tokenizer and latest params.

`init_from` may instead be a Hugging Face model directory (config.json + safetensors + tokenizer
files): `load_model` imports the weights (`model.hf.load`), loads the tokenizer with its chat
template (`data.tokenizer.load_hf`) and, when the tokenizer gained tokens (a pad token, or our
role tokens for a tokenizer with no chat template), grows the embedding and LM head by those rows,
started at the mean of the existing rows (`gpt.resize_vocab`). A reward model may likewise be an
HF `*ForSequenceClassification` directory (`load_reward_model`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model import gpt, hf
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.train.checkpoint import load_params

log = logging.getLogger(__name__)

POLICY_STAGES = ("pretrain", "sft", "ppo", "dpo", "rloo", "grpo", "hf")


@dataclasses.dataclass
class Model:
  """A starting point: `info` (stage.json, or {"stage": "hf", "path": ...}), config, tokenizer, params."""
  info: dict
  config: GPTConfig
  tok: tok_lib.Tokenizer
  params: dict
  path: str


def write_stage(workdir: str, stage: str, model_cfg: GPTConfig, tok: tok_lib.Tokenizer | None = None,
                **extra) -> None:
  """Writes stage.json (and the tokenizer as an HF directory under <workdir>/tokenizer)."""
  os.makedirs(workdir, exist_ok=True)
  info = {"stage": stage, "model": dataclasses.asdict(model_cfg), **extra}
  if jax.process_index() == 0:
    if tok is not None:
      tok_lib.save(tok, os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "stage.json"), "w") as f:
      json.dump(info, f, indent=2, default=str)


def is_stage_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "stage.json"))


def is_hf_dir(path: str) -> bool:
  return not is_stage_dir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_stage(workdir: str) -> dict:
  path = os.path.join(workdir, "stage.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: {workdir} is not the workdir of a finished stage "
                     f"(run that stage first, or fix init_from)")
  with open(path) as f:
    return json.load(f)


def _check_expect(info: dict, path: str, expect) -> None:
  if expect is None:
    return
  allowed = (expect,) if isinstance(expect, str) else tuple(expect)
  if info["stage"] not in allowed:
    raise ValueError(f"{path} holds a {info['stage']!r} stage, expected one of {allowed}")


def load_stage(workdir: str, expect: str | tuple[str, ...] | None = None):
  """Returns (stage info dict, GPTConfig, tokenizer, params) of a previous stage's workdir."""
  info = read_stage(workdir)
  _check_expect(info, workdir, expect)
  cfg = GPTConfig(**info["model"])
  tok = tok_lib.load(os.path.join(workdir, "tokenizer"))
  params = load_params(os.path.join(workdir, "checkpoints"))
  return info, cfg, tok, params


def fit_tokenizer(cfg: GPTConfig, params: dict, tok: tok_lib.Tokenizer, path: str):
  """(config, params) with the vocabulary grown for the tokens `tok` added to the checkpoint's own.

  Raises ValueError when the checkpoint's own tokenizer has more tokens than its model has rows
  (a tokenizer and config.json that do not belong together).
  """
  base = int(getattr(tok, "base_vocab_size", tok.vocab_size))
  if base > cfg.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {base} tokens but config.json has vocab_size={cfg.vocab_size}; "
                     "the tokenizer files and the model do not belong together")
  added = tuple(getattr(tok, "added_ids", ()))
  if not added:
    return cfg, params
  new_size = max(cfg.vocab_size, tok.vocab_size)
  log.info("%s: %d token(s) added to the tokenizer (%s); embedding rows %d -> %d, new rows at the mean",
           path, len(added), added, cfg.vocab_size, new_size)
  return gpt.resize_vocab(params, cfg, new_size, added)


def load_model(path: str, expect: str | tuple[str, ...] | None = POLICY_STAGES, dropout: float | None = None,
               key: str = "init_from") -> Model:
  """A language model from a stage workdir or a Hugging Face model directory.

  expect: the stage kinds accepted from a workdir ("hf" stands for an HF directory).
  dropout: overrides the model's dropout rate for the new stage (None keeps it).
  """
  if not path:
    raise ValueError(f"config.{key} is empty: give a stage workdir or a Hugging Face model directory")
  if is_stage_dir(path):
    info, cfg, tok, params = load_stage(path, expect)
  elif is_hf_dir(path):
    info = {"stage": "hf", "path": os.path.abspath(path)}
    _check_expect(info, path, expect)
    cfg, params = hf.load(path)
    tok = tok_lib.load_hf(path)
    cfg, params = fit_tokenizer(cfg, params, tok, path)
  else:
    raise ValueError(f"config.{key}={path!r}: neither a stage workdir (stage.json) nor a Hugging Face model "
                     "directory (config.json)")
  if dropout is not None:
    cfg = dataclasses.replace(cfg, dropout=float(dropout))
  return Model(info, cfg, tok, params, path)


def load_reward_model(path: str, dropout: float | None = None, key: str = "rm_from") -> tuple[Model, float]:
  """(reward model, reward offset) from an RM stage workdir or an HF *ForSequenceClassification dir.

  The offset is the stage's `reward_offset` (InstructGPT: demonstrations score mean 0); 0 for HF.
  """
  if is_stage_dir(path):
    m = load_model(path, expect="rm", dropout=dropout, key=key)
    return m, float(m.info.get("reward_offset", 0.0))
  if is_hf_dir(path):
    cfg, params = hf.load_reward_model(path)
    tok = tok_lib.load_hf(path)
    if tok.added_ids:
      cfg, trunk = fit_tokenizer(cfg, params["gpt"], tok, path)
      params = {**params, "gpt": trunk}
    if dropout is not None:
      cfg = dataclasses.replace(cfg, dropout=float(dropout))
    return Model({"stage": "hf_rm", "path": os.path.abspath(path)}, cfg, tok, params, path), 0.0
  raise ValueError(f"config.{key}={path!r}: neither an RM stage workdir nor a Hugging Face sequence-classification "
                   "directory")


def check_same_tokenizer(a: Model, b: Model) -> None:
  """The policy and the reward model must read the same token ids; one clear error if not."""
  tok_lib.check_compatible(a.tok, b.tok, a.path, b.path)
