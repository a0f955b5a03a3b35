"""Shared benchmark utilities: timing, FLOP/MFU accounting, device info, tables and JSON.

Timing rule: every benchmark warms up (the first call, which compiles, is timed
and reported separately), then takes the median of `repeats` timed calls. When
two implementations are compared in one process, their repeats are interleaved
(A, B, A, B, ...) so that load from other processes on a shared machine hits
both alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense peak TFLOP/s per chip for the usual training dtype (bf16), from vendor spec sheets.
PEAK_TFLOPS = {
    "h100": 989.0,     # H100 SXM bf16 dense
    "h200": 989.0,     # same compute as H100 SXM
    "a100": 312.0,
    "tpu v4": 275.0,
    "tpu v5p": 459.0,
    "tpu v5 lite": 197.0,
    "tpu v6 lite": 918.0,
}


def configure_process(argv=None) -> int:
  """Reads `--threads N` from the command line BEFORE jax/torch are imported and limits both
  sides to N cores: CPU affinity of the process (XLA sizes its thread pools from it), XLA's
  multi-threaded Eigen off for N = 1, OMP_NUM_THREADS for torch (`torch_ref.torch_setup` also
  calls torch.set_num_threads). 0 (default) = all cores, nothing changed. Returns N.

  Also sets the process's host allocator (`rlhf_jax.host_malloc`, mode from RLHF_JAX_HOST_MALLOC,
  default "reuse"), as `python -m rlhf_jax.main` does: one process holds both sides, so PyTorch's
  CPU tensors get the same allocator as XLA's buffers. `machine_info()` records the mode.

  On a shared, oversubscribed machine one core per side is the fair setting: torch's OpenMP
  pool spin-waits when its threads are descheduled and slows down far more than XLA's.
  """
  import sys
  global _THREADS
  if _THREADS is not None:   # already applied by the benchmark that imported this one
    return _THREADS
  argv = sys.argv[1:] if argv is None else argv
  n = 0
  for i, a in enumerate(argv):
    if a == "--threads" and i + 1 < len(argv):
      n = int(argv[i + 1])
    elif a.startswith("--threads="):
      n = int(a.split("=", 1)[1])
  if n > 0:
    if "jax" in sys.modules or "torch" in sys.modules:
      raise RuntimeError("benchmarks: --threads must be applied before jax/torch are imported")
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)
    if n == 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ["OMP_NUM_THREADS"] = str(n)
  from rlhf_jax import host_malloc
  global _HOST_MALLOC
  _HOST_MALLOC = host_malloc.configure()
  _THREADS = n
  return n


_THREADS: int | None = None
_HOST_MALLOC: dict = {}


def add_common_flags(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1) -> None:
  p.add_argument("--threads", type=int, default=0,
                 help="CPU threads per side (XLA intra-op and torch); 0 = all cores. Read before "
                      "jax is imported (see configure_process)")
  p.add_argument("--repeats", type=int, default=repeats, help="timed calls per measurement (median taken)")
  p.add_argument("--warmup", type=int, default=warmup, help="untimed calls after the first (compiling) one")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s of one device for MFU (default: known table by device kind; none on CPU)")
  p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<name>.json)")
  p.add_argument("--seed", type=int, default=0)


def _by_device_kind(table: dict[str, float], flag: float | None) -> float | None:
  """flag, else the first table entry whose name is in jax.devices()[0].device_kind, else None (e.g. CPU)."""
  if flag:
    return float(flag)
  import jax
  kind = jax.devices()[0].device_kind.lower()
  return next((value for name, value in table.items() if name in kind), None)


def peak_tflops(flag: float | None = None) -> float | None:
  """--peak_tflops, else the PEAK_TFLOPS entry of this device kind, else None (e.g. CPU)."""
  return _by_device_kind(PEAK_TFLOPS, flag)


# Memory bandwidth per chip (HBM), GB/s, from vendor spec sheets: the decode roofline's denominator.
HBM_GBS = {
    "h100 pcie": 2000.0,
    "h100": 3350.0,    # H100 SXM
    "h200": 4800.0,
    "a100": 2039.0,    # A100 80GB SXM
    "tpu v4": 1200.0,
    "tpu v5p": 2765.0,
    "tpu v5 lite": 819.0,
    "tpu v6 lite": 1640.0,
}


def memory_gbs(flag: float | None = None) -> float | None:
  """--mem_gbs, else the HBM_GBS entry of this device kind ("h100 pcie" is listed before "h100"), else None
  (CPU: pass the rate `benchmarks.cpu_limits`' stream test measures)."""
  return _by_device_kind(HBM_GBS, flag)


def decode_step_bytes(params, cfg, batch: int, context: float) -> dict:
  """Bytes one decode step must read at least: every weight the step multiplies by, as stored (the unembedding
  in full; of the position table and an untied input embedding only `batch` rows, not counted), plus the K/V
  cache of `context` filled slots per row (all layers, compute dtype). Our cache is a static window the step
  reads in full, so this is the ideal, not our implementation's count.

  Returns {"weights": int, "kv_cache": int, "total": int}.
  """
  import jax
  import numpy as np
  skip = {"wpe"} | (set() if cfg.tie_embeddings else {"wte"})
  weights = sum(int(x.nbytes) for k, v in params.items() if k not in skip for x in jax.tree.leaves(v))
  kv = int(round(2 * cfg.n_layer * batch * cfg.kv_heads * context * cfg.d_head * np.dtype(cfg.compute_dtype).itemsize))
  return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def dot_gflops(dtype: str = "float32", n: int = 1024, repeats: int = 10) -> float:
  """This device's rate for one jitted [n,n] x [n,n] dot with `dtype` operands and a float32 result (the form
  `layers.dense` uses), GFLOP/s, median of `repeats` calls: the denominator of a matmul-bound floor."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
  t = time_calls({"dot": lambda: f(a, a).block_until_ready()}, repeats, 1)["dot"]
  return 2 * n ** 3 / t["median_s"] / 1e9


def matmul_floor(flops: float, dtype: str, timing: dict, reference: str | None = None) -> dict:
  """`flops` of matmul work at this core's large-dot rate (`dot_gflops(dtype)`): the time no implementation of it
  can beat on this device, each timed side's CPU time over it, and the speed-up over `reference` that the floor
  would allow (`max_speedup_over_<reference>`). `timing`: `time_calls`' result."""
  gflops = dot_gflops(dtype)
  out = {"flops": flops, "dot_gflops": gflops, "floor_s": flops / gflops / 1e9}
  for name, t in timing.items():
    out[f"{name}_over_floor"] = t["cpu_median_s"] / out["floor_s"]
  if reference in timing:
    out[f"max_speedup_over_{reference}"] = timing[reference]["cpu_median_s"] / out["floor_s"]
  return out


def floor_line(floor: dict, dtype: str) -> str:
  """One printed line for `matmul_floor`'s result."""
  return (f"{floor['flops'] / 1e9:.1f} GFLOP at {floor['dot_gflops']:.0f} GFLOP/s ({dtype} [1024]^3 dot, this core) "
          f"= {floor['floor_s']:.3f} s; " +
          ", ".join(f"{k} {v:.2f}x" for k, v in floor.items() if k.endswith("_over_floor") or k.startswith("max_")))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, n_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: achieved model FLOP/s over n_devices x peak (None without a peak)."""
  if not peak:
    return None
  return tokens_per_s * flops_per_token / (peak * 1e12 * n_devices)


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 (None where the backend keeps no statistics, e.g. CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))


def machine_info() -> dict:
  import jax
  from rlhf_jax import decode_kernels
  cpu = platform.processor()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  d = jax.devices()[0]
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
          "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__, "platform": d.platform,
          "device_kind": d.device_kind, "device_count": jax.device_count(),
          "loadavg_1m_at_start": os.getloadavg()[0], "host_malloc": _HOST_MALLOC,
          "decode_compiler_options": dict(decode_kernels.options())}


def time_calls(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
  """Times each zero-arg blocking callable: the first (compiling) call, `warmup` untimed calls,
  then `repeats` timed calls interleaved across the callables.

  Returns {name: {first_s, first_result, median_s, min_s, times_s, cpu_median_s, cpu_times_s,
  compile_s}}: wall-clock seconds, and process CPU seconds (all threads) per call, which on a
  loaded machine measures the work done independently of scheduling delays (comparable across
  implementations only when both run on one thread: spinning thread pools add CPU time).
  compile_s = first_s - median_s (compilation, tracing and first-run allocation).
  """
  out = {}
  for name, fn in fns.items():
    t = time.perf_counter()
    first = fn()
    out[name] = {"first_s": time.perf_counter() - t, "first_result": first}
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t, c = time.perf_counter(), time.process_time()
      fn()
      times[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  for name, ts in times.items():
    out[name].update(median_s=statistics.median(ts), min_s=min(ts), times_s=ts,
                     cpu_median_s=statistics.median(cpu[name]), cpu_times_s=cpu[name],
                     compile_s=max(out[name]["first_s"] - statistics.median(ts), 0.0))
  return out


def fmt(x, digits=3) -> str:
  if x is None:
    return "n/a"
  if isinstance(x, float):
    return f"{x:.{digits}g}"
  return str(x)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  if title:
    print(f"\n{title}")
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: dict, path: str | None = None) -> Path:
  path = Path(path) if path else RESULTS_DIR / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {**payload, "loadavg_1m_at_end": os.getloadavg()[0]}
  path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
  print(f"\nwrote {path}")
  return path


def speedup_verdict(timing: dict, ours: str, theirs: str, target: float) -> dict:
  """Speed-up of `ours` over `theirs` (ratio of median wall times, and of median CPU times)
  and whether the wall-clock speed-up meets `target`."""
  s = timing[theirs]["median_s"] / timing[ours]["median_s"]
  s_cpu = timing[theirs]["cpu_median_s"] / timing[ours]["cpu_median_s"]
  return {"speedup": s, "speedup_cpu_time": s_cpu, "target": target, "met": bool(s >= target)}


def verdict_line(v: dict, what: str) -> str:
  return (f"{what} speed-up (ours vs reference): {v['speedup']:.2f}x wall, {v['speedup_cpu_time']:.2f}x CPU time "
          f"-- target {v['target']}x: {'met' if v['met'] else 'NOT met'}")
