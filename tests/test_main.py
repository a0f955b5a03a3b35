"""The CLI: experiment files, command-line overrides, sweeps, and the pretraining smoke run."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_jax import main as main_lib

from main_fixtures import xla_flags  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": xla_flags(2), "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


FAKE = textwrap.dedent('''
  import json, os
  import ml_collections as mlc
  def get_config():
    return mlc.ConfigDict({"optim": {"lr": 1.0}, "name": "x"})
  def get_sweep():
    return [{"optim.lr": 0.1}, {"optim.lr": 0.2, "name": "y"}]
  def train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    json.dump(config.to_dict(), open(os.path.join(workdir, "config.json"), "w"))
    return config.optim.lr
''')


def test_sweep_runs_each_point_in_its_own_workdir(tmp_path):
  path = tmp_path / "fake_exp.py"
  path.write_text(FAKE)
  exp = main_lib.load_experiment(str(path))
  results = main_lib.run(exp, exp.get_config(), str(tmp_path / "w"), sweep=True)
  assert [r["result"] for r in results] == [0.1, 0.2]
  cfg = json.load(open(tmp_path / "w" / "sweep" / "name=y,optim.lr=0.2" / "config.json"))
  assert cfg == {"optim": {"lr": 0.2}, "name": "y"}
  only = main_lib.run(exp, exp.get_config(), str(tmp_path / "w2"), sweep=True, sweep_index=1)
  assert [r["result"] for r in only] == [0.2]


def test_bad_sweep_key_and_missing_functions(tmp_path):
  path = tmp_path / "fake_exp.py"
  path.write_text(FAKE.replace('"optim.lr": 0.1', '"optim.lrr": 0.1'))
  exp = main_lib.load_experiment(str(path))
  with pytest.raises(ValueError, match="sweep override 'optim.lrr': no such config key"):
    main_lib.run(exp, exp.get_config(), str(tmp_path / "w"), sweep=True)
  (tmp_path / "bad.py").write_text("def get_config():\n  return None\n")
  with pytest.raises(ValueError, match="defines no train"):
    main_lib.load_experiment(str(tmp_path / "bad.py"))


def test_unknown_config_key_on_the_command_line_fails_clearly(tmp_path):
  out = _cli("--config", "experiments/pretrain_tiny.py", "--workdir", str(tmp_path), "--config.optim.lrr=1")
  assert out.returncode != 0
  assert "lrr" in out.stderr


def test_pretrain_smoke_run_learns_and_resumes(tmp_path):
  args = ("--config", "experiments/pretrain_tiny.py", "--workdir", str(tmp_path), "--config.preset=smoke",
          "--config.loop.progress=False")
  out = _cli(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [h["pretrain/loss"] for h in history if "pretrain/loss" in h]
  assert len(losses) == 3 and losses[-1] < losses[0] - 0.5
  evals = [h["eval/loss"] for h in history if "eval/loss" in h]
  assert evals and evals[-1] < 5.5  # ln(512) = 6.24 at random init
  assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "30"
  # Re-running a finished workdir restores and trains no further steps.
  again = _cli(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 30" in again.stderr
  history2 = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len([h for h in history2 if "pretrain/loss" in h]) == 3


def test_compilation_cache_defaults_to_the_workdir_and_yields_to_the_environment(tmp_path, monkeypatch):
  import jax
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    main_lib._compilation_cache("", str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    main_lib._compilation_cache(str(tmp_path / "mine"), str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", before[0])
    main_lib._compilation_cache("none", str(tmp_path))             # off: nothing changes
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    main_lib._compilation_cache("", str(tmp_path))                 # the user's own cache wins
    assert jax.config.jax_compilation_cache_dir == before[0]
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
