"""Runs an experiment file.

  python -m rlhf_jax.main --config experiments/pretrain_tiny.py --workdir runs/pretrain \
      [--config.optim.lr=1e-3] [--sweep] [--sweep_index=N]

An experiment file defines `get_config()` (an ml_collections ConfigDict) and
`train(config, workdir) -> dict` (it composes model, losses and the shared
loop); optionally `get_sweep() -> list[dict]` of flattened overrides, run one
after another (or only `--sweep_index`) in `workdir/sweep/<overrides>`.

Before anything else (flag parsing loads the config file) the process's glibc malloc is set to reuse
XLA:CPU's per-step buffers instead of mapping them afresh each step (`host_malloc.py`; ~1.3x on the
CPU train steps); RLHF_JAX_HOST_MALLOC=system leaves glibc's defaults alone.
"""
from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.config import apply_overrides, load_experiment  # noqa: F401 (re-exported)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file defining get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run the experiment's get_sweep() points one after another.")
_SWEEP_INDEX = flags.DEFINE_integer("sweep_index", -1, "Run only this sweep point (e.g. one per cluster job).")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache", "", "XLA's persistent compilation cache directory: '' = <workdir>/xla_cache (unless "
    "JAX_COMPILATION_CACHE_DIR is set), 'none' = off.")
_STAGE_CACHE = flags.DEFINE_string(
    "stage_cache", "", "Finished stages of multi-stage experiments reused across workdirs when their "
    "config, inputs, code and numerics match (recipes/stage_cache.py): '' = <workdir>/../.stage_cache "
    "(unless RLHF_JAX_STAGE_CACHE is set), 'none' = off.")


def sweep_name(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in sorted(overrides.items())).replace("/", "_") or "base"


def run(experiment, config, workdir: str, sweep: bool = False, sweep_index: int = -1) -> list[dict]:
  if not sweep:
    return [experiment.train(config, workdir)]
  if not hasattr(experiment, "get_sweep"):
    raise ValueError("--sweep given, but the experiment file defines no get_sweep()")
  points = list(experiment.get_sweep())
  if sweep_index >= 0:
    if sweep_index >= len(points):
      raise ValueError(f"--sweep_index={sweep_index} but the sweep has {len(points)} points")
    points = [points[sweep_index]]
  results = []
  for overrides in points:
    sub = os.path.join(workdir, "sweep", sweep_name(overrides))
    logging.info("sweep point %s -> %s", overrides, sub)
    result = experiment.train(apply_overrides(config, overrides), sub)
    results.append({"overrides": overrides, "workdir": sub, "result": result})
  with open(os.path.join(workdir, "sweep_results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  return results


class _QuietLibraries(logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _compilation_cache(flag: str, workdir: str) -> None:
  """Turns on XLA's persistent compilation cache. A pipeline's stages build fresh jitted functions of
  the same programs (the KL-sweep runs compile PPO's iteration again), and a re-run or resume compiles
  everything again; the cache keys on the program, so those compiles become file reads, with the
  same executables (results do not change)."""
  if flag == "none" or (not flag and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", flag or os.path.join(workdir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _stage_cache(flag: str, workdir: str) -> None:
  """Sets RLHF_JAX_STAGE_CACHE (read by chain.run_stage, inherited by subprocesses) from --stage_cache."""
  if flag or not os.environ.get("RLHF_JAX_STAGE_CACHE"):
    os.environ["RLHF_JAX_STAGE_CACHE"] = flag or os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                                              ".stage_cache")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  _compilation_cache(_XLA_CACHE.value, _WORKDIR.value)
  _stage_cache(_STAGE_CACHE.value, _WORKDIR.value)
  from rlhf_jax import parallel
  parallel.initialize_distributed()
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  experiment = load_experiment(path)
  run(experiment, _CONFIG.value, _WORKDIR.value, _SWEEP.value, _SWEEP_INDEX.value)


def entry():
  from rlhf_jax import host_malloc
  host_malloc.configure()
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  entry()
