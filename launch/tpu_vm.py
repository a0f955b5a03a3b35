"""Cloud TPU VM launcher: create a slice, copy + install the repo, run on all workers, collect logs, delete.

  python -m launch.tpu_vm --name rlhf-v4 --zone us-central2-b --accelerator_type v4-16 \
      --version tpu-ubuntu2204-base --config experiments/sft_tiny.py --workdir gs://my-bucket/runs/sft \
      [--set preset=smoke] [--sweep | --sweep_index 1] [--steps create,copy,install,run,logs,delete] [--dry-run]

Steps (each one printed as the exact command before it runs):
  create   gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version [--project] [--spot]
  copy     tar the repo (without .git, runs/, caches) and `gcloud ... scp --worker=all` it to every worker
  install  on all workers: unpack, `pip install jax[tpu]` and `pip install -e .`; with a gs:// workdir,
           also mount the bucket with gcsfuse (the training loop writes through the file system)
  run      on all workers at once: `python -m rlhf_jax.main --config ... --workdir ...` (one
           `ssh --worker=all` per job; a sweep runs its points one after another on the slice),
           output tee'd to ~/rlhf_jax_logs/<job>-<hostname>.log
  logs     `gcloud ... scp --worker=all --recurse` those logs to --logs_dir
  delete   gcloud compute tpus tpu-vm delete NAME --quiet
`logs` and `delete` also run when `run` fails (unless --keep), so a failed job never
leaves a slice running.

Multi-host: every worker runs the same command; JAX's Cloud TPU runtime forms the
slice (jax.distributed.initialize is optional on Cloud TPU), so no coordinator
address is needed. The workdir must be visible to every worker: a gs:// workdir
is mounted with gcsfuse at /tmp/gcs/<bucket> on each worker and passed as that path.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

from launch import common

STEPS = ("create", "copy", "install", "run", "logs", "delete")
REMOTE_DIR = "~/rlhf_jax"
REMOTE_TAR = "~/rlhf_jax.tar.gz"
REMOTE_LOGS = "~/rlhf_jax_logs"
GCS_MOUNT = "/tmp/gcs"
TAR_EXCLUDES = ("./.git", "./runs", "./venv", "./.venv", "*/__pycache__", "*.egg-info", "./.pytest_cache")


def gcloud_tpu(verb: str, name: str, args: argparse.Namespace, *extra: str) -> list[str]:
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, name, f"--zone={args.zone}"]
  if args.project:
    argv.append(f"--project={args.project}")
  return argv + list(extra)


def remote_workdir(workdir: str) -> tuple[str, str | None]:
  """gs://bucket/path -> (/tmp/gcs/bucket/path, bucket); any other path is used as is."""
  if not workdir.startswith("gs://"):
    return workdir, None
  bucket, _, rest = workdir[len("gs://"):].partition("/")
  if not bucket:
    raise ValueError(f"--workdir {workdir!r}: expected gs://BUCKET/PATH")
  return f"{GCS_MOUNT}/{bucket}" + (f"/{rest}" if rest else ""), bucket


def install_command(args: argparse.Namespace, bucket: str | None) -> str:
  parts = [f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR} {REMOTE_LOGS}",
           f"tar -xzf {REMOTE_TAR} -C {REMOTE_DIR}", f"cd {REMOTE_DIR}",
           f"python3 -m pip install -q -U {shlex.quote(args.jax_spec)}", "python3 -m pip install -q -e ."]
  if args.setup:
    parts.append(f"({args.setup})")
  if bucket:
    mount = f"{GCS_MOUNT}/{bucket}"
    parts.append(f"mkdir -p {mount}")
    parts.append(f"(mountpoint -q {mount} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {mount})")
  return "set -e; " + " && ".join(parts)


def run_command(exp: common.Experiment, sweep_index, tag: str) -> str:
  """The shell line every worker runs for one job (exit status of python, not of tee)."""
  main = shlex.join(common.main_args(exp, "python3", sweep_index))
  log = f"{REMOTE_LOGS}/{tag}-$(hostname).log"
  return f"set -o pipefail; cd {REMOTE_DIR} && {main} 2>&1 | tee {log}"


def plan(args: argparse.Namespace) -> dict[str, list[list[str]]]:
  """Every command per step, in order (what --dry-run prints)."""
  workdir, bucket = remote_workdir(args.workdir)
  exp = common.experiment_from_args(args, workdir=workdir)
  name = args.name
  create = gcloud_tpu("create", name, args, f"--accelerator-type={args.accelerator_type}",
                      f"--version={args.version}")
  if args.spot:
    create.append("--spot")
  tarball = args.tarball or f"/tmp/{name}-rlhf_jax.tar.gz"
  tar = ["tar", "-czf", tarball] + [f"--exclude={e}" for e in TAR_EXCLUDES] + ["-C", str(args.repo), "."]
  scp = gcloud_tpu("scp", name, args, "--worker=all")
  scp[5:6] = [tarball, f"{name}:{REMOTE_TAR}"]  # scp takes SRC DEST instead of the name
  runs = []
  for idx in common.sweep_indices(exp, local_config_path=args.config):
    tag = common.job_tag(idx)
    runs.append(gcloud_tpu("ssh", name, args, "--worker=all", f"--command={run_command(exp, idx, tag)}"))
  logs = gcloud_tpu("scp", name, args, "--worker=all", "--recurse")
  logs[5:6] = [f"{name}:{REMOTE_LOGS}", args.logs_dir]
  return {
      "create": [create],
      "copy": [tar, scp],
      "install": [gcloud_tpu("ssh", name, args, "--worker=all", f"--command={install_command(args, bucket)}")],
      "run": runs,
      "logs": [["mkdir", "-p", args.logs_dir], logs],
      "delete": [gcloud_tpu("delete", name, args, "--quiet")],
  }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--accelerator_type", default="v4-16", help="e.g. v4-16 (2 hosts), v5p-32, v5litepod-16")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version (runtime image)")
  p.add_argument("--spot", action="store_true", help="create a Spot TPU")
  p.add_argument("--jax_spec", default="jax[tpu]>=0.10", help="pip requirement for JAX on the workers")
  p.add_argument("--setup", default="", help="extra shell command run on every worker after installing "
                 "(e.g. installing gcsfuse, which a gs:// workdir needs, when the image lacks it)")
  p.add_argument("--repo", default=str(common.REPO), help="local repo to copy")
  p.add_argument("--tarball", default=None, help="local path of the repo tarball (default /tmp/<name>-...)")
  p.add_argument("--logs_dir", default="tpu_logs", help="local directory the worker logs are copied to")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
  p.add_argument("--keep", action="store_true", help="do not delete the TPU VM (even after a failure)")
  common.add_experiment_flags(p)
  args = p.parse_args(argv)
  steps = [s for s in args.steps.split(",") if s]
  bad = sorted(set(steps) - set(STEPS))
  if bad:
    p.error(f"--steps: unknown step(s) {bad}; choose from {','.join(STEPS)}")
  args.steps = [s for s in STEPS if s in steps and not (s == "delete" and args.keep)]
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  commands = plan(args)
  runner = common.Runner(args.dry_run)
  cleanup = [s for s in ("logs", "delete") if s in args.steps]
  try:
    for step in args.steps:
      if step in cleanup:
        continue
      runner.echo(f"# {step}")
      for cmd in commands[step]:
        runner.run(cmd)
  except subprocess.CalledProcessError as e:
    print(f"launch.tpu_vm: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    status = 1
  else:
    status = 0
  finally:  # collect logs and delete the slice even when a step failed
    for step in cleanup:
      runner.echo(f"# {step}")
      for cmd in commands[step]:
        runner.run(cmd, check=False)
  return status


if __name__ == "__main__":
  sys.exit(main())
