"""How our SFT train step scales: with sequence length and model size (against the FLOP count of
`GPTConfig.flops_per_token`), and with the number of (simulated) devices.

  python -m benchmarks.scaling [--repeats 5] [--threads 1] [--devices 1,2,4]

Sequence/model sweeps run in this process on one device. The device sweep starts one
child process per device count n (XLA_FLAGS --xla_force_host_platform_device_count=n on
CPU), each running the same global batch data-parallel over n devices. On a CPU host the
simulated devices share the same cores, so this measures the partitioning overhead, not a
speed-up; on an accelerator host, pass the real device counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import common

common.configure_process()   # before jax is imported

MODELS = {  # name: preset overrides (all vocab 512, max_len 256, dropout 0)
    "nano": dict(n_layer=2, d_model=64, n_head=4),
    "tiny": dict(n_layer=2, d_model=128, n_head=4),
    "mini": dict(n_layer=4, d_model=256, n_head=8),
    "small": dict(n_layer=6, d_model=384, n_head=6),
}


def model_cfg(name: str, dtype="float32"):
  from rlhf_jax.model import gpt
  return gpt.preset("mini", dropout=0.0, dtype=dtype, head_dim=0, **MODELS[name])


def measure(cfg, batch: int, seq: int, args, devices=None) -> dict:
  from benchmarks import sft_step
  data = sft_step.sft_batch(cfg, batch, seq, args.seed)
  run, _ = sft_step.make_ours(cfg, data, args.seed, devices)
  t = common.time_calls({"step": run}, args.repeats, args.warmup)["step"]
  flops = batch * seq * cfg.flops_per_token(seq)
  return {"step_s": t["median_s"], "cpu_step_s": t["cpu_median_s"], "compile_s": t["compile_s"],
          "step_gflop": flops / 1e9, "tokens_per_s": batch * seq / t["median_s"],
          "gflops_per_s": flops / t["median_s"] / 1e9, "gflops_per_cpu_s": flops / t["cpu_median_s"] / 1e9}


def with_prediction(rows: list[dict]) -> list[dict]:
  """Adds predicted step time: the first row's time scaled by the FLOP ratio."""
  base = rows[0]
  for r in rows:
    r["predicted_cpu_s"] = base["cpu_step_s"] * r["step_gflop"] / base["step_gflop"]
    r["measured/predicted"] = r["cpu_step_s"] / r["predicted_cpu_s"]
  return rows


def device_worker(args) -> None:
  import jax
  cfg = model_cfg(args.model)
  res = measure(cfg, args.batch, args.seq, args, jax.devices())
  res["devices"] = jax.device_count()
  with open(args.json_out, "w") as f:
    json.dump(res, f)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="mini", choices=sorted(MODELS), help="model of the seq/device sweeps")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128, help="sequence length of the model/device sweeps")
  p.add_argument("--seqs", default="64,128,256")
  p.add_argument("--models", default="nano,tiny,mini,small")
  p.add_argument("--devices", default="1,2,4")
  p.add_argument("--device_worker", action="store_true", help="(internal) one device-sweep point")
  p.add_argument("--json_out", default=None)
  common.add_common_flags(p, repeats=5)
  args = p.parse_args(argv)
  if args.device_worker:
    return device_worker(args)

  import jax
  peak = common.peak_tflops(args.peak_tflops)
  seq_rows = []
  for seq in [int(s) for s in args.seqs.split(",")]:
    cfg = model_cfg(args.model)
    seq_rows.append({"seq": seq, **measure(cfg, args.batch, seq, args)})
  with_prediction(seq_rows)
  model_rows = []
  for name in args.models.split(","):
    cfg = model_cfg(name)
    r = measure(cfg, args.batch, args.seq, args)
    model_rows.append({"model": name, "params_M": cfg.num_params() / 1e6, **r,
                       "mfu": common.mfu(r["tokens_per_s"], cfg.flops_per_token(args.seq), peak)})
  with_prediction(model_rows)

  dev_rows = []
  for n in [int(d) for d in args.devices.split(",")]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
      flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
      env = {**os.environ, "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])}
      cmd = [sys.executable, "-m", "benchmarks.scaling", "--device_worker", "--json_out", out.name,
             f"--model={args.model}", f"--batch={args.batch * 2}", f"--seq={args.seq}",
             f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--seed={args.seed}",
             f"--threads={args.threads}"]
      subprocess.run(cmd, env=env, check=True, cwd=common.RESULTS_DIR.parents[1], capture_output=True)
      dev_rows.append(json.load(open(out.name)))
  for r in dev_rows:
    r["speedup_vs_1"] = dev_rows[0]["step_s"] / r["step_s"]

  title = f"threads={args.threads or 'all'}, device {jax.devices()[0].device_kind}, float32, batch {args.batch}"
  common.print_table(seq_rows, ["seq", "step_s", "cpu_step_s", "step_gflop", "predicted_cpu_s", "measured/predicted",
                                "gflops_per_cpu_s", "compile_s"],
                     f"Step time vs sequence length ({args.model}; {title})")
  common.print_table(model_rows, ["model", "params_M", "step_s", "cpu_step_s", "step_gflop", "predicted_cpu_s",
                                  "measured/predicted", "gflops_per_cpu_s", "mfu", "compile_s"],
                     f"Step time vs model size (seq {args.seq}; {title})")
  common.print_table(dev_rows, ["devices", "step_s", "cpu_step_s", "tokens_per_s", "speedup_vs_1", "compile_s"],
                     f"Throughput vs simulated devices ({args.model}, global batch {args.batch * 2} x seq "
                     f"{args.seq}, data-parallel; {os.cpu_count()} physical cores shared by all devices)")
  common.write_json("scaling", {"machine": common.machine_info(), "args": vars(args), "seq_sweep": seq_rows,
                                "model_sweep": model_rows, "device_sweep": dev_rows,
                                "peak_memory_bytes": common.peak_memory_bytes()}, args.out)


if __name__ == "__main__":
  main()
