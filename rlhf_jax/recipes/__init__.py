"""Stage recipes: each a function of a config that composes data, model, losses and the shared loop.

  sft.run(config, workdir)   InstructGPT step 1 (demonstrations, loss on assistant tokens)
  rm.run(config, workdir)    step 2 (K-way comparisons from a file/builder or gold-labelled samples)
  ppo.run(config, workdir)   step 3 (PPO / PPO-ptx against the RM, KL to the SFT policy)

Experiment files (`experiments/sft.py`, `rm.py`, `ppo.py` and the tiny-world presets) hold the
configs; these modules hold the code.
"""
