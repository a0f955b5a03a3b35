"""Random-init GPT parameters for the tests, made on first use and shared by every module of a process.

Not at import: under xdist every worker imports every test module to collect it, so parameters built at module
level were built by each of the three workers for every module, though one worker runs it (~1 s of compilation a
module). `init_params` jits `gpt.init` once per config (one program, not one per initialiser op) and keeps the
result per (config, seed), so the modules that use the same model share its parameters too.
"""
from __future__ import annotations

import functools

import jax

from rlhf_jax.model import gpt

_init = jax.jit(gpt.init, static_argnums=0)


@functools.cache
def init_params(cfg: gpt.GPTConfig, seed: int = 0):
  """`gpt.init(cfg, PRNGKey(seed))`, jitted; the same arrays for every call with equal arguments (they are immutable)."""
  return _init(cfg, jax.random.PRNGKey(seed))
