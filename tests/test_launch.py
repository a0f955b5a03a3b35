"""Launch scripts: exact dry-run commands (2-host TPU v4-16, 2 nodes x 8 GPUs), the generated sbatch
script executed against stub Slurm tools, the TPU step order against a stub gcloud, and the local
launcher's process handling (env, logs, failure and timeout stop every process)."""
import os
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:   # launch/ is a top-level folder of the repo, not an installed package
  sys.path.insert(0, REPO_ROOT)

from launch import common, local, slurm_gpu, tpu_vm  # noqa: E402

SWEEP_EXP = textwrap.dedent('''
  def get_config():
    return {}
  def get_sweep():
    return [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}, {"optim.lr": 1e-2}]
  def train(config, workdir):
    return {}
''')


def _commands(out: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _stub(bin_dir, name, body):
  path = bin_dir / name
  path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


TPU_ARGS = ["--name", "rl-v4", "--zone", "us-central2-b", "--project", "proj", "--accelerator_type", "v4-16",
            "--config", "experiments/sft_tiny.py", "--workdir", "gs://bkt/runs/sft", "--set", "preset=smoke",
            "--set", "optim.lr=1e-4", "--repo", "/src/repo", "--logs_dir", "logs"]


def test_tpu_dry_run_prints_exact_commands(capsys):
  assert tpu_vm.main(TPU_ARGS + ["--dry-run"]) == 0
  cmds = _commands(capsys.readouterr().out)
  zone = ["--zone=us-central2-b", "--project=proj"]
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rl-v4", *zone,
                     "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]
  tar, scp, install, run, mkdir, logs, delete = cmds[1:]
  assert tar[:3] == ["tar", "-czf", "/tmp/rl-v4-rlhf_jax.tar.gz"] and tar[-3:] == ["-C", "/src/repo", "."]
  assert "--exclude=./.git" in tar and "--exclude=./runs" in tar
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/rl-v4-rlhf_jax.tar.gz",
                 "rl-v4:~/rlhf_jax.tar.gz", *zone, "--worker=all"]
  assert install[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rl-v4", *zone, "--worker=all"]
  assert "pip install -q -e ." in install[9] and "gcsfuse --implicit-dirs bkt /tmp/gcs/bkt" in install[9]
  assert run[:9] == install[:9]
  remote = run[9].removeprefix("--command=")
  # The workers run exactly this, with the gs:// workdir read through the gcsfuse mount.
  assert remote == ("set -o pipefail; cd ~/rlhf_jax && python3 -m rlhf_jax.main --config=experiments/sft_tiny.py "
                    "--workdir=/tmp/gcs/bkt/runs/sft --config.preset=smoke --config.optim.lr=1e-4 2>&1 "
                    "| tee ~/rlhf_jax_logs/run-$(hostname).log")
  assert mkdir == ["mkdir", "-p", "logs"]
  assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "rl-v4:~/rlhf_jax_logs", "logs", *zone,
                  "--worker=all", "--recurse"]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rl-v4", *zone, "--quiet"]


def test_tpu_sweep_runs_one_job_per_point(tmp_path, capsys):
  exp = tmp_path / "exp.py"
  exp.write_text(SWEEP_EXP)
  args = ["--name", "t", "--zone", "z", "--config", str(exp), "--workdir", "/mnt/runs/x", "--sweep",
          "--steps", "run", "--dry-run"]
  tpu_vm.main(args)
  runs = _commands(capsys.readouterr().out)
  assert len(runs) == 3
  for i, cmd in enumerate(runs):
    assert f"--workdir=/mnt/runs/x --sweep --sweep_index={i} 2>&1 | tee ~/rlhf_jax_logs/sweep{i}-" in cmd[-1]
  tpu_vm.main(args[:-3] + ["--sweep_index", "1", "--steps", "run", "--dry-run"])
  (only,) = _commands(capsys.readouterr().out)
  assert "--sweep --sweep_index=1 " in only[-1]


def test_tpu_failed_run_still_collects_logs_and_deletes(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.txt"
  # A stub gcloud that records each call and fails the experiment run.
  _stub(bin_dir, "gcloud", f'''
    echo "$4 $*" >> {calls}
    if [[ "$*" == *rlhf_jax.main* ]]; then exit 7; fi
  ''')
  repo = tmp_path / "repo"
  repo.mkdir()
  (repo / "a.py").write_text("x = 1\n")
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  args = TPU_ARGS[:-4] + ["--repo", str(repo), "--logs_dir", str(tmp_path / "logs"),
                          "--tarball", str(tmp_path / "repo.tgz")]
  assert tpu_vm.main(args) == 1
  verbs = [line.split()[0] for line in calls.read_text().splitlines()]
  assert verbs == ["create", "scp", "ssh", "ssh", "scp", "delete"]
  assert (tmp_path / "repo.tgz").stat().st_size > 0   # the real tar ran
  assert tpu_vm.main(args + ["--keep"]) == 1
  assert calls.read_text().splitlines()[-1].split()[0] == "scp"   # --keep: no delete


def _slurm(argv, capsys):
  assert slurm_gpu.main(argv + ["--dry-run"]) == 0
  out = capsys.readouterr().out
  script = out.split("\n", 1)[1].rsplit("\n+ ", 1)[0] + "\n"
  return script, _commands(out)


def test_slurm_dry_run_two_nodes_eight_gpus(capsys):
  argv = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu", "--time", "02:00:00",
          "--config", "experiments/sft_tiny.py", "--workdir", "/shared/runs/sft", "--set", "preset=smoke",
          "--repo", "/shared/rlhf_jax", "--logs_dir", "/shared/logs", "--setup", "source venv/bin/activate"]
  script, cmds = _slurm(argv, capsys)
  assert cmds == [["sbatch", "/shared/logs/rlhf_jax.sbatch"]]
  lines = script.splitlines()
  for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --cpus-per-task=64", "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
               "#SBATCH --output=/shared/logs/%x-%j.out", "cd /shared/rlhf_jax", "source venv/bin/activate"):
    assert want in lines
  assert not any("--array" in l for l in lines)
  srun = shlex.split(lines[-1])
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--label", "bash"]
  assert srun[4:] == ["-c", "export RLHF_JAX_PROCESS_ID=$SLURM_PROCID; unset SLURM_LOCALID; exec python3 -m "
                      "rlhf_jax.main --config=experiments/sft_tiny.py --workdir=/shared/runs/sft "
                      "--config.preset=smoke"]
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)   # valid shell

  per_gpu, _ = _slurm(argv + ["--process_per", "gpu"], capsys)
  assert "#SBATCH --ntasks-per-node=8" in per_gpu and "#SBATCH --cpus-per-task=8" in per_gpu
  assert "unset SLURM_LOCALID" not in per_gpu   # JAX pins each process to GPU $SLURM_LOCALID


def _run_script(tmp_path, script, ntasks, extra_env=None):
  """Runs an sbatch script with stub scontrol/srun/python3; returns one env+argv dump per task."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _stub(bin_dir, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
  # srun: run the task command once per task with that task's Slurm variables.
  _stub(bin_dir, "srun", '''
    while [[ "$1" == --* ]]; do shift; done
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" || exit $?
    done
  ''')
  _stub(bin_dir, "python3", '''
    echo "TASK coord=$RLHF_JAX_COORDINATOR n=$RLHF_JAX_NUM_PROCESSES id=$RLHF_JAX_PROCESS_ID \\
localid=${SLURM_LOCALID-unset} argv=$*"
  ''')
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
         "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks // 2), **(extra_env or {})}
  script = script.replace(f"cd {shlex.quote(str(common.REPO))}", f"cd {tmp_path}")
  out = subprocess.run(["bash", "-c", script], env=env, text=True, capture_output=True, check=True).stdout
  return [line for line in out.splitlines() if line.startswith("TASK")]


def test_slurm_script_gives_each_task_its_process_id(tmp_path, capsys):
  base = ["--nodes", "2", "--gpus_per_node", "8", "--config", "e.py", "--workdir", "/w"]
  script, _ = _slurm(base, capsys)
  port = 61440 + 4242 % 4096
  tasks = _run_script(tmp_path, script, ntasks=2)
  assert tasks == [f"TASK coord=gpu-node-07:{port} n=2 id={i} localid=unset argv=-m rlhf_jax.main "
                   f"--config=e.py --workdir=/w" for i in range(2)]
  script, _ = _slurm(base + ["--process_per", "gpu"], capsys)
  tasks = _run_script(tmp_path, script, ntasks=16)
  assert len(tasks) == 16
  assert tasks[9].startswith(f"TASK coord=gpu-node-07:{port} n=16 id=9 localid=1 ")


def test_slurm_sweep_is_a_job_array(tmp_path, capsys):
  exp = tmp_path / "exp.py"
  exp.write_text(SWEEP_EXP)
  script, _ = _slurm(["--nodes", "2", "--config", str(exp), "--workdir", "/w", "--sweep"], capsys)
  assert "#SBATCH --array=0,1,2" in script and "%x-%A_%a.out" in script
  tasks = _run_script(tmp_path, script, ntasks=2, extra_env={"SLURM_ARRAY_TASK_ID": "2"})
  assert all(t.endswith("--workdir=/w --sweep --sweep_index=2") for t in tasks)
  script, _ = _slurm(["--config", str(exp), "--workdir", "/w", "--sweep_index", "1"], capsys)
  assert "--array" not in script and "--sweep --sweep_index=1'" in script


def test_bad_flags_are_rejected(capsys):
  with pytest.raises(ValueError, match="KEY=VALUE"):
    slurm_gpu.main(["--config", "e.py", "--workdir", "/w", "--set", "oops", "--dry-run"])
  with pytest.raises(SystemExit):
    tpu_vm.main(["--name", "t", "--zone", "z", "--config", "e.py", "--workdir", "/w", "--steps", "run,boot"])
  assert "unknown step(s) ['boot']" in capsys.readouterr().err
  with pytest.raises(ValueError, match="defines no get_sweep"):
    common.count_sweep_points(os.path.join(os.path.dirname(__file__), "multiprocess_worker.py"))


# ------------------------------------------------------------------ local launcher
ENV_DUMP = ("import os; print(os.environ['RLHF_JAX_PROCESS_ID'], os.environ['RLHF_JAX_NUM_PROCESSES'], "
            "os.environ['RLHF_JAX_COORDINATOR'], os.environ['RLHF_JAX_CPU_COLLECTIVES'], os.environ['XLA_FLAGS'])")


def test_local_launch_sets_env_and_collects_logs(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
  res = local.launch([sys.executable, "-c", ENV_DUMP], 3, devices_per_process=2, port=12345, timeout=60,
                     log_dir=tmp_path / "logs", echo=False)
  for i, r in enumerate(res):
    assert r.returncode == 0
    assert r.output.split() == [str(i), "3", "127.0.0.1:12345", "gloo", "--xla_foo=1",
                                "--xla_force_host_platform_device_count=2"]
    assert open(r.log_path).read() == r.output


def test_local_env_for_gpus():
  env = local.process_env(1, 2, 999, devices_per_process=4, platform="cuda")
  assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["JAX_PLATFORMS"] == "cuda"
  assert "RLHF_JAX_CPU_COLLECTIVES" not in env and "XLA_FLAGS" not in env


def test_local_ctrl_c_stops_every_process(tmp_path):
  code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
  # SIGINT's default disposition in the launcher: a test worker may run with SIGINT ignored, which a child inherits
  # (and Python then installs no KeyboardInterrupt handler: the launcher would wait for its children instead).
  launcher = subprocess.Popen([sys.executable, "-m", "launch.local", "-n", "2", "--", sys.executable, "-c", code],
                              cwd=common.REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    pids = []
    deadline = time.monotonic() + 120   # generous: CI machines are shared (a timeout here is not the behaviour under test)
    while len(pids) < 2 and time.monotonic() < deadline:
      line = launcher.stdout.readline()
      if " pid " in line:
        pids.append(int(line.split()[-1]))
    assert len(pids) == 2
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=120) != 0
  finally:
    if launcher.poll() is None:
      launcher.kill()
  for pid in pids:   # both children were stopped (and reaped) by the launcher
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_local_failure_stops_the_other_processes(tmp_path):
  # Process 1 fails at once; process 0 would sleep for a minute and must be stopped.
  code = "import os, sys, time; pid = os.environ['RLHF_JAX_PROCESS_ID']; print('hi', pid, flush=True); " \
         "sys.exit(3) if pid == '1' else time.sleep(60)"
  t0 = time.monotonic()
  with pytest.raises(local.LaunchError, match="process 1 exited with code 3") as err:
    local.launch([sys.executable, "-c", code], 2, timeout=60, echo=False)
  assert time.monotonic() - t0 < 30
  assert err.value.results[0].returncode == -15 and err.value.results[1].returncode == 3   # SIGTERM
  assert "hi 1" in err.value.results[1].output


def test_local_timeout_stops_everything():
  t0 = time.monotonic()
  with pytest.raises(local.LaunchError, match="timed out after 1 s") as err:
    local.launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout=1.0, echo=False, grace_s=1.0)
  assert time.monotonic() - t0 < 20
  assert [r.returncode for r in err.value.results] == [-15, -15]


def test_local_cli_dry_run(tmp_path, capsys):
  exp = tmp_path / "exp.py"
  exp.write_text(SWEEP_EXP)
  assert local.main(["-n", "2", "--devices_per_process", "2", "--port", "5555", "--config", str(exp),
                     "--workdir", "runs/x", "--sweep", "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 6   # 3 sweep points x 2 processes
  assert lines[3].startswith("+ [sweep1 p1] RLHF_JAX_COORDINATOR=127.0.0.1:5555 RLHF_JAX_NUM_PROCESSES=2 "
                             "RLHF_JAX_PROCESS_ID=1 ")
  assert lines[3].endswith(f"-m rlhf_jax.main --config={exp} --workdir=runs/x --sweep --sweep_index=1")
