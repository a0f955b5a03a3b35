"""host_malloc: with "reuse", XLA:CPU's per-execution temporaries stop being faulted in afresh on every call."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax import host_malloc

REPO = Path(__file__).resolve().parents[1]
# The gradient of a two-layer MLP at 4096 rows: its 16 MB activations are XLA temporaries, allocated
# from a worker thread as in a train step. Seven calls after eight (the heap grows to
# its steady layout over the first few); the median of the process's minor page
# faults per call (16 MB = 4096 pages of 4 KB).
PROBE = """
import json, resource
from rlhf_jax import host_malloc
applied = host_malloc.configure()["applied"]
import jax, jax.numpy as jnp
def loss(w1, w2, x):
  return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2) ** 2)
x, w1, w2 = jnp.ones((4096, 64)), jnp.full((64, 1024), 0.01), jnp.full((1024, 64), 0.01)
f = jax.jit(jax.grad(loss, argnums=(0, 1)))
for _ in range(8):
  jax.block_until_ready(f(w1, w2, x))
faults = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(w1, w2, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_call": sorted(faults)[3], "faults": faults}))
"""


def _probe(mode):
  env = {"RLHF_JAX_HOST_MALLOC": mode, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_malloc.glibc_version(), reason="host_malloc only changes glibc's malloc")
def test_reuse_stops_refaulting_the_per_call_buffers():
  reuse, system = _probe("reuse"), _probe("system")
  assert reuse["applied"] and not system["applied"]
  thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
  if not (thp.exists() and "[always]" in thp.read_text()):   # 2 MB pages would fault 512x less often
    assert system["faults_per_call"] > 4096, system           # glibc maps the activations afresh each call
    assert reuse["faults_per_call"] < system["faults_per_call"] / 3, (reuse, system)


def test_modes_and_errors(monkeypatch):
  assert host_malloc.configure("system") == {"mode": "system", "applied": False}
  monkeypatch.setenv(host_malloc.ENV, "system")
  assert host_malloc.configure()["mode"] == "system"
  with pytest.raises(ValueError, match="RLHF_JAX_HOST_MALLOC"):
    host_malloc.configure("jemalloc")
