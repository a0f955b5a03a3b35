"""Multi-stage experiments (pretrain -> SFT -> RM -> PPO): each stage once, resumable at the stage.

A stage's result is cached in `<workdir>/results/<name>.json` when it finishes; a re-run of the
experiment skips finished stages and the unfinished one resumes at its own last checkpoint. With a
stage cache (`stage_cache.py`, `python -m rlhf_jax.main --stage_cache`), a stage that another workdir
already ran with the same config, inputs, code and numerics is copied from there instead of trained.
"""
from __future__ import annotations

import json
import os
import time

from rlhf_jax.config import load_experiment
from rlhf_jax.recipes import stage_cache


def run_stage(name: str, experiment_file: str, stage_cfg, workdir: str, results: dict) -> dict:
  """Runs `experiment_file`'s train(stage_cfg, <workdir>/<name>) unless cached; stores
  {"result", "seconds", "cache_key"} (plus "reused" when copied from the stage cache) in results[name]
  and in <workdir>/results/<name>.json, and returns it."""
  path = os.path.join(workdir, "results", f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      results[name] = json.load(f)
    return results[name]
  cache = stage_cache.cache_dir()
  key = stage_cache.stage_key(name, str(experiment_file), stage_cfg, workdir) if cache else None
  t0 = time.time()
  hit = stage_cache.fetch(cache, key, name, workdir) if key else None
  if hit is not None:
    print(f"==> stage {name}: reused from the stage cache ({os.path.join(cache, key)}; trained there in "
          f"{hit['seconds']:.0f} s)")
    results[name] = {**hit, "seconds": time.time() - t0, "cache_key": key,
                     "reused": {"from": os.path.join(cache, key), "trained_seconds": hit["seconds"]}}
  else:
    print(f"==> stage {name}")
    out = load_experiment(str(experiment_file)).train(stage_cfg, os.path.join(workdir, name))
    results[name] = {"result": out, "seconds": time.time() - t0, "cache_key": key}
    if key:
      stage_cache.store(cache, key, name, workdir, results[name])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results[name], f, indent=2, default=float)
  return results[name]
