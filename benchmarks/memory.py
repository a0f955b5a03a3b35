"""Device memory per stage: SFT, RM and one PPO iteration, full fine-tuning vs LoRA, remat variants.

  python -m benchmarks.memory [--preset gpt2 --seq 512 --sft_batch 8 --rm_batch 2 --k 4 \
                               --ppo_batch 16 --prompt_len 128 --new_tokens 128 --lora_rank 8]

Nothing is allocated: every step is lowered and compiled on abstract inputs (shapes only) and
XLA's buffer assignment is read from `compiled.memory_analysis()`. That is the allocation plan
the backend would execute, so the figures hold on a GPU/TPU without one being present (run the
same command on the device for its own compiler's plan; CPU and GPU fuse differently, so temps
differ somewhat). Columns:
  state:  the step's arguments (params of every model held, optimizer moments, rng, scalars);
  temp:   the step's scratch buffers (activations kept for the backward, the KV cache, logits);
  peak:   state + temp + outputs not aliased to a donated argument (the steps donate the state).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from benchmarks import common
from rlhf_jax.model import gpt, heads, lora
from rlhf_jax.train import ppo, rollout, state as state_lib, steps


def _optim():
  return mlc.ConfigDict(dict(lr=1e-5, total_steps=10**6, warmup_steps=0, schedule="constant", weight_decay=0.0,
                             grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8))


def _analysis(fn, *abstract_args) -> dict:
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(*abstract_args).compile()
  m = compiled.memory_analysis()
  state = m.argument_size_in_bytes
  out_new = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
  return {"state_bytes": state, "temp_bytes": m.temp_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "alias_bytes": m.alias_size_in_bytes, "peak_bytes": state + m.temp_size_in_bytes + out_new}


def _lora_section(rank):
  return mlc.ConfigDict(dict(rank=rank, alpha=16.0, targets=lora.DEFAULT_TARGETS))


def _abstract(fn, *args):
  return jax.eval_shape(fn, *args)


def _train_state(params, axes, lora_rank, rng_seed=1):
  """(abstract {"params","opt_state","rng","step"}, the optimizer) for full fine-tuning or LoRA."""
  base_opt = state_lib.make_optimizer(_optim())
  section = _lora_section(lora_rank) if lora_rank else None
  opt = lora.optimizer(base_opt) if lora_rank else base_opt

  def make(p):
    tree = lora.setup(section, p, axes, base_opt, jax.random.PRNGKey(rng_seed))[0]
    return {"params": tree, "opt_state": opt.init(tree), "rng": jax.random.PRNGKey(0),
            "step": jnp.zeros((), jnp.int32)}
  return _abstract(make, params), opt


def sft_row(cfg, batch, seq, lora_rank=0):
  params = _abstract(lambda: gpt.init(cfg, jax.random.PRNGKey(0)))
  st, opt = _train_state(params, gpt.param_axes(cfg), lora_rank)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  b = {"tokens": i32(batch, seq), "targets": i32(batch, seq), "mask": i32(batch, seq)}
  return _analysis(steps.make_train_step(lora.loss(steps.lm_loss_fn(cfg)), opt), st, b)


def rm_row(cfg, batch, k, seq, lora_rank=0):
  params = _abstract(lambda: heads.init(cfg, jax.random.PRNGKey(0)))
  st, opt = _train_state(params, heads.param_axes(cfg), lora_rank)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  b = {"tokens": i32(batch, k, seq), "attention_mask": i32(batch, k, seq), "ranks": i32(batch, k),
       "reward_index": i32(batch, k), "valid": jax.ShapeDtypeStruct((batch, k), jnp.bool_)}
  return _analysis(steps.make_train_step(lora.loss(steps.kwise_rm_loss_fn(cfg)), opt), st, b)


def ppo_row(cfg, batch, prompt_len, new_tokens, lora_rank=0):
  ppo_cfg = ppo.default_config()
  ppo_cfg.update(dict(max_new_tokens=new_tokens, temperature=1.0, no_eos_penalty=None, ptx_coef=0.0))
  opt = state_lib.make_optimizer(_optim())
  lm = _abstract(lambda: gpt.init(cfg, jax.random.PRNGKey(0)))
  rm = _abstract(lambda: heads.init(cfg, jax.random.PRNGKey(1)))
  section = _lora_section(lora_rank) if lora_rank else None
  p_axes, v_axes = gpt.param_axes(cfg), heads.param_axes(cfg)
  p_opt = v_opt = lora.optimizer(opt) if lora_rank else opt

  def make(lm, rm):
    pol = lora.setup(section, lm, p_axes, opt, jax.random.PRNGKey(2))[0]
    val = lora.setup(section, rm, v_axes, opt, jax.random.PRNGKey(3))[0]
    st = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0), "kl_beta": jnp.float32(0.1),
          "policy": {"params": pol, "opt_state": p_opt.init(pol)},
          "value": {"params": val, "opt_state": v_opt.init(val)}}
    if not lora_rank:     # full fine-tuning holds frozen copies of the SFT policy and the RM
      st["ref"], st["score"] = lm, rm
    return st
  st = _abstract(make, lm, rm)
  roll = rollout.make_rollout_from_config(cfg, cfg, cfg, rollout.reward_model_score_fn(cfg), ppo_cfg,
                                          eos_id=None, pad_id=0)
  step = ppo.make_rl_step(roll, cfg, cfg, p_opt, v_opt, ppo_cfg)
  b = {"prompt_tokens": jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
       "prompt_mask": jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)}
  return _analysis(step, st, b)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="gpt2")
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--sft_batch", type=int, default=8)
  p.add_argument("--rm_batch", type=int, default=2)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--ppo_batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  base = gpt.preset(args.preset, dropout=0.0)
  gib = lambda x: x / 2**30
  rows = []

  def add(stage, variant, res):
    rows.append({"stage": stage, "variant": variant, **{k: gib(v) for k, v in res.items()}})
    r = rows[-1]
    print(f"{stage:4s} {variant:22s} state {r['state_bytes']:7.3f}  temp {r['temp_bytes']:7.3f}  "
          f"peak {r['peak_bytes']:7.3f} GiB", flush=True)

  for remat in ("none", "dots", "full"):
    add("sft", f"full, remat={remat}", sft_row(dataclasses.replace(base, remat=remat), args.sft_batch, args.seq))
  add("sft", f"lora r={args.lora_rank}", sft_row(dataclasses.replace(base, remat="none"), args.sft_batch, args.seq,
                                                  args.lora_rank))
  add("rm", "full", rm_row(dataclasses.replace(base, remat="none"), args.rm_batch, args.k, args.seq))
  add("rm", f"lora r={args.lora_rank}", rm_row(dataclasses.replace(base, remat="none"), args.rm_batch, args.k,
                                                args.seq, args.lora_rank))
  cfg = dataclasses.replace(base, remat="none")
  add("ppo", "full (4 models)", ppo_row(cfg, args.ppo_batch, args.prompt_len, args.new_tokens))
  add("ppo", f"lora r={args.lora_rank} (2 bases)", ppo_row(cfg, args.ppo_batch, args.prompt_len, args.new_tokens,
                                                           args.lora_rank))
  common.print_table(rows, ["stage", "variant", "state_bytes", "temp_bytes", "peak_bytes"],
                     f"Compiled memory plan (GiB): {args.preset} ({base.num_params() / 1e6:.0f}M params, float32), "
                     f"seq {args.seq}, SFT batch {args.sft_batch}, RM {args.rm_batch}x{args.k}, PPO {args.ppo_batch} "
                     f"prompts x ({args.prompt_len} + {args.new_tokens})")
  common.write_json("memory", {"machine": common.machine_info(), "args": vars(args), "rows": rows,
                               "params": base.num_params(), "backend": jax.default_backend()}, args.out)
  return rows


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
