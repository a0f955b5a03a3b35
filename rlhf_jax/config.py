"""Shared config pieces for experiment files (big_vision style ConfigDicts).

An experiment file's `get_config()` starts from these sections and overrides
what it needs; every value can be overridden on the command line
(`--config.optim.lr=3e-4`). Unknown keys are rejected by ml_collections.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections as mlc

from rlhf_jax.model.config import GPTConfig


def model(preset: str = "tiny", **overrides) -> mlc.ConfigDict:
  """Model section: a preset name plus field overrides (see rlhf_jax.model.config.GPTConfig)."""
  return mlc.ConfigDict({"preset": preset, **overrides})


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
  """Mesh section: devices along (data, fsdp, tensor); -1 = all remaining devices."""
  return mlc.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def optim(lr: float = 3e-4, total_steps: int = 1000, warmup_steps: int = 50, schedule: str = "cosine",
          weight_decay: float = 0.1, grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, end_lr_factor: float = 0.0, microbatches: int = 1) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                             weight_decay=weight_decay, grad_clip=grad_clip, b1=b1, b2=b2, eps=eps,
                             end_lr_factor=end_lr_factor, microbatches=microbatches))


def loop(num_steps: int = 1000, log_every: int = 20, eval_every: int = 0, ckpt_every: int = 200,
         progress: bool = True) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                             ckpt_every=ckpt_every, progress=progress))


def model_config(section) -> GPTConfig:
  """ConfigDict model section -> validated GPTConfig (unknown keys raise ValueError)."""
  return GPTConfig.from_dict(section.to_dict() if hasattr(section, "to_dict") else section)


def apply_overrides(config, overrides: dict):
  """A copy of `config` with flattened overrides ({"optim.lr": 1e-3}); unknown keys raise."""
  config = config.copy_and_resolve_references()
  config.lock()  # an override may change a value, never add a key
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError) as e:
      raise ValueError(f"sweep override {key!r}: no such config key") from e
  return config


def apply_preset(config, presets: dict):
  """Applies `presets[config.preset]` (flattened overrides) and ties optim.total_steps to the loop."""
  if config.preset not in presets:
    raise ValueError(f"preset must be one of {sorted(presets)}, got {config.preset!r}")
  config = apply_overrides(config, presets[config.preset])
  if "optim" in config and "loop" in config:
    config.optim.total_steps = config.loop.num_steps
  return config


def load_experiment(path: str):
  """Imports an experiment file as a module."""
  if not os.path.exists(path):
    raise ValueError(f"experiment file {path} does not exist")
  name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  for attr in ("get_config", "train"):
    if not hasattr(module, attr):
      raise ValueError(f"experiment file {path} defines no {attr}()")
  return module
