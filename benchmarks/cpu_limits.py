"""What bounds our CPU figures: matmul throughput per dtype on each stack, and the memory bandwidth a
decode step's weight reads get.

  python -m benchmarks.cpu_limits --threads 1 [--size 1024 --repeats 20]

dot:    a [n,n] x [n,n] matmul, float32 and bfloat16, jitted (XLA:CPU) and in torch; GFLOP/s, and
        whether XLA's optimised HLO converts the bf16 operands to f32 (then no bf16 instruction runs).
stream: `steps` rounds of [8,256] x [256,1024] matmuls (a decode step's shape at batch 8) over a set
        of distinct f32 weight matrices of 1, 4, 14 and 27 MB in one jitted loop; GB/s of weights
        read. Once the set outgrows the caches, this is the rate a decode step reads its parameters at,
        so parameter bytes / this rate bounds the step (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse

from benchmarks import common

common.configure_process()   # before jax/torch are imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_ref  # noqa: E402


def dot_rows(n: int, repeats: int, warmup: int) -> list[dict]:
  torch = torch_ref.torch_setup()
  rows = []
  for name in ("float32", "bfloat16"):
    a = jnp.ones((n, n), name)
    f = jax.jit(lambda x, y: x @ y)
    ta = torch.ones(n, n, dtype=getattr(torch, name))
    t = common.time_calls({"xla": lambda: f(a, a).block_until_ready(), "torch": lambda: ta @ ta}, repeats, warmup)
    converts = "convert" in f.lower(a, a).compile().as_text()
    for impl, timing in t.items():
      rows.append({"test": "dot", "impl": impl, "dtype": name, "n": n, "median_s": timing["median_s"],
                   "gflops": 2 * n ** 3 / timing["median_s"] / 1e9,
                   "bf16_converted_to_f32": converts if impl == "xla" and name == "bfloat16" else None})
  return rows


def stream_rows(repeats: int, warmup: int, steps: int = 64) -> list[dict]:
  m, k, n = 8, 256, 1024
  rows = []
  for count in (1, 4, 13, 26):
    ws = jnp.asarray(np.random.default_rng(0).standard_normal((count, k, n), np.float32))
    x = jnp.ones((m, k), jnp.float32)

    @jax.jit
    def loop(x, ws, count=count):
      def body(_, c):
        for j in range(count):
          c = jnp.tanh(c @ ws[j])[:, :k] * 0.5 + c
        return c
      return jax.lax.fori_loop(0, steps, body, x)
    t = common.time_calls({"xla": lambda: loop(x, ws).block_until_ready()}, repeats, warmup)["xla"]
    per_round = t["median_s"] / steps
    rows.append({"test": "stream", "impl": "xla", "weights_mb": ws.nbytes / 1e6, "us_per_matmul": per_round / count * 1e6,
                 "gb_per_s": ws.nbytes / per_round / 1e9})
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=int, default=1024, help="n of the dot test's [n,n] x [n,n]")
  common.add_common_flags(p, repeats=20)
  args = p.parse_args(argv)
  dots, streams = dot_rows(args.size, args.repeats, args.warmup), stream_rows(args.repeats, args.warmup)
  common.print_table(dots, ["impl", "dtype", "n", "median_s", "gflops", "bf16_converted_to_f32"],
                     f"matmul throughput, threads={args.threads or 'all'}")
  common.print_table(streams, ["weights_mb", "us_per_matmul", "gb_per_s"],
                     "weight streaming: [8,256] x [256,1024] matmuls over distinct weights")
  common.write_json("cpu_limits", {"machine": common.machine_info(), "args": vars(args), "dot": dots,
                                   "stream": streams}, args.out)


if __name__ == "__main__":
  main()
