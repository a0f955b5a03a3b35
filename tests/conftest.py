"""Test setup: 8 simulated CPU devices (must be set before jax initialises its backend)."""
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data beside the repo; skips when absent (a user's fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the repo in CI)")
  return SHARED_DATA
