"""InstructGPT step 3 — PPO (γ = 0) or PPO-ptx (γ > 0) against the reward model, KL-penalised to SFT.

  python -m rlhf_jax.main --config experiments/ppo_tiny.py --workdir runs/ppo --config.init_from=runs/sft \
      --config.rm_from=runs/rm [--config.ppo.ptx_coef=1.0]

Policy and frozen reference start from SFT; the value function starts from the RM; the RM's
bias is shifted so demonstrations score mean 0. Each iteration (one shared-loop step, one jitted
program): sample → score → reference logprobs and values → KL-penalised rewards → GAE → PPO epochs
over shuffled minibatches with the ptx term on pretraining batches → adaptive-KL update.
Every `loop.eval_every` iterations the policy is evaluated on held-out prompts: RM score, gold
score (the gold labeler is used only here), KL to SFT, and held-out pretraining loss.
"""
import jax
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax import parallel
from rlhf_jax.data import gold, lm_data, pipeline, synthetic
from rlhf_jax.eval import ppo_monitor
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import loop, ppo, rollout, stages, state as state_lib

PRESETS = {
    "default": {},
    "smoke": {"n_prompts": 64, "n_eval_prompts": 16, "batch_size": 16, "ptx_batch_size": 8, "loop.num_steps": 4,
              "loop.eval_every": 2, "loop.log_every": 1, "loop.ckpt_every": 2, "ppo.max_new_tokens": 12,
              "ppo.ppo_epochs": 2, "ppo.num_minibatches": 2},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = "runs/sft"     # policy + frozen reference
  c.rm_from = "runs/rm"        # reward model + value init
  c.ptx_from = ""              # pretraining workdir for the ptx data ("" = the SFT stage's init_from)
  # "rm": InstructGPT. "gold": the gold labeler itself is the training reward -- an oracle ablation
  # (the ceiling a perfect RM would give; not InstructGPT). The value function starts from the RM either way.
  c.reward = "rm"
  c.n_prompts, c.n_eval_prompts, c.prompt_seed = 2000, 128, 1
  c.max_prompt_len = 64
  c.batch_size = 64            # prompts (rollouts) per PPO iteration
  c.ptx_batch_size = 32        # pretraining rows per iteration (split over the minibatches)
  c.ppo = ppo.default_config()
  c.ppo.kl_target, c.ppo.init_kl_beta = 0.0, 0.05   # fixed beta by default; kl_target > 0: adaptive
  # Schedules count optimizer updates: iterations x ppo_epochs x num_minibatches.
  c.optim = rcfg.optim(lr=3e-5, warmup_steps=20, weight_decay=0.0, schedule="linear", grad_clip=1.0)
  c.value_optim = rcfg.optim(lr=1e-4, warmup_steps=20, weight_decay=0.0, schedule="linear", grad_clip=1.0)
  c.loop = rcfg.loop(num_steps=100, log_every=5, eval_every=10, ckpt_every=25)
  c.mesh = rcfg.mesh()
  return c


def get_sweep():
  """PPO vs PPO-ptx, and the KL coefficient (too little KL over-optimises the RM)."""
  return ([{"ppo.ptx_coef": g} for g in (0.0, 1.0)]
          + [{"ppo.init_kl_beta": b} for b in (0.0, 0.02, 0.1, 0.5)])


def _score_fn(reward, rm_cfg, tok):
  if reward == "rm":
    return rollout.reward_model_score_fn(rm_cfg)
  if reward == "gold":
    return rollout.host_text_score_fn(lambda ps, rs: [gold.score(p, r) for p, r in zip(ps, rs)], tok)
  raise ValueError(f"ppo_tiny.py: config key 'reward' must be 'rm' or 'gold', got {reward!r}")


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  updates = config.loop.num_steps * config.ppo.ppo_epochs * config.ppo.num_minibatches  # optimizer steps
  config.optim.total_steps = config.value_optim.total_steps = updates
  sft_info, cfg, tok, sft_params = stages.load_stage(config.init_from, expect="sft")
  rm_info, rm_cfg, _, rm_params = stages.load_stage(config.rm_from, expect="rm")
  rm_params = heads.shift_bias(rm_params, rm_info["reward_offset"])
  ptx_dir = config.ptx_from or sft_info["init_from"]
  data_cfg = mlc.ConfigDict(stages.read_stage(ptx_dir)["data"])
  _, ptx_rows, val_rows = lm_data.prepare_lm_data(data_cfg, data_cfg.seq_len, ptx_dir)
  stages.copy_tokenizer(config.init_from, workdir)

  mesh = parallel.make_mesh(config.mesh.to_dict())
  parallel.check_batch_divisible(config.batch_size, mesh)
  policy_opt, value_opt = state_lib.make_optimizer(config.optim), state_lib.make_optimizer(config.value_optim)
  axes = {"policy": gpt.param_axes(cfg), "ref": gpt.param_axes(cfg), "value": heads.param_axes(rm_cfg),
          "score": heads.param_axes(rm_cfg)}
  state, shardings = ppo.create_rl_state(sft_params, rm_params, sft_params, rm_params, policy_opt, value_opt,
                                         mesh, axes, jax.random.PRNGKey(config.seed), config.ppo.init_kl_beta)
  rollout_fn = rollout.make_rollout_from_config(cfg, rm_cfg, cfg, _score_fn(config.reward, rm_cfg, tok), config.ppo,
                                                eos_id=tok.eos_id, pad_id=tok.pad_id)
  step = state_lib.jit_step(ppo.make_rl_step(rollout_fn, cfg, rm_cfg, policy_opt, value_opt, config.ppo),
                            shardings, mesh)
  prompts = synthetic.prompts(config.n_prompts, seed=config.prompt_seed, split="train")
  members = {"prompt": (pipeline.prompt_batches(prompts, tok, config.batch_size, config.max_prompt_len,
                                                seed=config.seed),
                        {"tokens": "prompt_tokens", "attention_mask": "prompt_mask"})}
  if config.ppo.ptx_coef > 0:
    members["ptx"] = (pipeline.lm_batches(ptx_rows, config.ptx_batch_size, seed=config.seed),
                      {"tokens": "ptx_tokens", "targets": "ptx_targets", "mask": "ptx_mask"})
  batches = parallel.ShardedBatches(pipeline.ZipBatches(**members), mesh)

  monitor = ppo_monitor.Monitor(cfg, rm_cfg, tok, synthetic.prompts(config.n_eval_prompts, seed=config.prompt_seed,
                                                                    split="eval"),
                                val_rows[:128], sft_params, rm_params, temperature=config.ppo.temperature,
                                max_prompt_len=config.max_prompt_len, max_new_tokens=config.ppo.max_new_tokens,
                                seed=config.seed)
  stages.write_stage(workdir, "ppo", cfg, init_from=config.init_from, rm_from=config.rm_from,
                     ptx_coef=float(config.ppo.ptx_coef), reward=config.reward)
  loop_cfg = loop.LoopConfig.from_config(config.loop, name="ppo")
  state, last = loop.run(state, step, batches, loop_cfg, workdir,
                         eval_fn=lambda s: monitor(s["policy"]["params"]))
  result = {k: last.get(k) for k in ("score", "kl", "kl_beta", "ptx_loss", "eval/gold_mean", "eval/rm_score_mean",
                                     "eval/kl_to_sft", "eval/pretrain_val_loss", "eval/win_rate_vs_sft_gold")}
  result["initial"] = monitor.initial
  print(result)
  return result
