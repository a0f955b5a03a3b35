"""On-demand benchmarks (not tests): `python -m benchmarks.<name> [--flags]`.

Each prints a table and writes JSON (default benchmarks/results/<name>.json):
  sft_step       our jitted SFT train step vs transformers GPT2LMHeadModel + torch.optim.AdamW
  generate       our KV-cache sampler vs transformers `generate` (same prompts, sampling)
  ppo_iteration  one PPO iteration vs TRL's PPOTrainer (run from a separate venv)
  scaling        step time vs sequence length / model size (vs FLOP predictions), and vs devices
Timings are medians over repeats after warm-up; compile time is reported separately.
See benchmarks/RESULTS.md for measured figures.
"""
