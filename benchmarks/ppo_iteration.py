"""One full PPO iteration: ours (rlhf_jax.train.ppo.make_rl_step, one jitted program) vs TRL's
PPOTrainer (trl.experimental.ppo, trl==0.29.0) on the same four GPT-2 models and prompts.

  python -m benchmarks.ppo_iteration [--trl_python /tmp/trlvenv/bin/python] [--preset mini --batch 16 ...]

TRL is never a project dependency: it runs in a separate interpreter (`--trl_python`, a venv
with trl installed, e.g. `python -m venv /tmp/trlvenv` + a .pth line pointing at this venv's
site-packages + `pip install trl==0.29.0`), as `python -m benchmarks.ppo_iteration --side trl`.

One iteration (both sides): sample `batch` responses of exactly `new_tokens` tokens (no
stop token) at temperature 1 from the policy with a KV cache; reference log-probs, values
and reward-model scores; per-token KL-penalised rewards (fixed KL coefficient) and GAE;
then `ppo_epochs` x `num_minibatches` clipped-PPO updates of the policy and the value
model (ours: two Adam optimizers; TRL: one over both, as its trainer does). Ours reuses
the sampler's log-probs as the old log-probs (ppo.recompute_logprobs=False, the default);
TRL recomputes them with one more policy forward. TRL's per-update `gc.collect()` and logging are part of its trainer and are
timed with it. Per-iteration times come from a TrainerCallback (TRL) and from timing
the jitted step (ours); medians after warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

common.configure_process()   # before jax/torch are imported

TARGET = 2.0
PAD, EOS = 0, 1


def add_flags(p):
  p.add_argument("--preset", default="mini")
  p.add_argument("--batch", type=int, default=16, help="rollout prompts per iteration")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=24)
  p.add_argument("--ppo_epochs", type=int, default=4)
  p.add_argument("--num_minibatches", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--kl_coef", type=float, default=0.05)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype on both sides, float32 master weights: ours GPTConfig.dtype, TRL bf16=True "
                      "(accelerate's torch.autocast)")
  p.add_argument("--side", choices=("both", "ours", "trl"), default="both")
  p.add_argument("--trl_python", default="/tmp/trlvenv/bin/python")
  p.add_argument("--model_dir", default=None, help="(internal) HF weights written by the parent")
  p.add_argument("--json_out", default=None, help="(internal) where the TRL side writes its timings")
  common.add_common_flags(p, repeats=5)


def prompt_ids(vocab: int, batch: int, prompt_len: int, seed: int):
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.integers(2, vocab, (batch, prompt_len)).astype(np.int32)   # no pad/eos ids, no padding


# ------------------------------------------------------------------------- ours
def make_models(cfg, seed):
  import jax
  from rlhf_jax.model import gpt, heads
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  policy = gpt.init(cfg, k[0])
  return {"policy": policy, "ref": policy, "value": heads.from_lm(policy, cfg, k[1]),
          "score": heads.init(cfg, k[2])}


def make_ours(args, cfg, models):
  """A zero-arg callable that runs one jitted PPO iteration and returns its metrics (blocking); `.lower()` lowers
  that iteration (for benchmarks.xla_profile)."""
  import jax
  import ml_collections as mlc
  import numpy as np
  from rlhf_jax import parallel
  from rlhf_jax.model import gpt, heads
  from rlhf_jax.train import ppo, rollout, state as state_lib

  ppo_cfg = ppo.default_config()
  ppo_cfg.update(dict(ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches, ptx_coef=0.0,
                      kl_target=0.0, init_kl_beta=args.kl_coef, max_new_tokens=args.new_tokens,
                      temperature=1.0, no_eos_penalty=None))
  roll = rollout.make_rollout_from_config(cfg, cfg, cfg, rollout.reward_model_score_fn(cfg), ppo_cfg,
                                          eos_id=None, pad_id=PAD)
  optim = mlc.ConfigDict(dict(lr=args.lr, total_steps=10**6, warmup_steps=0, schedule="constant",
                              weight_decay=0.0, grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8))
  opt = state_lib.make_optimizer(optim)
  mesh = parallel.make_mesh(None, jax.devices()[:1])
  axes = {"policy": gpt.param_axes(cfg), "value": heads.param_axes(cfg), "ref": gpt.param_axes(cfg),
          "score": heads.param_axes(cfg)}
  state, shardings = ppo.create_rl_state(models["policy"], models["value"], models["ref"], models["score"],
                                         opt, opt, mesh, axes, jax.random.PRNGKey(args.seed), args.kl_coef)
  step = state_lib.jit_step(ppo.make_rl_step(roll, cfg, cfg, opt, opt, ppo_cfg), shardings, mesh)
  toks = prompt_ids(cfg.vocab_size, args.batch, args.prompt_len, args.seed)
  batch = parallel.put_batch({"prompt_tokens": toks, "prompt_mask": np.ones_like(toks)}, mesh)
  box = {"state": state}

  def one():
    box["state"], m = step(box["state"], batch)
    return {k: float(v) for k, v in jax.device_get(m).items()}   # blocks
  one.lower = lambda: step.lower(box["state"], batch)
  return one


def run_ours(args, cfg, models):
  return common.time_calls({"ours": make_ours(args, cfg, models)}, args.repeats, args.warmup)["ours"]


def save_hf_models(cfg, models, directory):
  """policy/ (GPT2LMHeadModel) and reward/, value/ (GPT2ForSequenceClassification with our head
  kernel as the 1-logit score weight; HF's score layer has no bias)."""
  import numpy as np
  import torch
  from benchmarks import torch_ref
  from rlhf_jax.model import hf
  hf.save(cfg, models["policy"], os.path.join(directory, "policy"))
  for name in ("score", "value"):
    m = torch_ref.hf_model(cfg, models[name]["gpt"], kind="cls")
    with torch.no_grad():
      m.score.weight.copy_(torch.from_numpy(np.asarray(models[name]["head"]["kernel"]))[None])
    m.config.pad_token_id = PAD
    m.save_pretrained(os.path.join(directory, "reward" if name == "score" else "value"))


def iteration_matmul_flops(cfg, batch: int, prompt_len: int, new_tokens: int, epochs: int) -> dict:
  """Matmul FLOPs of one iteration as both sides run it (attention included, elementwise work not), by phase.

  T = prompt_len + new_tokens, n = batch * T tokens, trunk = the matmul params without the unembedding,
  per-token forward = 2 trunk + 4 L T H Dh (attention, as `GPTConfig.flops_per_token`), backward = 2 x forward.
  sample: every token through the policy once, the unembedding on the new ones; score: reference (+ its
  unembedding on the response), value and reward trunks; update: `epochs` passes over all rows of policy
  (unembedding on the response) and value, forward + backward. The scalar heads are left out.
  """
  t = prompt_len + new_tokens
  n, resp = batch * t, batch * new_tokens
  attn = 4.0 * cfg.n_layer * t * cfg.n_head * cfg.d_head
  unembed = 2.0 * cfg.vocab_size * cfg.d_model
  fwd = (cfg.flops_per_token(t) - 3 * attn) / 3 - unembed + attn   # 2 trunk + attention, per token
  out = {"sample": n * fwd + resp * unembed, "score": 3 * n * fwd + resp * unembed,
         "update": epochs * 3 * (2 * n * fwd + resp * unembed)}
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------------- TRL side
def run_trl(args):
  """Runs in the TRL interpreter: PPOTrainer.train() over warmup + repeats iterations."""
  import torch
  import transformers
  from datasets import Dataset
  from tokenizers import Tokenizer, models as tok_models
  from trl.experimental.ppo import PPOConfig, PPOTrainer

  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  d = args.model_dir
  policy = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, "policy"))
  ref = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, "policy"))
  reward = transformers.GPT2ForSequenceClassification.from_pretrained(os.path.join(d, "reward"))
  value = transformers.GPT2ForSequenceClassification.from_pretrained(os.path.join(d, "value"))
  vocab = policy.config.vocab_size
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1")),
      pad_token="t0", eos_token="t1")
  tok.padding_side = "left"
  for m in (policy, ref):
    m.generation_config.pad_token_id = PAD
  n_iter = 1 + args.warmup + args.repeats
  ids = prompt_ids(vocab, args.batch, args.prompt_len, args.seed)
  data = Dataset.from_dict({"input_ids": [list(map(int, r)) for r in ids]})
  mb = args.batch // args.num_minibatches
  with tempfile.TemporaryDirectory() as out_dir:
    config = PPOConfig(
        output_dir=out_dir, learning_rate=args.lr, per_device_train_batch_size=mb,
        gradient_accumulation_steps=args.num_minibatches, num_mini_batches=args.num_minibatches,
        num_ppo_epochs=args.ppo_epochs, total_episodes=args.batch * n_iter,
        local_rollout_forward_batch_size=args.batch, num_sample_generations=0,
        response_length=args.new_tokens, stop_token=None, temperature=1.0, kl_coef=args.kl_coef,
        missing_eos_penalty=None, whiten_rewards=False, report_to="none", save_strategy="no",
        logging_steps=10**6, use_cpu=True, bf16=args.dtype == "bfloat16", fp16=False, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0)

    marks = []

    class Clock(transformers.TrainerCallback):
      def on_train_begin(self, *a, **k):
        marks.append((time.perf_counter(), time.process_time()))

      def on_step_end(self, *a, **k):
        marks.append((time.perf_counter(), time.process_time()))

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=data, eval_dataset=data, callbacks=[Clock()])
    trainer.train()
  wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
  cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
  timed, timed_cpu = wall[1 + args.warmup:], cpu[1 + args.warmup:]
  result = {"first_s": wall[0], "median_s": statistics.median(timed), "min_s": min(timed), "times_s": timed,
            "cpu_median_s": statistics.median(timed_cpu), "cpu_times_s": timed_cpu, "iterations": len(wall),
            "trl": __import__("trl").__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
  with open(args.json_out, "w") as f:
    json.dump(result, f)


def matmul_floor(args, cfg, timing) -> dict:
  """The iteration's matmul FLOPs at this core's large-dot rate (`common.matmul_floor`, compute dtype): the time
  neither side can beat, and the speed-up over TRL it would allow."""
  flops = iteration_matmul_flops(cfg, args.batch, args.prompt_len, args.new_tokens, args.ppo_epochs)
  floor = {"by_phase": flops, **common.matmul_floor(flops["total"], args.dtype, timing, "trl")}
  print(f"matmul floor (sample {flops['sample'] / 1e9:.2f}, score {flops['score'] / 1e9:.2f}, update "
        f"{flops['update'] / 1e9:.1f} GFLOP): " + common.floor_line(floor, args.dtype))
  return floor


# ------------------------------------------------------------------------- driver
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_flags(p)
  args = p.parse_args(argv)
  if args.batch % args.num_minibatches:
    p.error(f"--batch {args.batch} must be divisible by --num_minibatches {args.num_minibatches}")
  if args.side == "trl":
    return run_trl(args)
  if args.side == "both" and not os.path.exists(args.trl_python):
    p.error(f"--trl_python {args.trl_python}: no such interpreter. TRL runs in its own venv (the commands are in "
            f"benchmarks/RESULTS.md, 'Regenerating'); or pass --side ours")

  from rlhf_jax.model import gpt
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype)
  models = make_models(cfg, args.seed)
  timing, trl_error = {}, None
  if args.side in ("both", "ours"):
    timing["ours"] = run_ours(args, cfg, models)
  if args.side == "both":
    with tempfile.TemporaryDirectory() as d:
      save_hf_models(cfg, models, d)
      out = os.path.join(d, "trl.json")
      same = ["batch", "prompt_len", "new_tokens", "ppo_epochs", "num_minibatches", "lr", "kl_coef", "dtype",
              "repeats", "warmup", "seed", "threads"]
      cmd = [args.trl_python, "-m", "benchmarks.ppo_iteration", "--side", "trl", "--model_dir", d,
             "--json_out", out] + [f"--{k}={getattr(args, k)}" for k in same]
      env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(common.RESULTS_DIR.parents[1])}
      print("+", " ".join(cmd), flush=True)
      proc = subprocess.run(cmd, env=env, cwd=common.RESULTS_DIR.parents[1], capture_output=True, text=True)
      if proc.returncode == 0:
        timing["trl"] = json.load(open(out))
      else:
        trl_error = proc.stderr[-4000:]
        print(f"TRL side failed (exit {proc.returncode}):\n{trl_error}", file=sys.stderr)

  rollout_tokens = args.batch * args.new_tokens
  rows = [{"impl": name, "median_iter_s": t["median_s"], "cpu_iter_s": t["cpu_median_s"], "min_iter_s": t["min_s"],
           "rollout_tokens_per_s": rollout_tokens / t["median_s"], "first_iter_s": t["first_s"],
           "compile_s": t.get("compile_s")} for name, t in timing.items()]
  for t in timing.values():
    t.pop("first_result", None)
  common.print_table(rows, ["impl", "median_iter_s", "cpu_iter_s", "min_iter_s", "rollout_tokens_per_s",
                            "first_iter_s", "compile_s"],
                     f"PPO iteration: {args.preset} x 4 models ({cfg.num_params() / 1e6:.2f}M params each), "
                     f"{args.batch} prompts x {args.prompt_len} + {args.new_tokens} new tokens, {args.ppo_epochs} "
                     f"epochs x {args.num_minibatches} minibatches, {args.dtype}, threads={args.threads or 'all'}")
  verdict = None
  if "ours" in timing and "trl" in timing:
    verdict = common.speedup_verdict(timing, "ours", "trl", TARGET)
    print(common.verdict_line(verdict, "PPO iteration"))
  floor = matmul_floor(args, cfg, timing)
  common.write_json("ppo_iteration", {"machine": common.machine_info(), "args": vars(args), "model": cfg.__dict__,
                                      "rows": rows, "timing": timing, "verdict": verdict, "matmul_floor": floor,
                                      "trl_error": trl_error,
                                      "peak_memory_bytes": common.peak_memory_bytes()}, args.out)


if __name__ == "__main__":
  main()
