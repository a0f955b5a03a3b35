"""Local multi-process launcher: N JAX processes on this machine, one global device mesh.

  python -m launch.local --num_processes 2 --devices_per_process 2 \
      --config experiments/rm_tiny.py --workdir runs/rm --set preset=smoke [--sweep] [--dry-run]
  python -m launch.local --num_processes 2 -- python my_script.py --flag   # any command

Each process gets RLHF_JAX_COORDINATOR=127.0.0.1:<free port>, RLHF_JAX_NUM_PROCESSES,
RLHF_JAX_PROCESS_ID, RLHF_JAX_CPU_COLLECTIVES=gloo (read by
`rlhf_jax.parallel.initialize_distributed`) and, on CPU, XLA_FLAGS with
`--xla_force_host_platform_device_count=<devices_per_process>` (with --platform cuda:
CUDA_VISIBLE_DEVICES, a disjoint block of GPUs per process). Output lines are
prefixed with `[p<i>]` and written to `<log_dir>/process_<i>.log`. If one process
fails, times out or the launcher gets Ctrl-C, every process is stopped (its whole
process group: SIGTERM, then SIGKILL after a grace period).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from launch import common

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int | None     # negative: stopped by that signal (e.g. -15 after another process failed)
  output: str                # stdout + stderr, unprefixed
  log_path: str | None


class LaunchError(RuntimeError):
  """A process failed or the group timed out; `results` holds every process's outcome."""

  def __init__(self, message: str, results: list[ProcessResult]):
    super().__init__(message)
    self.results = results


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int | None = None,
                platform: str = "cpu", base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment variables (only those we set) of process `process_id`."""
  env = {"RLHF_JAX_COORDINATOR": f"127.0.0.1:{port}", "RLHF_JAX_NUM_PROCESSES": str(num_processes),
         "RLHF_JAX_PROCESS_ID": str(process_id), "PYTHONUNBUFFERED": "1"}
  if platform == "cpu":
    env["RLHF_JAX_CPU_COLLECTIVES"] = "gloo"
    env["JAX_PLATFORMS"] = "cpu"
    if devices_per_process:
      # Replace an inherited device count (e.g. the test suite's 8) instead of appending a second one.
      flags = _DEVICE_FLAG.sub("", (base or os.environ).get("XLA_FLAGS", "")).split()
      env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  elif platform:
    env["JAX_PLATFORMS"] = platform
    if platform in ("cuda", "gpu") and devices_per_process:
      # Process i drives GPUs [i*d, (i+1)*d) of this host.
      first = process_id * devices_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + j) for j in range(devices_per_process))
  return env


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
  """Stops one child's process group (we started it with its own session)."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  except ProcessLookupError:
    pass


def launch(argv: Sequence[str], num_processes: int, devices_per_process: int | None = None, *,
           port: int | None = None, timeout: float | None = None, cwd: str | os.PathLike | None = None,
           log_dir: str | os.PathLike | None = None, echo: bool = True, platform: str = "cpu",
           extra_env: dict[str, str] | None = None, grace_s: float = 5.0) -> list[ProcessResult]:
  """Runs `argv` as processes 0..N-1 of one JAX job and waits for all of them.

  Returns one ProcessResult per process (all exited 0). Raises LaunchError (after
  stopping every process) if any process exits non-zero or `timeout` seconds pass;
  on KeyboardInterrupt stops every process and re-raises.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  port = port or common.free_port()
  log_dir = Path(log_dir) if log_dir else None
  if log_dir:
    log_dir.mkdir(parents=True, exist_ok=True)
  lock = threading.Lock()
  outputs: list[list[str]] = [[] for _ in range(num_processes)]
  procs: list[subprocess.Popen] = []
  threads = []

  def pump(i: int, proc: subprocess.Popen):
    log = open(log_dir / f"process_{i}.log", "w") if log_dir else None
    try:
      for line in proc.stdout:
        outputs[i].append(line)
        if log:
          log.write(line)
          log.flush()
        if echo:
          with lock:
            sys.stdout.write(f"[p{i}] {line}")
            sys.stdout.flush()
    finally:
      if log:
        log.close()

  def results(returncodes) -> list[ProcessResult]:
    for t in threads:
      t.join(timeout=grace_s)
    return [ProcessResult(i, returncodes[i], "".join(outputs[i]),
                          str(log_dir / f"process_{i}.log") if log_dir else None) for i in range(num_processes)]

  try:
    for i in range(num_processes):
      env = {**os.environ, **(extra_env or {})}
      env.update(process_env(i, num_processes, port, devices_per_process, platform, base=env))
      proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, start_new_session=True)
      procs.append(proc)
      threads.append(threading.Thread(target=pump, args=(i, proc), daemon=True))
      threads[-1].start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        for p in procs:
          _stop(p, grace_s)
        res = results([p.poll() for p in procs])
        tail = "".join(outputs[failed[0]][-30:])
        raise LaunchError(f"process {failed[0]} exited with code {codes[failed[0]]}; stopped the others. "
                          f"Its last output:\n{tail}", res)
      if all(c == 0 for c in codes):
        return results(codes)
      if deadline is not None and time.monotonic() > deadline:
        for p in procs:
          _stop(p, grace_s)
        raise LaunchError(f"timed out after {timeout:.0f} s; stopped all {num_processes} processes",
                          results([p.poll() for p in procs]))
      time.sleep(0.05)
  except BaseException:
    for p in procs:  # Ctrl-C, or an error while starting: never leave a child running
      _stop(p, grace_s)
    raise


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = None
  if "--" in argv:  # a raw command instead of an experiment
    cut = argv.index("--")
    argv, command = argv[:cut], argv[cut + 1:]
    if not command:
      raise SystemExit("launch.local: nothing after '--'")
  parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU: simulated devices per process (XLA_FLAGS); cuda: GPUs per process "
                           "(CUDA_VISIBLE_DEVICES); 0 = leave unset")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the children (cpu|cuda|'' = auto)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per job before all are stopped")
  parser.add_argument("--log_dir", default=None, help="default: <workdir>/logs[/<job>] or none")
  parser.add_argument("--python", default=sys.executable)
  if command is None:
    common.add_experiment_flags(parser)
  else:
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
  args = parser.parse_args(argv)
  port = args.port or common.free_port()

  if command is not None:
    jobs = [("run", command, args.log_dir)]
  else:
    exp = common.experiment_from_args(args)
    jobs = []
    for idx in common.sweep_indices(exp):
      tag = common.job_tag(idx)
      log_dir = args.log_dir or os.path.join(exp.workdir, "logs")
      jobs.append((tag, common.main_args(exp, args.python, idx), os.path.join(log_dir, tag)))

  for tag, cmd, log_dir in jobs:
    for i in range(args.num_processes):
      env = process_env(i, args.num_processes, port, args.devices_per_process, args.platform)
      print(f"+ [{tag} p{i}] {common.format_command(cmd, env)}", flush=True)
    if args.dry_run:
      continue
    try:
      launch(cmd, args.num_processes, args.devices_per_process, port=port, timeout=args.timeout,
             log_dir=log_dir, platform=args.platform)
    except LaunchError as e:
      print(f"launch.local: job {tag} failed: {e}", file=sys.stderr)
      return 1
    port = common.free_port()  # the next job gets a fresh coordinator port
  return 0


if __name__ == "__main__":
  sys.exit(main())
