"""Pieces shared by the launchers: experiment flags, sweep jobs, dry-run/real command runner.

A *job* is one run of `python -m rlhf_jax.main` (on every process of a
multi-host group): either the whole experiment, or one sweep point
(`--sweep --sweep_index=i`), so a sweep fans out into one job per point.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence, TextIO

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What to run: `python -m rlhf_jax.main --config=<config> --workdir=<workdir> ...`.

  config: experiment file path as the remote/child process sees it (relative to the repo root).
  overrides: "key=value" strings, passed as `--config.key=value`.
  sweep: run get_sweep() points; sweep_index: only that point (None = all, one job each).
  sweep_size: number of sweep points (None = count them by importing the experiment file).
  """
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()
  sweep: bool = False
  sweep_index: int | None = None
  sweep_size: int | None = None


def add_experiment_flags(parser: argparse.ArgumentParser, workdir_required: bool = True) -> None:
  g = parser.add_argument_group("experiment")
  g.add_argument("--config", required=True, help="experiment file, e.g. experiments/sft_tiny.py")
  g.add_argument("--workdir", required=workdir_required, help="run directory (shared by all hosts)")
  g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, repeatable: --set optim.lr=1e-4 -> --config.optim.lr=1e-4")
  g.add_argument("--sweep", action="store_true", help="run the experiment's get_sweep() points, one job each")
  g.add_argument("--sweep_index", type=int, default=None, help="run only this sweep point (implies --sweep)")
  g.add_argument("--sweep_size", type=int, default=None,
                 help="number of sweep points (default: import the experiment file and count get_sweep())")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the exact commands (and generated files) instead of running them")


def experiment_from_args(args: argparse.Namespace, config: str | None = None,
                         workdir: str | None = None) -> Experiment:
  for o in args.overrides:
    if "=" not in o or o.startswith("="):
      raise ValueError(f"--set {o!r}: expected KEY=VALUE (e.g. --set optim.lr=1e-4)")
  if args.sweep_index is not None and args.sweep_index < 0:
    raise ValueError(f"--sweep_index must be >= 0, got {args.sweep_index}")
  return Experiment(config=config or args.config, workdir=workdir or args.workdir,
                    overrides=tuple(args.overrides), sweep=bool(args.sweep or args.sweep_index is not None),
                    sweep_index=args.sweep_index, sweep_size=args.sweep_size)


def count_sweep_points(config_path: str | os.PathLike) -> int:
  """Imports an experiment file and returns len(get_sweep()); ValueError if it has none."""
  path = Path(config_path)
  if not path.is_absolute() and not path.exists():
    path = REPO / path
  if not path.exists():
    raise ValueError(f"experiment file {config_path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_launch_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--sweep given, but {config_path} defines no get_sweep()")
  return len(list(module.get_sweep()))


def main_args(exp: Experiment, python: str = "python3", sweep_index: int | str | None = None) -> list[str]:
  """argv of `python -m rlhf_jax.main` for one job (sweep_index may be a shell expression string)."""
  argv = [python, "-m", "rlhf_jax.main", f"--config={exp.config}", f"--workdir={exp.workdir}"]
  argv += [f"--config.{o}" for o in exp.overrides]
  if exp.sweep:
    argv.append("--sweep")
    if sweep_index is not None:
      argv.append(f"--sweep_index={sweep_index}")
  return argv


def sweep_indices(exp: Experiment, local_config_path: str | None = None) -> list[int | None]:
  """The jobs of an experiment: [None] (one plain job) or the sweep point indices, one job each."""
  if not exp.sweep:
    return [None]
  if exp.sweep_index is not None:
    return [exp.sweep_index]
  n = exp.sweep_size if exp.sweep_size is not None else count_sweep_points(local_config_path or exp.config)
  if n < 1:
    raise ValueError(f"{exp.config}: get_sweep() returned no points")
  return list(range(n))


def job_tag(sweep_index) -> str:
  return "run" if sweep_index is None else f"sweep{sweep_index}"


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that is free on `host` right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def format_command(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
  """One shell line that runs argv with the extra env (exactly what the launcher executes)."""
  prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
  return (prefix + " " if prefix else "") + shlex.join(argv)


class Runner:
  """Runs commands, or (dry_run) only prints them as `+ <shell line>`."""

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.log: list[list[str]] = []   # every command, in order (what tests inspect)

  def echo(self, text: str) -> None:
    print(text, file=self.out, flush=True)

  def run(self, argv: Sequence[str], check: bool = True) -> int:
    argv = [str(a) for a in argv]
    self.log.append(argv)
    self.echo("+ " + shlex.join(argv))
    if self.dry_run:
      return 0
    return subprocess.run(argv, check=check).returncode
