"""The shared loop: exact resume, checkpoint on Ctrl-C, clear errors for bad checkpoints."""
import json
import os
import subprocess
import sys

import jax
import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax import parallel
from rlhf_jax.data import pipeline
from rlhf_jax.model import gpt
from rlhf_jax.train import loop, state as state_lib, steps

OPTIM = mlc.ConfigDict(dict(lr=3e-3, total_steps=12, warmup_steps=2, schedule="cosine", weight_decay=0.1,
                            grad_clip=1.0))
ROWS = np.random.default_rng(0).integers(0, 64, (40, 17)).astype(np.int32)


class Stop(Exception):
  pass


def _setup(cfg, mesh):
  opt = state_lib.make_optimizer(OPTIM)
  state, shardings = state_lib.create_state(lambda r: gpt.init(cfg, r), opt, mesh, gpt.param_axes(cfg),
                                            jax.random.PRNGKey(0))
  step = state_lib.jit_step(steps.make_train_step(steps.lm_loss_fn(cfg), opt), shardings, mesh)
  batches = parallel.ShardedBatches(pipeline.lm_batches(ROWS, 8, seed=3), mesh)
  return state, step, batches


def _run(workdir, num_steps=12, stop_at=None, interrupt_at=None, cfg=None, log_every=1):
  cfg = cfg or gpt.preset("nano", vocab_size=64, dropout=0.1)  # dropout on: its rng must resume too
  mesh = parallel.make_mesh((2, 1, 1), jax.devices()[:2])
  state, step, batches = _setup(cfg, mesh)

  def hook(s, state, metrics):
    if s == stop_at:
      raise Stop()  # a crash: no final checkpoint
    if s == interrupt_at:
      raise KeyboardInterrupt()

  lc = loop.LoopConfig(num_steps=num_steps, log_every=log_every, ckpt_every=5, progress=False, tensorboard=False)
  return loop.run(state, step, batches, lc, workdir, hooks=[hook])


def _losses(workdir):
  return {h["step"]: h["train/loss"] for h in loop.read_metrics(workdir)}


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
  _run(str(tmp_path / "full"))
  with pytest.raises(Stop):
    _run(str(tmp_path / "crash"), stop_at=8)   # checkpoint at 5; steps 6-8 are lost
  _run(str(tmp_path / "crash"))               # resumes at 5 and replays 6..12
  full, resumed = _losses(str(tmp_path / "full")), {}
  for line in open(tmp_path / "crash" / "metrics.jsonl"):
    rec = json.loads(line)
    resumed[rec["step"]] = rec["train/loss"]   # later lines (the replay) overwrite the lost ones
  assert sorted(resumed) == list(range(1, 13))
  np.testing.assert_allclose([resumed[s] for s in range(6, 13)], [full[s] for s in range(6, 13)], rtol=1e-6)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    _run(str(tmp_path), interrupt_at=7)
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "7"
  state, _ = _run(str(tmp_path), num_steps=7)  # already done: restores and returns at once
  assert int(state["step"]) == 7


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path):
  _run(str(tmp_path), num_steps=5)
  other = gpt.preset("nano", vocab_size=64, d_model=32, head_dim=8)
  with pytest.raises(ValueError, match=r"does not match this model: \['params'\].* has shape \[.*\] in the checkpoint but"):
    _run(str(tmp_path), num_steps=6, cfg=other)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  _run(str(tmp_path), num_steps=5)
  ckdir = tmp_path / "checkpoints" / "5"
  for root, _, files in os.walk(ckdir / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/5 is corrupt or unreadable"):
    _run(str(tmp_path), num_steps=6)


TB_PROBE = """
import glob, sys
from rlhf_jax.train import loop
w = loop.MetricWriter(sys.argv[1], tensorboard=True)
w.write(3, {"loss": 1.5}, echo=False)
w.tb.close()
print(int("torch" in sys.modules), len(glob.glob(sys.argv[1] + "/tb/events.out.tfevents.*")))   # no None left behind
"""


def test_tensorboard_writer_leaves_torch_unloaded(tmp_path):
  # tensorboardX would import torch (seconds per process) only to accept torch tensors.
  pytest.importorskip("tensorboardX")
  pytest.importorskip("torch")
  out = subprocess.run([sys.executable, "-c", TB_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["0", "1"]
  assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 3, "loss": 1.5}]
