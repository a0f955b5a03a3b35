"""The one shared functional training loop.

It runs any jitted pure `step(state, batch) -> (state, metrics)` over a batch
iterator; it knows nothing about language models or RLHF. It owns:
resume from the latest checkpoint in the workdir (state *and* data iterator
state, so losses after a restart equal an uninterrupted run), periodic
evaluation, metric logging (stdout, metrics.jsonl, TensorBoard), a progress bar
with throughput, periodic/final orbax checkpoints, and a checkpoint on Ctrl-C.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from rlhf_jax.train.checkpoint import Checkpointer

Metrics = dict[str, float]


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  log_every: int = 10
  eval_every: int = 0            # 0 = only at the end
  ckpt_every: int = 100          # 0 = only at the end
  max_to_keep: int = 2
  async_checkpoint: bool = True
  progress: bool = True
  tensorboard: bool = True
  name: str = "train"            # prefix for logged metrics and the progress bar

  @classmethod
  def from_config(cls, cfg, **overrides):
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in dict(cfg).items() if k in fields}
    d.update(overrides)
    return cls(**d)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, or None when tensorboardX is not installed (optional at runtime).

  tensorboardX imports torch whenever torch is installed, only so that it can accept torch tensors
  (~2 s and ~230 MB per process); this writer passes Python floats, so unless torch is already
  loaded it is hidden from that one import (`sys.modules[name] = None` makes `import torch` raise
  ImportError there) and a later `import torch` works as usual.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  except ImportError:
    return None
  finally:
    if hide:
      sys.modules.pop("torch", None)


class MetricWriter:
  """stdout + JSONL + TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        writer = _summary_writer_class()
        self.tb = writer(os.path.join(workdir, "tb")) if writer else None

  def write(self, step: int, metrics: Metrics, echo: bool = True) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self.tb is not None:
      for k, v in clean.items():
        self.tb.add_scalar(k, v, step)
    if echo:
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items()))
      logging.info("step %d: %s", step, shown)

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The JSONL metric history of a run (empty list if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _mean_metrics(buffer: list[dict]) -> Metrics:
  host = jax.device_get(buffer)
  keys = host[0].keys()
  return {k: float(np.mean([np.asarray(m[k]) for m in host])) for k in keys}


def _progress(total, initial, name, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, mininterval=1.0)


def run(state, step_fn: Callable, batches: Iterator, config: LoopConfig, workdir: str,
        eval_fn: Callable[[Any], Metrics] | None = None,
        hooks: Sequence[Callable[[int, Any, Metrics], None]] = ()):
  """Trains until `config.num_steps`, resuming from `workdir` if it holds a checkpoint.

  state: initial train state (sharded); must contain an int "step" leaf.
  step_fn: jitted (state, batch) -> (state, metrics dict of scalars).
  batches: iterator of batches; if it has get_state()/set_state() (grain
    iterators do), its position is checkpointed and restored.
  eval_fn: state -> metrics, run every eval_every steps and at the end.
  hooks: called as hook(step, state, metrics) after each logged step.
  Returns (final state, last logged metrics).
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.max_to_keep, config.async_checkpoint)
  writer = MetricWriter(workdir, config.tensorboard)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state)
    if data_state and hasattr(batches, "set_state"):
      batches.set_state(data_state)
    logging.info("%s: resumed from step %d in %s", config.name, ckpt.latest_step(), workdir)
  step = int(jax.device_get(state["step"]))
  data_state = batches.get_state() if hasattr(batches, "get_state") else None
  bar = _progress(config.num_steps, step, config.name, config.progress)
  buffer, last = [], {}
  t_last, steps_since = time.perf_counter(), 0
  try:
    while step < config.num_steps:
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      data_state = batches.get_state() if hasattr(batches, "get_state") else None
      step += 1
      steps_since += 1
      buffer.append(metrics)
      if bar is not None:
        bar.update(1)
      if step % config.log_every == 0 or step == config.num_steps:
        last = _mean_metrics(buffer)
        dt = time.perf_counter() - t_last
        last["steps_per_sec"] = steps_since / max(dt, 1e-9)
        if "num_tokens" in last:
          last["tokens_per_sec"] = last["num_tokens"] * last["steps_per_sec"]
        writer.write(step, {f"{config.name}/{k}": v for k, v in last.items()}, echo=bar is None)
        if bar is not None:
          bar.set_postfix({k: f"{last[k]:.4g}" for k in list(last)[:4]})
        for hook in hooks:
          hook(step, state, last)
        buffer, t_last, steps_since = [], time.perf_counter(), 0
      if eval_fn is not None and config.eval_every and step % config.eval_every == 0 and step < config.num_steps:
        writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
      if config.ckpt_every and step % config.ckpt_every == 0 and step < config.num_steps:
        ckpt.save(step, state, data_state)
    if eval_fn is not None:
      final_eval = eval_fn(state)
      writer.write(step, {f"eval/{k}": v for k, v in final_eval.items()})
      last.update({f"eval/{k}": v for k, v in final_eval.items()})
    if ckpt.latest_step() != step:
      ckpt.save(step, state, data_state, force=True)
  except KeyboardInterrupt:
    logging.warning("%s: interrupted at step %d; saving a checkpoint before exiting", config.name, step)
    if ckpt.latest_step() != step:
      ckpt.save(step, state, data_state, force=True)
    raise
  finally:
    ckpt.close()
    writer.close()
    if bar is not None:
      bar.close()
  return state, last
