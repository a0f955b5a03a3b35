"""Stage recipes: each a function of a config that composes data, model, losses and the shared loop.

  sft.run(config, workdir)   InstructGPT step 1 (demonstrations, loss on assistant tokens)
  rm.run(config, workdir)    step 2 (K-way comparisons from a file/builder or gold-labelled samples)
  ppo.run(config, workdir)   step 3 (PPO / PPO-ptx against the RM, KL to the SFT policy)
  dpo.run(config, workdir)   DPO on the comparisons instead of steps 2-3 (K-wise, Plackett-Luce, IPO, pairwise)
  rloo.run(config, workdir)  RLOO / GRPO instead of PPO (K samples per prompt, no value model)
  iterated.run(config, workdir)  iterated RLHF (label the current policy, update the RM, continue PPO)
  frontier.run(...)          every method from one SFT model at equal policy compute, on one gold-vs-KL plot

Experiment files (`experiments/sft.py`, `rm.py`, `ppo.py`, `dpo.py` and the tiny-world presets) hold the
configs; these modules hold the code.
"""
