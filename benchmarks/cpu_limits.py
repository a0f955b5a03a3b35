"""What bounds our CPU figures: matmul throughput per dtype on each stack, and the memory bandwidth a
decode step's weight reads get.

  python -m benchmarks.cpu_limits --threads 1 [--size 1024 --repeats 20]

dot:    a [n,n] x [n,n] matmul, float32 and bfloat16, jitted (XLA:CPU) and in torch; GFLOP/s, and
        whether XLA's optimised HLO converts the bf16 operands to f32 (then no bf16 instruction runs).
stream: `steps` rounds of [8,256] x [256,1024] matmuls (a decode step's shape at batch 8) over a set
        of distinct f32 weight matrices of 1, 4, 13 and 26 MB in one jitted loop; GB/s of weights
        read: the rate XLA:CPU's small-batch matmuls get their weights at, from cache or memory.
read:   GB/s of one jitted sum over 512 MB: the rate memory can be read at, so parameter + cache bytes /
        this rate is a decode step's memory bound (benchmarks/RESULTS.md).
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
  """Decode-shaped matmuls over `count` distinct weight buffers (separate arguments, as the decoder's per-layer
  parameters are: slicing one stacked array inside the loop copies each slice and halves the rate)."""
  m, k, n = 8, 256, 1024
  rows = []
  for count in (1, 4, 13, 26):
    ws = [jnp.asarray(np.random.default_rng(j).standard_normal((k, n), np.float32)) for j in range(count)]
    x = jnp.ones((m, k), jnp.float32)

    @jax.jit
    def loop(x, ws):
      def body(_, c):
        for w in ws:
          c = jnp.tanh(c @ w)[:, :k] * 0.5 + c
        return c
      return jax.lax.fori_loop(0, steps, body, x)
    t = common.time_calls({"xla": lambda: loop(x, ws).block_until_ready()}, repeats, warmup)["xla"]
    per_round = t["median_s"] / steps
    nbytes = sum(w.nbytes for w in ws)
    rows.append({"test": "stream", "impl": "xla", "weights_mb": nbytes / 1e6, "us_per_matmul": per_round / count * 1e6,
                 "gb_per_s": nbytes / per_round / 1e9})
  return rows


def read_gbs(repeats: int, warmup: int, mb: int = 512) -> float:
  """GB/s of one jitted sum over a float32 array of `mb` MB (far larger than the caches): the rate this core
  reads memory sequentially, the denominator of a decode step's memory bound (`generate --mem_gbs`)."""
  a = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  t = common.time_calls({"xla": lambda: f(a).block_until_ready()}, repeats, warmup)["xla"]
  return a.nbytes / t["median_s"] / 1e9


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=int, default=1024, help="n of the dot test's [n,n] x [n,n]")
  common.add_common_flags(p, repeats=20)
  args = p.parse_args(argv)
  # The XLA-only tests first: run after torch's dots, the stream test measured half its rate alone (torch's threads
  # and allocations stay behind).
  streams, read = stream_rows(args.repeats, args.warmup), read_gbs(args.repeats, args.warmup)
  dots = dot_rows(args.size, args.repeats, args.warmup)
  common.print_table(dots, ["impl", "dtype", "n", "median_s", "gflops", "bf16_converted_to_f32"],
                     f"matmul throughput, threads={args.threads or 'all'}")
  common.print_table(streams, ["weights_mb", "us_per_matmul", "gb_per_s"],
                     "weight streaming: [8,256] x [256,1024] matmuls over distinct weights")
  print(f"sequential read (jitted sum over 512 MB): {read:.1f} GB/s")
  common.write_json("cpu_limits", {"machine": common.machine_info(), "args": vars(args), "dot": dots,
                                   "stream": streams, "read_gb_per_s": read}, args.out)


if __name__ == "__main__":
  main()
