"""Keeps glibc from returning XLA:CPU's per-execution buffers to the kernel after every step.

XLA:CPU allocates each execution's temporaries as one block (a pretraining step of the main job's
0.48M-parameter model at 32 x 128 tokens: 186 MB) with `posix_memalign`, from the worker thread that
runs the program. glibc serves a block that large from a fresh `mmap` (it is above the mmap threshold,
and a worker thread's arena cannot hold it) and `munmap`s it when the step ends, so every step faults
in and zeroes 186 MB of new pages: ~50k page faults and ~0.1 s of kernel time per step, a third of the
step's CPU time on a 2-core machine (benchmarks/RESULTS.md). PyTorch's CPU allocator goes through the
same `posix_memalign`.

`configure("reuse")` sets three glibc malloc options for the whole process:
  M_ARENA_MAX = 1        every thread allocates from the main arena, which grows with brk and can hold
                         blocks of any size;
  M_MMAP_MAX = 0         no allocation is served by its own mmap;
  M_TRIM_THRESHOLD = 2 GiB  freed memory at the top of the heap stays mapped (up to 2 GiB).
A freed block is then reused by the next step without new page faults. The cost: the process keeps
its peak heap (resident memory does not shrink after a large step) and threads share one malloc
arena. The programs and their results are unchanged: only where host memory comes from changes.

Call it first thing in a process, before JAX starts its backend (the thread pools pick their arenas
on first use): `rlhf_jax.main`, the benchmarks and the test suite do. It does nothing on a C library
other than glibc (macOS, musl) and with mode "system" (or RLHF_JAX_HOST_MALLOC=system).
"""
from __future__ import annotations

import ctypes
import os

MODES = ("reuse", "system")
ENV = "RLHF_JAX_HOST_MALLOC"
# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_OPTIONS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def glibc_version() -> str:
  """'2.36' under glibc, '' under any other C library."""
  try:
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (ValueError, OSError, AttributeError):
    return ""
  return name.split()[-1] if name.startswith("glibc") else ""


def configure(mode: str = "") -> dict:
  """Applies `mode` ('' = $RLHF_JAX_HOST_MALLOC, else "reuse") to this process's glibc malloc.

  Returns {"mode", "applied"}: applied is False under "system" or without glibc. Raises ValueError
  naming the bad mode, and RuntimeError if glibc refuses an option.
  """
  mode = mode or os.environ.get(ENV, "") or "reuse"
  if mode not in MODES:
    raise ValueError(f"host malloc mode {mode!r} (argument or ${ENV}): expected one of {MODES}")
  if mode == "system" or not glibc_version():
    return {"mode": mode, "applied": False}
  libc = ctypes.CDLL(None)
  for param, value in _OPTIONS:
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
      raise RuntimeError(f"glibc {glibc_version()} refused mallopt({param}, {value})")
  return {"mode": mode, "applied": True}
