"""Which XLA:CPU kernels the decoding programs (sampling, beam search) are compiled with.

A decode step multiplies a handful of rows (the batch) by every weight matrix: GEMV-shaped dots that read
each weight once, plus small reductions and elementwise ops. XLA:CPU hands dots, reductions and elementwise
chains to YNNPACK fusions by default. On AMD Zen 3 (x86 with AVX2 and no AVX-512) XLA's own emitters and
Eigen run the decode step faster: the mini model's step (4 x 256, batch 8) 4.8 -> 3.3 ms, `generate` 2.16x
-> 2.85x transformers (benchmarks/RESULTS.md, 2026-12-03). There the training programs' large dots are
YNNPACK's strength (70 vs 40 GFLOP/s), so only the decoding programs change; a PPO iteration, whose rollout
is inlined into the jitted RL step, keeps the default. On the AVX-512 Xeon the default measured 3.13x and
was left as it is.

That holds for a few rows only: at batch 64 (the evaluation's sampling batch) YNNPACK's decode step is faster
(8.6 vs 11.8 ms), at 32 the two tie in the decode and YNNPACK's prefill is faster, at 16 XLA's kernels win
(decode 4.4 vs 6.0 ms). So `auto` switches by the program's batch rows (a static shape).

Modes (environment variable RLHF_JAX_CPU_DECODE, read when a program is compiled):
  auto     (default) XLA's kernels on x86 CPUs without AVX-512 for at most MAX_ROWS rows, YNNPACK otherwise;
  ynnpack  XLA:CPU's default everywhere;
  xla      YNNPACK fusions off for the decoding programs on any CPU.
Non-CPU backends always get their defaults. The two choices compute the same model; their float32
rounding differs in the last bits (sampled log-probs within 5.2e-6 on the test's nano model, 1.4e-6 on mini, tokens
equal; tests/test_decode_kernels.py).

The option, `xla_cpu_experimental_ynn_fusion_type`, is XLA's experimental one: a jax whose XLA no longer
knows it would fail to compile, so it is first tried on a one-op program, and if that fails the defaults are
used (with one warning).
"""
from __future__ import annotations

import functools
import os
import platform
import warnings

import jax

ENV = "RLHF_JAX_CPU_DECODE"
MODES = ("auto", "ynnpack", "xla")
MAX_ROWS = 16
_NO_YNNPACK = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
  """The first CPU's feature flags from /proc/cpuinfo ('avx2', 'avx512f', ...); empty where unreadable."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def choose(mode: str, backend: str, machine: str, flags: frozenset, rows: int) -> tuple:
  """The compiler options (a tuple of (key, value) pairs; () = defaults) for a decoding program.

  mode: one of MODES; backend: jax.default_backend(); machine: platform.machine(); flags: `cpu_flags()`;
  rows: the rows the program decodes at once (batch x beams)."""
  if mode not in MODES:
    raise ValueError(f"rlhf_jax/decode_kernels.py: {ENV}={mode!r} must be one of {MODES}")
  if backend != "cpu" or mode == "ynnpack":
    return ()
  if mode == "xla":
    return _NO_YNNPACK
  x86 = machine.lower() in ("x86_64", "amd64", "i686", "i386")
  return _NO_YNNPACK if x86 and "avx2" in flags and "avx512f" not in flags and rows <= MAX_ROWS else ()


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
  """Whether this jax's XLA compiles a program with these options."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    return True
  except Exception as e:  # an unknown option or value: XLA raises its own error type
    warnings.warn(f"rlhf_jax/decode_kernels.py: XLA rejected {dict(options)} ({type(e).__name__}: "
                  f"{str(e)[:200]}); the decoding programs use XLA's defaults")
    return False


def options(rows: int = 1) -> tuple:
  """This process's compiler options for a decoding program of `rows` rows (see the module docstring)."""
  opts = choose(os.environ.get(ENV, "auto"), jax.default_backend(), platform.machine(), cpu_flags(), rows)
  return opts if opts and _accepted(opts) else ()


class _Jit:
  """`jax.jit(fn, **kwargs)` with `options(rows)` as its compiler options, chosen at each call (not at import:
  importing a module must not start JAX's backend). One jitted function per options, so programs of
  different batch sizes, or a changed RLHF_JAX_CPU_DECODE, get their own. Called inside another jitted function, it is
  inlined into that program, which keeps its own options."""

  def __init__(self, fn, rows, kwargs):
    self._fn, self._rows, self._kwargs, self._jitted = fn, rows, kwargs, {}
    functools.update_wrapper(self, fn)

  def _get(self, args, kwargs):
    # Inside another jit (traced arguments) only the top-level program may carry compiler options.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
    opts = () if traced else options(int(self._rows(*args, **kwargs)))
    if opts not in self._jitted:
      self._jitted[opts] = jax.jit(self._fn, compiler_options=dict(opts) or None, **self._kwargs)
    return self._jitted[opts]

  def __call__(self, *args, **kwargs):
    return self._get(args, kwargs)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._get(args, kwargs).lower(*args, **kwargs)


def jit(fn=None, *, rows, **kwargs):
  """`jax.jit` for decoding programs: `decode_kernels.jit(fn, rows=..., static_argnames=...)`, or as a decorator
  `@functools.partial(decode_kernels.jit, rows=..., static_argnames=...)`. rows(*args, **kwargs) -> int: the
  rows the call decodes at once (a static shape, e.g. `lambda params, cfg, tokens, *a, **k: tokens.shape[0]`)."""
  if fn is None:
    return lambda f: _Jit(f, rows, kwargs)
  return _Jit(fn, rows, kwargs)
