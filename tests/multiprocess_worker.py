"""Worker for tests/test_multiprocess.py: RM, LM and PPO steps on one global mesh with per-host data.

Run by launch.local (which sets the RLHF_JAX_* variables and the device count) as
  python tests/multiprocess_worker.py --out DIR --workdir DIR --processes P
either as 2 processes x 2 CPU devices or as the single-process reference on 4 devices:
the same global mesh, the same global batches. Each process writes
DIR/result_<process>.json (losses, metrics, a check of the global batch it saw) and
DIR/params_<process>.npz (final reward-model params, gathered to the host); the
reward-model run checkpoints (through the shared loop) in WORKDIR/rm/checkpoints.

Every process builds the same global batches from fixed seeds and feeds only its
own contiguous row block (`host_rows`): the per-host data path of a real job.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import ml_collections as mlc
import numpy as np

from rlhf_jax import parallel

MESH = {"data": 2, "fsdp": 2, "tensor": 1}   # 4 devices: 2 processes x 2 CPU devices
V, K, T, B = 96, 3, 12, 8                    # vocab, responses per prompt, length, global batch
TP, N = 5, 6                                 # PPO prompt length, new tokens
EOS, PAD = 1, 0
RM_STEPS, PPO_STEPS = 3, 2
# eps=1e-3: some parameters have an analytically zero gradient (the key bias; in the RM, every
# direction that shifts all rewards equally, e.g. ln_f.bias), so the gradient there is pure float32
# reduction-order noise, which differs between the two layouts. Adam with a tiny eps would turn that
# noise into O(lr) steps; eps=1e-3 keeps it negligible while real gradients still move the params.
OPTIM = mlc.ConfigDict(dict(lr=1e-2, total_steps=10, warmup_steps=0, schedule="constant", weight_decay=0.1,
                            grad_clip=1.0, eps=1e-3))


def model_cfg():
  from rlhf_jax.model import gpt
  return gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32)


def host_rows(x: np.ndarray) -> np.ndarray:
  """This process's contiguous block of the global batch's rows (put_batch concatenates in process order)."""
  n, p, i = x.shape[0], jax.process_count(), jax.process_index()
  return x[i * n // p:(i + 1) * n // p]


def to_host(tree):
  """Global arrays -> full numpy arrays on every process."""
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def rm_batches(n: int) -> list[dict]:
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    lengths = rng.integers(4, T + 1, (B, K))
    mask = (np.arange(T)[None, None] < lengths[..., None]).astype(np.int32)
    out.append({"tokens": (rng.integers(2, V, (B, K, T)) * mask).astype(np.int32), "attention_mask": mask,
                "ranks": np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32),
                "reward_index": (lengths - 1).astype(np.int32),
                "valid": np.array([[True] * K] * (B - 1) + [[True, True, False]])})
  return out


def lm_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[:, :3] = 0
  return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}


def ppo_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (B, TP)).astype(np.int32)
  mask = np.ones((B, TP), np.int32)
  for b, n in enumerate(rng.integers(1, TP + 1, B)):
    mask[b, :TP - n] = 0   # left padding
  ptx = lm_batch(seed + 100)
  return {"prompt_tokens": toks * mask, "prompt_mask": mask, "ptx_tokens": ptx["tokens"],
          "ptx_targets": ptx["targets"], "ptx_mask": ptx["mask"]}


class HostBatches:
  """Iterator over this host's rows of fixed global batches, with get/set_state for the loop."""

  def __init__(self, batches: list[dict]):
    self.batches, self.pos = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    b = jax.tree.map(host_rows, self.batches[self.pos % len(self.batches)])
    self.pos += 1
    return b

  def get_state(self):
    return {"pos": self.pos, "host": jax.process_index()}   # differs per host, as real iterators do

  def set_state(self, state):
    self.pos = int(state["pos"])


def rm_init_state(mesh):
  """The reward-model train state (also used by the test as the restore target)."""
  from rlhf_jax.model import heads
  from rlhf_jax.train import state as state_lib
  cfg = model_cfg()
  opt = state_lib.make_optimizer(OPTIM)
  state, shardings = state_lib.create_state(lambda r: heads.init(cfg, r), opt, mesh, heads.param_axes(cfg),
                                            jax.random.PRNGKey(0))
  return state, shardings, opt


def run_rm(mesh, workdir: str) -> dict:
  """RM steps through the shared loop (which checkpoints at the end)."""
  from rlhf_jax.train import loop, state as state_lib, steps
  state, shardings, opt = rm_init_state(mesh)
  step = state_lib.jit_step(steps.make_train_step(steps.kwise_rm_loss_fn(model_cfg()), opt), shardings, mesh)
  first = rm_batches(RM_STEPS)[0]
  # What the sharded step sees must be the full batch, rows in process order.
  seen = to_host(parallel.put_batch(host_rows_tree(first), mesh)["tokens"])
  losses = []
  cfg = loop.LoopConfig(num_steps=RM_STEPS, log_every=1, ckpt_every=0, progress=False, tensorboard=False,
                        name="rm")
  state, _ = loop.run(state, step, parallel.ShardedBatches(HostBatches(rm_batches(RM_STEPS)), mesh), cfg,
                      workdir, hooks=[lambda s, st, m: losses.append(m["loss"])])
  # Every process must get its own iterator state back from the checkpoint.
  from rlhf_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  _, restored_data = ckpt.restore(rm_init_state(mesh)[0])
  ckpt.close()
  return {"rm_losses": losses, "rm_params": to_host(state["params"]), "rm_step": int(state["step"]),
          "global_batch_ok": bool(np.array_equal(seen, first["tokens"])), "restored_data_state": restored_data}


def host_rows_tree(batch: dict) -> dict:
  return jax.tree.map(host_rows, batch)


def run_ppo(mesh) -> dict:
  from rlhf_jax.model import gpt, heads
  from rlhf_jax.train import ppo, rollout, state as state_lib
  cfg = model_cfg()
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  policy = gpt.init(cfg, k[0])
  value = heads.from_lm(policy, cfg, k[1])
  score = heads.init(cfg, k[2])
  ppo_cfg = ppo.default_config()
  ppo_cfg.update(dict(ppo_epochs=2, num_minibatches=2, max_new_tokens=N, temperature=1.0, ptx_coef=0.5,
                      init_kl_beta=0.1))
  roll = rollout.make_rollout_from_config(cfg, cfg, cfg, rollout.reward_model_score_fn(cfg), ppo_cfg,
                                          eos_id=EOS, pad_id=PAD)
  opt = state_lib.make_optimizer(OPTIM)
  axes = {"policy": gpt.param_axes(cfg), "value": heads.param_axes(cfg), "ref": gpt.param_axes(cfg),
          "score": heads.param_axes(cfg)}
  state, shardings = ppo.create_rl_state(policy, value, policy, score, opt, opt, mesh, axes,
                                         jax.random.PRNGKey(3), float(ppo_cfg.init_kl_beta))
  step = state_lib.jit_step(ppo.make_rl_step(roll, cfg, cfg, opt, opt, ppo_cfg), shardings, mesh)
  metrics = []
  for i in range(PPO_STEPS):
    state, m = step(state, parallel.put_batch(host_rows_tree(ppo_batch(10 + i)), mesh))
    metrics.append({key: float(v) for key, v in jax.device_get(m).items()})
  return {"ppo_metrics": metrics}


def run_all(devices, workdir: str) -> dict:
  """RM steps (through the loop) then PPO steps on a MESH over `devices`; JSON-able results plus
  "rm_params" (numpy)."""
  mesh = parallel.make_mesh(MESH, devices)
  out = {"process_count": jax.process_count(), "device_count": len(devices)}
  out.update(run_rm(mesh, os.path.join(workdir, "rm")))
  out.update(run_ppo(mesh))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--processes", type=int, required=True, help="expected jax.process_count()")
  args = parser.parse_args(argv)
  parallel.initialize_distributed()   # from the RLHF_JAX_* variables set by launch.local
  if jax.process_count() != args.processes or len(jax.devices()) != 4:
    raise SystemExit(f"multiprocess_worker: expected {args.processes} processes and 4 devices, got "
                     f"{jax.process_count()} and {len(jax.devices())} (RLHF_JAX_* / XLA_FLAGS unset?)")
  res = run_all(jax.devices(), args.workdir)
  params = res.pop("rm_params")
  pid = jax.process_index()
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(os.path.join(args.out, f"params_{pid}.npz"), **flat)
  with open(os.path.join(args.out, f"result_{pid}.json"), "w") as f:
    json.dump(res, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
