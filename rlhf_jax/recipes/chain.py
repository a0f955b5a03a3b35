"""Multi-stage experiments (pretrain -> SFT -> RM -> PPO): each stage once, resumable at the stage.

A stage's result is cached in `<workdir>/results/<name>.json` when it finishes; a re-run of the
experiment skips finished stages and the unfinished one resumes at its own last checkpoint.
"""
from __future__ import annotations

import json
import os
import time

from rlhf_jax.config import load_experiment


def run_stage(name: str, experiment_file: str, stage_cfg, workdir: str, results: dict) -> dict:
  """Runs `experiment_file`'s train(stage_cfg, <workdir>/<name>) unless cached; stores
  {"result", "seconds"} in results[name] and returns it."""
  path = os.path.join(workdir, "results", f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      results[name] = json.load(f)
    return results[name]
  print(f"==> stage {name}")
  t0 = time.time()
  out = load_experiment(str(experiment_file)).train(stage_cfg, os.path.join(workdir, name))
  results[name] = {"result": out, "seconds": time.time() - t0}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results[name], f, indent=2, default=float)
  return results[name]
