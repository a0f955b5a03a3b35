"""SFT train step throughput: ours (jitted, sharded step from rlhf_jax.train) vs transformers
GPT2LMHeadModel + torch.optim.AdamW, on the same weights, batch, sequence length and dtype.

  python -m benchmarks.sft_step [--preset mini --batch 8 --seq 128 --repeats 7]

Both sides do one full optimizer step per call: forward, masked next-token loss (loss
on the "response" tokens only, as in SFT), backward, global-norm clipping, AdamW
(same hyperparameters and decay mask). Tokens/s counts every position of the batch.
"""
from __future__ import annotations

import argparse
import contextlib

from benchmarks import common

common.configure_process()   # before jax/torch are imported

import jax  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_ref  # noqa: E402
from rlhf_jax import parallel  # noqa: E402
from rlhf_jax.model import gpt  # noqa: E402
from rlhf_jax.train import state as state_lib, steps  # noqa: E402

TARGET = 1.5


def sft_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
  """Random tokens; the loss mask covers the last 3/4 of each row (a prompt of seq/4 tokens)."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  mask = np.zeros((batch, seq), np.int32)
  mask[:, seq // 4:] = 1
  return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}


def optim_config(lr=1e-4):
  return mlc.ConfigDict(dict(lr=lr, total_steps=10**6, warmup_steps=0, schedule="constant", weight_decay=0.1,
                             grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8))


def make_ours(cfg, batch, seed=0, devices=None):
  """(step_fn, initial params): step_fn() runs one jitted train step (data-parallel over
  `devices`, default one device) and returns the loss (blocking); step_fn.lower() lowers that step."""
  mesh = parallel.make_mesh(None, devices or jax.devices()[:1])
  opt = state_lib.make_optimizer(optim_config())
  state, shardings = state_lib.create_state(lambda r: gpt.init(cfg, r), opt, mesh, gpt.param_axes(cfg),
                                            jax.random.PRNGKey(seed))
  params0 = jax.device_get(state["params"])
  step = state_lib.jit_step(steps.make_train_step(steps.lm_loss_fn(cfg), opt), shardings, mesh)
  sharded = parallel.put_batch(batch, mesh)
  box = {"state": state}

  def run():
    box["state"], m = step(box["state"], sharded)
    return float(m["loss"])   # blocks
  run.lower = lambda: step.lower(box["state"], sharded)   # for benchmarks.xla_profile
  return run, params0


def make_torch(cfg, params, batch, autocast=None):
  """autocast: None (float32), or "bfloat16"/"float16": torch.autocast's mixed precision, float32 master weights
  and optimizer (the counterpart of our `dtype` with float32 params)."""
  torch = torch_ref.torch_setup()

  def ctx():
    return torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()

  model = torch_ref.hf_model(cfg, params)
  model.train()
  opt = torch_ref.adamw(model, lr=1e-4)
  tb = torch_ref.to_torch(batch)

  def run():
    opt.zero_grad(set_to_none=True)
    with ctx():
      logits = model(input_ids=tb["tokens"]).logits
      loss = torch_ref.masked_lm_loss(logits, tb["targets"], tb["mask"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()
  return run, model


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="mini")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", help="our compute dtype (float32 master weights)")
  p.add_argument("--torch_dtype", default="float32",
                 help="the torch side's compute dtype: float32, or bfloat16 / float16 under torch.autocast")
  p.add_argument("--remat", default="auto", help="auto (per backend: none on CPU, dots elsewhere) | none | dots | full")
  p.add_argument("--scan_layers", type=int, default=-1,
                 help="-1: per backend (unrolled on CPU, scanned elsewhere), 1: lax.scan over blocks, 0: unrolled")
  common.add_common_flags(p, repeats=7)
  args = p.parse_args(argv)
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype, remat=args.remat,
                   scan_layers=None if args.scan_layers < 0 else bool(args.scan_layers))
  batch = sft_batch(cfg, args.batch, args.seq, args.seed)
  ours, params0 = make_ours(cfg, batch, args.seed)
  theirs, _ = make_torch(cfg, params0, batch, None if args.torch_dtype == "float32" else args.torch_dtype)
  timing = common.time_calls({"ours": ours, "torch": theirs}, args.repeats, args.warmup)
  # Same weights and batch: the first losses must agree (the same computation on both sides).
  first = {name: t["first_result"] for name, t in timing.items()}
  tokens = args.batch * args.seq
  fpt = cfg.flops_per_token(args.seq)
  peak = common.peak_tflops(args.peak_tflops)
  rows = []
  for name, t in timing.items():
    tps = tokens / t["median_s"]
    rows.append({"impl": name, "median_step_s": t["median_s"], "cpu_step_s": t["cpu_median_s"],
                 "min_step_s": t["min_s"], "tokens_per_s": tps, "model_tflops": tps * fpt / 1e12,
                 "mfu": common.mfu(tps, fpt, peak), "compile_s": t["compile_s"] if name == "ours" else None,
                 "first_loss": first[name]})
  verdict = common.speedup_verdict(timing, "ours", "torch", TARGET)
  common.print_table(rows, ["impl", "median_step_s", "cpu_step_s", "min_step_s", "tokens_per_s", "model_tflops",
                            "mfu", "compile_s", "first_loss"],
                     f"SFT step: {args.preset} ({cfg.num_params() / 1e6:.2f}M params), batch {args.batch} x "
                     f"seq {args.seq}, ours {args.dtype} / torch {args.torch_dtype}, remat={cfg.resolved_remat()}, scan_layers={cfg.resolved_scan_layers()}, "
                     f"threads={args.threads or 'all'}")
  print(common.verdict_line(verdict, "SFT step"))
  floor = common.matmul_floor(tokens * fpt, args.dtype, timing, "torch")   # 6N + attention per token: all matmuls
  print("matmul floor: " + common.floor_line(floor, args.dtype))
  print(f"peak device memory: {common.fmt(common.peak_memory_bytes())}")
  common.write_json("sft_step", {"machine": common.machine_info(), "args": vars(args), "model": cfg.__dict__,
                                 "flops_per_token": fpt, "rows": rows, "timing": timing, "verdict": verdict, "matmul_floor": floor,
                                 "peak_memory_bytes": common.peak_memory_bytes()}, args.out)


if __name__ == "__main__":
  main()
