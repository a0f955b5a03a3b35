"""Launchers for rlhf_jax experiments on several hosts.

  python -m launch.local     --num_processes 2 --config experiments/X.py --workdir runs/X
  python -m launch.tpu_vm    --name my-tpu --zone us-central2-b --accelerator_type v4-16 \
                             --config experiments/X.py --workdir gs://bucket/runs/X
  python -m launch.slurm_gpu --nodes 2 --gpus_per_node 8 --config experiments/X.py --workdir /shared/runs/X

Every launcher takes `--dry-run` (print the exact commands, run nothing), the
experiment flags of `python -m rlhf_jax.main` (`--config`, `--workdir`,
`--set key=value` for `--config.key=value`, `--sweep`, `--sweep_index`), and
runs one job per sweep point when `--sweep` is given without an index.
The processes find each other through the RLHF_JAX_* environment variables read
by `rlhf_jax.parallel.initialize_distributed` (or JAX's own cluster detection).
"""
