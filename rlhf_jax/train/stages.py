"""Hand-over between pipeline stages: each stage's workdir records its model and tokenizer.

A stage writes `<workdir>/stage.json` ({"stage", "model": GPTConfig fields, ...}) and keeps
its tokenizer in `<workdir>/tokenizer`; the next stage loads both plus the params of the
latest checkpoint by path (`init_from`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax

from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.train.checkpoint import load_params


def write_stage(workdir: str, stage: str, model_cfg: GPTConfig, **extra) -> None:
  os.makedirs(workdir, exist_ok=True)
  info = {"stage": stage, "model": dataclasses.asdict(model_cfg), **extra}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "stage.json"), "w") as f:
      json.dump(info, f, indent=2)


def read_stage(workdir: str) -> dict:
  path = os.path.join(workdir, "stage.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: {workdir} is not the workdir of a finished stage "
                     f"(run that stage first, or fix init_from)")
  with open(path) as f:
    return json.load(f)


def load_stage(workdir: str, expect: str | tuple[str, ...] | None = None):
  """Returns (stage info dict, GPTConfig, tokenizer, params) of a previous stage's workdir."""
  info = read_stage(workdir)
  if expect is not None:
    allowed = (expect,) if isinstance(expect, str) else expect
    if info["stage"] not in allowed:
      raise ValueError(f"{workdir} holds a {info['stage']!r} stage, expected one of {allowed}")
  cfg = GPTConfig(**info["model"])
  tok = tok_lib.load(os.path.join(workdir, "tokenizer"))
  params = load_params(os.path.join(workdir, "checkpoints"))
  return info, cfg, tok, params


def copy_tokenizer(src_workdir: str, dst_workdir: str) -> None:
  src, dst = os.path.join(src_workdir, "tokenizer"), os.path.join(dst_workdir, "tokenizer")
  if not os.path.exists(dst):
    shutil.copytree(src, dst)
