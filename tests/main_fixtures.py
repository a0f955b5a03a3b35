"""Runs an experiment's smoke preset the way a user does: `python -m rlhf_jax.main` in a subprocess."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_DEVICES = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
  """This session's XLA_FLAGS (conftest's fast-compile level, or the user's own) with `devices` CPU devices."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
  return " ".join([f"{_DEVICES}={devices}", *kept])


# The environment of a CLI subprocess: one CPU device; the session's compilation cache (conftest) is inherited.
ENV = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}


def run_smoke(experiment: str, workdir, timeout: int) -> subprocess.CompletedProcess:
  """`python -m rlhf_jax.main --config experiments/<experiment> --workdir W --config.preset=smoke` from the repo root."""
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config", f"experiments/{experiment}",
                         "--workdir", str(workdir), "--config.preset=smoke"], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)
