"""Sampling throughput: our KV-cache generator (rlhf_jax.sampling.generate, one jitted program with
a lax.while_loop) vs transformers `GPT2LMHeadModel.generate` on the same weights and prompts.

  python -m benchmarks.generate [--preset mini --batch 8 --prompt_len 32 --new_tokens 64 --repeats 5]

Both sides: the same left-padded prompts (random lengths), multinomial sampling at
temperature 1 with no top-k/top-p filter, exactly `new_tokens` tokens per row (no EOS
stop), KV cache on. Tokens/s counts generated tokens (batch x new_tokens). A greedy
run of both on the same prompts checks that they compute the same model.

Decode roofline (issue 12's GPU target: decode at batch 1 within 2x of the HBM bound, e.g.
`--preset gpt2-medium --batch 1 --prompt_len 128 --new_tokens 256 --dtype bfloat16`): our decode
step's time, (generate(new_tokens) - generate(1)) / (new_tokens - 1), against the bytes a step must
read (`common.decode_step_bytes`: the weights as stored, plus the K/V cache at the mean context)
over the memory bandwidth (`--mem_gbs`, default the chip's HBM figure; on CPU pass the rate
`benchmarks.cpu_limits` measures, or the bound is not reported).
"""
from __future__ import annotations

import argparse

from benchmarks import common

common.configure_process()   # before jax/torch are imported

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_ref  # noqa: E402
from rlhf_jax import sampling  # noqa: E402
from rlhf_jax.model import gpt  # noqa: E402

TARGET = 3.0
PAD = 0


def prompts(cfg, batch: int, prompt_len: int, seed: int = 0):
  """Left-padded prompts [B,Tp] with lengths in [Tp/2, Tp]; tokens avoid the pad id."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  mask = np.ones((batch, prompt_len), np.int32)
  for b, n in enumerate(rng.integers(prompt_len // 2, prompt_len + 1, batch)):
    mask[b, :prompt_len - n] = 0
  return toks * mask, mask


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="mini")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--mem_gbs", type=float, default=None,
                 help="memory bandwidth (GB/s) for the decode bound (default: the chip's HBM figure; none on CPU)")
  common.add_common_flags(p, repeats=5)
  args = p.parse_args(argv)
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype)
  params = gpt.init(cfg, jax.random.PRNGKey(args.seed))
  toks, mask = prompts(cfg, args.batch, args.prompt_len, args.seed)
  n = args.new_tokens

  keys = iter(jax.random.split(jax.random.PRNGKey(args.seed + 1), 10_000))

  def ours(greedy=False):
    out = sampling.generate(params, cfg, toks, mask, next(keys), max_new_tokens=n, temperature=1.0,
                            eos_id=None, pad_id=PAD, greedy=greedy)
    return np.asarray(out["tokens"])   # blocks

  def ours_first():   # prefill + the first token only: the decode steps are the rest
    out = sampling.generate(params, cfg, toks, mask, next(keys), max_new_tokens=1, temperature=1.0,
                            eos_id=None, pad_id=PAD)
    return np.asarray(out["tokens"])

  torch = torch_ref.torch_setup()
  model = torch_ref.hf_model(cfg, params).eval()
  tt, tm = torch.from_numpy(toks).long(), torch.from_numpy(mask).long()

  def theirs(greedy=False):
    with torch.inference_mode():
      out = model.generate(input_ids=tt, attention_mask=tm, do_sample=not greedy, max_new_tokens=n,
                           min_new_tokens=n, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=PAD,
                           eos_token_id=None, use_cache=True)
    return out[:, toks.shape[1]:].numpy()

  greedy_match = float(np.mean(ours(greedy=True) == theirs(greedy=True)))
  timing = common.time_calls({"ours": ours, "transformers": theirs, "ours_first": ours_first}, args.repeats,
                             args.warmup)
  first = timing.pop("ours_first")
  shapes_ok = all(t["first_result"].shape == (args.batch, n) for t in timing.values())
  gen_tokens = args.batch * n
  # Forward-only FLOPs per generated token: ~1/3 of the training figure (2N + attention),
  # attention taken at the mean context length during decoding.
  fpt = cfg.flops_per_token(args.prompt_len + n // 2) / 3
  peak = common.peak_tflops(args.peak_tflops)
  rows = []
  for name, t in timing.items():
    tps = gen_tokens / t["median_s"]
    rows.append({"impl": name, "median_s": t["median_s"], "cpu_s": t["cpu_median_s"], "min_s": t["min_s"],
                 "new_tokens_per_s": tps, "mfu": common.mfu(tps, fpt, peak),
                 "compile_s": t["compile_s"] if name == "ours" else None})
  verdict = common.speedup_verdict(timing, "ours", "transformers", TARGET)
  common.print_table(rows, ["impl", "median_s", "cpu_s", "min_s", "new_tokens_per_s", "mfu", "compile_s"],
                     f"Generation: {args.preset} ({cfg.num_params() / 1e6:.2f}M params), batch {args.batch}, "
                     f"prompt <= {args.prompt_len}, {n} new tokens, sampling T=1, {args.dtype}, "
                     f"threads={args.threads or 'all'}")
  print(f"greedy decoding agreement ours vs transformers: {greedy_match:.4f} of tokens; shapes ok: {shapes_ok}")
  print(common.verdict_line(verdict, "Generation"))
  roofline = decode_roofline(params, cfg, args, mask, timing["ours"]["median_s"], first["median_s"])
  print(f"decode step (ours): {roofline['step_s'] * 1e3:.3f} ms; must read {roofline['bytes']['total'] / 1e6:.1f} MB "
        f"(weights {roofline['bytes']['weights'] / 1e6:.1f} + K/V cache {roofline['bytes']['kv_cache'] / 1e6:.2f} at "
        f"context {roofline['context']:.0f}); " + (
            f"bound at {roofline['mem_gbs']:.0f} GB/s: {roofline['bound_s'] * 1e3:.3f} ms, ours "
            f"{roofline['ratio_to_bound']:.2f}x the bound" if roofline["bound_s"] else
            "memory bound n/a (no --mem_gbs for this device)"))
  print(f"peak device memory: {common.fmt(common.peak_memory_bytes())}")
  for t in timing.values():
    t.pop("first_result")
  common.write_json("generate", {"machine": common.machine_info(), "args": vars(args), "model": cfg.__dict__,
                                 "rows": rows, "timing": timing, "verdict": verdict,
                                 "greedy_token_agreement": greedy_match, "decode_roofline": roofline,
                                 "prefill_and_first_token_s": first["median_s"],
                                 "peak_memory_bytes": common.peak_memory_bytes()}, args.out)


def decode_roofline(params, cfg, args, mask, total_s: float, first_s: float) -> dict:
  """Our decode step against the memory bound: step_s = (total_s - first_s) / (new_tokens - 1), where first_s
  is prefill + the first token; bytes at the mean context of the decode steps (mean prompt length, from the
  prompt mask [B,Tp], + the tokens generated by then); bound_s = bytes / bandwidth (None without a bandwidth)."""
  n = args.new_tokens
  context = float(mask.sum(1).mean()) + n / 2
  nbytes = common.decode_step_bytes(params, cfg, args.batch, context)
  step_s = (total_s - first_s) / max(n - 1, 1)
  gbs = common.memory_gbs(args.mem_gbs)
  bound_s = nbytes["total"] / (gbs * 1e9) if gbs else None
  return {"step_s": step_s, "context": context, "bytes": nbytes, "mem_gbs": gbs, "bound_s": bound_s,
          "ratio_to_bound": step_s / bound_s if bound_s else None, "target_ratio": 2.0}


if __name__ == "__main__":
  main()
