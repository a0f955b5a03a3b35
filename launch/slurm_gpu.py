"""Slurm GPU launcher: writes an sbatch script that runs an experiment on N nodes and submits it.

  python -m launch.slurm_gpu --nodes 2 --gpus_per_node 8 --partition gpu --time 04:00:00 \
      --config experiments/sft_tiny.py --workdir /shared/runs/sft [--set preset=smoke] \
      [--process_per gpu|node] [--sweep | --sweep_index 1] [--setup 'source venv/bin/activate'] [--dry-run]

--dry-run prints the script and the `sbatch` command instead of writing/submitting.

Process layout (`srun` starts the processes; all form one JAX job):
  --process_per node (default): one process per node that drives all its GPUs
      (ntasks-per-node=1). SLURM_LOCALID is unset inside the task so JAX's Slurm
      detection does not pin the process to GPU 0 (it would set local_device_ids
      to [SLURM_LOCALID]); the process id and count come from RLHF_JAX_*.
  --process_per gpu: one process per GPU (ntasks-per-node = gpus_per_node); JAX's
      Slurm detection gives each process local device [SLURM_LOCALID].
In both, RLHF_JAX_COORDINATOR is the first host of `scontrol show hostnames
$SLURM_JOB_NODELIST` on a port derived from the job id, RLHF_JAX_NUM_PROCESSES
is $SLURM_NTASKS and RLHF_JAX_PROCESS_ID is $SLURM_PROCID.
A sweep without --sweep_index becomes a job array: task i runs `--sweep --sweep_index=i`.
The workdir must be on a file system every node sees.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from launch import common


def render_script(args: argparse.Namespace, exp: common.Experiment, indices: list) -> str:
  """The sbatch script text for `exp` (one job, or a job array over sweep `indices`)."""
  per_gpu = args.process_per == "gpu"
  tasks_per_node = args.gpus_per_node if per_gpu else 1
  array = len(indices) > 1 or (exp.sweep and exp.sweep_index is None)
  out = os.path.join(args.logs_dir, "%x-%A_%a.out" if array else "%x-%j.out")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={tasks_per_node}",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --output={out}"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  if args.exclusive:
    lines.append("#SBATCH --exclusive")
  if array:
    lines.append(f"#SBATCH --array={','.join(str(i) for i in indices)}")
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(str(args.repo))}"]
  if args.setup:
    lines.append(args.setup)
  lines += [
      # The whole list, not `| head -n 1`: under pipefail, head closing the pipe early would
      # kill scontrol with SIGPIPE and fail the job.
      'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
      f'export RLHF_JAX_COORDINATOR="${{NODES[0]}}:{args.port or "$((61440 + SLURM_JOB_ID % 4096))"}"',
      'export RLHF_JAX_NUM_PROCESSES="$SLURM_NTASKS"',
  ]
  # The index is expanded by each task's shell (SLURM_ARRAY_TASK_ID is in its environment).
  if array:
    main = shlex.join(common.main_args(exp, args.python)) + ' --sweep_index="$SLURM_ARRAY_TASK_ID"'
  else:
    main = shlex.join(common.main_args(exp, args.python, indices[0]))
  task = ["export RLHF_JAX_PROCESS_ID=$SLURM_PROCID"]
  if not per_gpu:
    task.append("unset SLURM_LOCALID")
  task.append(f"exec {main}")
  lines.append(f"srun --kill-on-bad-exit=1 --label bash -c {shlex.quote('; '.join(task))}")
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m launch.slurm_gpu", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--process_per", choices=("node", "gpu"), default="node")
  p.add_argument("--cpus_per_task", type=int, default=None, help="default: 8 per GPU the task drives")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--exclusive", action="store_true")
  p.add_argument("--job_name", default="rlhf_jax")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: from the job id)")
  p.add_argument("--python", default="python3")
  p.add_argument("--setup", default="", help="shell line run before srun, e.g. 'source venv/bin/activate'")
  p.add_argument("--repo", default=str(common.REPO), help="repo path on the cluster's shared file system")
  p.add_argument("--logs_dir", default="slurm_logs")
  p.add_argument("--script", default=None, help="where to write the sbatch script (default <logs_dir>/<job>.sbatch)")
  common.add_experiment_flags(p)
  args = p.parse_args(argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    p.error(f"--nodes and --gpus_per_node must be >= 1, got {args.nodes}, {args.gpus_per_node}")
  if args.cpus_per_task is None:
    args.cpus_per_task = 8 if args.process_per == "gpu" else 8 * args.gpus_per_node
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  exp = common.experiment_from_args(args)
  indices = common.sweep_indices(exp)
  script = render_script(args, exp, indices)
  path = args.script or os.path.join(args.logs_dir, f"{args.job_name}.sbatch")
  runner = common.Runner(args.dry_run)
  if args.dry_run:
    runner.echo(f"# {path}")
    runner.echo(script.rstrip("\n"))
  else:
    os.makedirs(args.logs_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
  runner.run(["sbatch", path])
  return 0


if __name__ == "__main__":
  sys.exit(main())
