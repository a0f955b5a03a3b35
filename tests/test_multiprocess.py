"""A real 2-process JAX job on CPU (gloo collectives) equals the single-process run, and its
checkpoint restores in a 1-process job.

Both jobs run tests/multiprocess_worker.py through launch.local: 2 processes x 2 CPU
devices vs 1 process x 4 devices, the same global (data=2 x fsdp=2) mesh and the same
global batches, where each of the 2 processes feeds only its half of every batch
(parallel.put_batch). The jobs run concurrently and are bounded by a timeout (a stuck
collective kills both processes instead of hanging CI).
"""
import concurrent.futures
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # launch/ is a top-level folder of the repo, not an installed package
  sys.path.insert(0, str(REPO))

import multiprocess_worker as worker  # noqa: E402
from launch import local  # noqa: E402

WORKER = REPO / "tests" / "multiprocess_worker.py"
TIMEOUT_S = 240   # hang guard only; the test takes ~30-40 s on 2 idle cores
# LLVM optimisation level 0 and the classic fusion emitters more than halve XLA:CPU's compile time,
# which is nearly all of this test's cost (tiny programs; the suite's FAST_COMPILE, tests/conftest.py).
# Both jobs use the same flags, so their numerics are comparable.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _job(root: Path, name: str, processes: int):
  out, workdir = root / name / "out", root / name / "work"
  out.mkdir(parents=True)
  cmd = [sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir), "--processes", str(processes)]
  results = local.launch(cmd, processes, 4 // processes, timeout=TIMEOUT_S, cwd=REPO, echo=False,
                         log_dir=root / name / "logs", extra_env={"XLA_FLAGS": XLA_FLAGS})
  per_process = [json.load(open(out / f"result_{i}.json")) for i in range(processes)]
  params = dict(np.load(out / "params_0.npz"))
  return per_process, params, workdir, results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    multi = pool.submit(_job, root, "two_process", 2)
    single = pool.submit(_job, root, "one_process", 1)
    return multi.result(), single.result()


def test_two_processes_see_one_global_mesh_and_batch(jobs):
  (multi, _, _, results), _ = jobs
  assert [r["process_count"] for r in multi] == [2, 2]
  assert [r["device_count"] for r in multi] == [4, 4]
  assert all(r["global_batch_ok"] for r in multi)   # host halves concatenate in process order
  assert all(r.returncode == 0 for r in results)
  # Every process computes the same (replicated) metrics.
  assert multi[0]["rm_losses"] == multi[1]["rm_losses"]
  # Each host's own data-iterator state round-trips through the checkpoint (written by the primary).
  assert [r["restored_data_state"] for r in multi] == [{"pos": 3, "host": 0}, {"pos": 3, "host": 1}]
  assert multi[0]["ppo_metrics"] == multi[1]["ppo_metrics"]


def test_rm_losses_and_params_match_single_process(jobs):
  (multi, multi_params, _, _), (single, single_params, _, _) = jobs
  assert single[0]["process_count"] == 1 and single[0]["global_batch_ok"]
  assert len(multi[0]["rm_losses"]) == 3 and multi[0]["rm_step"] == 3
  np.testing.assert_allclose(multi[0]["rm_losses"], single[0]["rm_losses"], rtol=2e-5, atol=1e-6)
  assert multi[0]["rm_losses"][0] != multi[0]["rm_losses"][1]   # the steps did change the params
  assert multi_params.keys() == single_params.keys()
  for key in multi_params:   # (worker.OPTIM's eps explains why no parameter needs a loose bound)
    np.testing.assert_allclose(multi_params[key], single_params[key], atol=1e-5, err_msg=key)


def test_ppo_iterations_match_single_process(jobs):
  (multi, _, _, _), (single, _, _, _) = jobs
  m, s = multi[0]["ppo_metrics"], single[0]["ppo_metrics"]
  assert len(m) == len(s) == 2
  for step, (a, b) in enumerate(zip(m, s)):
    assert a.keys() == b.keys()
    # Identical samples (sharding-invariant RNG) -> identical lengths, then close losses.
    assert a["response_length"] == b["response_length"], step
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"step {step} {key}")
  assert m[0]["policy_loss"] != m[1]["policy_loss"]


def test_two_process_checkpoint_restores_in_one_process(jobs):
  from rlhf_jax import parallel
  from rlhf_jax.train import checkpoint, state as state_lib
  from rlhf_jax.model import heads

  (_, multi_params, workdir, _), _ = jobs
  ckpt_dir = workdir / "rm" / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["3"]
  # Restore target: the RM train state's shapes on a 1-device mesh of this process (no compile).
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = worker.model_cfg()
  opt = state_lib.make_optimizer(worker.OPTIM)

  def init_fn():
    params = heads.init(cfg, jax.random.PRNGKey(0))
    return {"step": np.int32(0), "params": params, "opt_state": opt.init(params), "rng": jax.random.PRNGKey(0)}

  abstract = jax.eval_shape(init_fn)
  shardings = parallel.tree_shardings(abstract, heads.param_axes(cfg), mesh)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  ckpt = checkpoint.Checkpointer(str(ckpt_dir), async_save=False)
  try:
    state, data_state = ckpt.restore(target)
  finally:
    ckpt.close()
  assert int(state["step"]) == 3
  assert data_state == {"pos": 3, "host": 0}   # 2 -> 1 process: process 0's iterator position
  restored = {jax.tree_util.keystr(p): np.asarray(v)
              for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  assert restored.keys() == multi_params.keys()
  for key in restored:
    np.testing.assert_array_equal(restored[key], multi_params[key], err_msg=key)
