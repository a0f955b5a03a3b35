"""The main job's smoke preset, then the frontier's smoke preset on the main job's stages: every stage and
method runs, every metric is present and finite, re-runs resume.

This asserts the pipelines' structure, not the paper's claims or the frontier's outcome (those need the
full runs). Both smoke runs live in this module so that they share one run of the main job (a module
fixture; `--dist loadfile` keeps a module on one worker): the frontier from nothing first runs the main
job's pretrain/sft/rm smoke stages -- the very stage configs of the main job's smoke run (checked
below) -- so, in a workdir beside the main job's, it finds them in the stage cache and copies them.
"""
import json

import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment

from main_fixtures import REPO, finite, run_smoke  # tests/ is on sys.path

STAGES = ("pretrain", "pretrain_large", "sft", "rm", "ppo", "ppo_ptx")
BASE = ("pretrain", "sft", "rm")       # the frontier's base stages
# The frontier smoke preset's methods: one of each kind (tests/test_frontier.py sizes and wires all of them).
METHODS = ("ppo_ptx", "dpo_pairwise", "dpo_kwise", "grpo", "iterated_ppo", "best_of_n")


def _main(workdir):
  return run_smoke("instructgpt_tiny.py", workdir, timeout=900)


def _frontier(workdir):
  return run_smoke("frontier_tiny.py", workdir, timeout=900)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("instructgpt_smoke")
  return workdir, _main(workdir)


def test_instructgpt_smoke_pipeline(main_run, monkeypatch, capsys):
  tmp_path, out = main_run
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for stage in STAGES:
    assert (tmp_path / "results" / f"{stage}.json").exists(), stage
    assert (tmp_path / stage / "stage.json").exists(), stage
  summary = json.load(open(tmp_path / "summary.json"))
  for name in ("pretrained", "pretrained_large", "sft", "ppo", "ppo_ptx"):
    m = summary["models"][name]
    for key in ("gold_mean", "gold_se", "win_rate_vs_sft_gold", "rm_score_mean", "pretrain_val_loss",
                "mean_response_length", "num_params"):
      assert finite(m[key]), (name, key, m[key])
    assert 0.0 <= m["gold_mean"] <= 1.0
  for name in ("sft", "ppo", "ppo_ptx"):
    assert finite(summary["models"][name]["kl_to_sft"])
  assert summary["models"]["sft"]["win_rate_vs_sft_gold"] == 0.5
  n = summary["settings"]["n_eval_prompts"]
  for name in ("pretrained", "ppo", "ppo_ptx"):   # wins / ties / losses against SFT, and a CI
    w = summary["models"][name]["vs_sft_gold"]
    assert w["wins"] + w["ties"] + w["losses"] == n and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
  pairs = summary["pairwise_gold"]
  assert len(pairs) == 10 and pairs["sft vs ppo"]["wins"] == summary["models"]["ppo"]["vs_sft_gold"]["losses"]
  assert 0.0 <= summary["rm"]["heldout_accuracy"] <= 1.0
  bon = summary["rm"]["best_of_n_sft"]
  for key in ("gold_mean_sample", "gold_best_of_n_rm", "gold_best_of_n_oracle"):
    assert 0.0 <= bon[key] <= 1.0, (key, bon[key])
  assert bon["gold_best_of_n_oracle"] >= max(bon["gold_best_of_n_rm"], bon["gold_mean_sample"])
  assert set(summary["elo"]["ratings"]) == {"pretrained", "pretrained_large", "sft", "ppo", "ppo_ptx"}
  assert len(summary["beta_sweep"]) >= 2
  assert set(summary["claims"]) and all("holds" in c for c in summary["claims"].values())
  traces = summary["ppo_traces"]["ppo"]   # training rows (trust region) and monitor rows (gold), by step
  assert any("ppo/approx_kl" in r and "ppo/clip_frac" in r for r in traces) and any("eval/gold_mean" in r for r in traces)
  for png in ("rm_accuracy.png", "ppo_curves.png", "ppo_trust_region.png", "gold_by_model.png", "beta_sweep.png"):
    assert (tmp_path / "plots" / png).stat().st_size > 1000
  # A re-run resumes: every stage (the beta sweep's too) is found finished, nothing is retrained. In
  # process, with the evaluation stubbed out (it re-samples every model: seconds, and the run above
  # already checked it); the CLI re-run path is checked by the frontier's re-run below.
  from rlhf_jax.eval import pipeline_report
  monkeypatch.setattr(pipeline_report, "evaluate_all", lambda config, workdir, results: {"claims": results})
  monkeypatch.setattr(pipeline_report, "write", lambda summary, workdir: None)
  main = load_experiment(str(REPO / "experiments" / "instructgpt_tiny.py"))
  config = main.get_config()
  config.preset = "smoke"
  capsys.readouterr()
  results = main.train(config, str(tmp_path))
  assert "==> stage" not in capsys.readouterr().out
  assert set(results) == set(STAGES) | {"beta_0", "beta_0.2"}


def test_frontier_base_stages_are_the_main_jobs_smoke_stages(tmp_path, monkeypatch):
  """What lets the frontier test below start from the main job's stages (no training here)."""
  frontier_exp = load_experiment(str(REPO / "experiments" / "frontier_tiny.py"))
  ran = {}
  monkeypatch.setattr(frontier_exp.chain, "run_stage",
                      lambda name, file, cfg, workdir, results: ran.update({name: (file.name, cfg.to_dict())}))
  fc = frontier_exp.get_config()
  fc.preset = "smoke"
  assert frontier_exp.base_stages(rcfg.apply_preset(fc, frontier_exp.PRESETS), str(tmp_path)) == str(tmp_path)
  main = load_experiment(str(REPO / "experiments" / "instructgpt_tiny.py"))
  mc = main.get_config()
  mc.preset = "smoke"
  mc = rcfg.apply_preset(mc, main.PRESETS)
  main._wire(mc, str(tmp_path))
  assert list(ran) == list(BASE)
  for name in BASE:
    assert ran[name] == (main.STAGE_FILES[name], mc.stages[name].to_dict()), name


def test_frontier_smoke(main_run, tmp_path):
  """The frontier's smoke preset: its base stages (copied from the stage cache that the main job's run beside it
  filled), then each of its methods, then a re-run."""
  main_dir, main_out = main_run
  assert main_out.returncode == 0, main_out.stderr[-3000:]
  assert main_dir.parent == tmp_path.parent     # one default stage cache: <workdir>/../.stage_cache
  out = _frontier(tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
  lines = out.stdout.splitlines()
  for name in BASE:   # not trained again: copied, byte for byte, from the main job's run
    assert f"==> stage {name}" not in lines and any(l.startswith(f"==> stage {name}: reused") for l in lines), name
    ours, theirs = json.load(open(tmp_path / "results" / f"{name}.json")), json.load(open(main_dir / "results" / f"{name}.json"))
    assert ours["cache_key"] == theirs["cache_key"] and ours["reused"]["trained_seconds"] == theirs["seconds"]
    for f in (main_dir / name / "checkpoints").rglob("*"):
      if f.is_file() and f.name != "commit_success.txt":
        assert (tmp_path / name / f.relative_to(main_dir / name)).read_bytes() == f.read_bytes(), f
  assert json.load(open(tmp_path / "sft" / "stage.json"))["init_from"] == str(tmp_path / "pretrain")
  summary = json.load(open(tmp_path / "summary.json"))
  assert list(summary["methods"]) == list(METHODS)
  for name in METHODS:
    m = summary["methods"][name]
    assert m["points"], name
    for p in m["points"]:
      for key in ("gold_mean", "kl_to_sft", "rm_score_mean", "pretrain_val_loss"):
        assert finite(p[key]), (name, key, p.get(key))
      assert 0.0 <= p["gold_ci95"][0] <= p["gold_mean"] <= p["gold_ci95"][1] <= 1.0, name
    if name != "best_of_n":
      assert m["policy_tokens"] > 0 and finite(m["train_seconds"])
      assert (tmp_path / name / "stage.json").exists() or (tmp_path / name / "round0" / "ppo" / "stage.json").exists()
  assert [p["n"] for p in summary["methods"]["best_of_n"]["points"]] == [1, 2, 4]
  assert len(summary["methods"]["iterated_ppo"]["points"]) >= 2      # both rounds' checkpoints
  assert summary["sft"]["kl_to_sft"] == 0.0
  assert "kwise_vs_pairwise_dpo" in summary and summary["budget"]["policy_tokens"] > 0
  assert (tmp_path / "frontier.png").stat().st_size > 1000
  table = (tmp_path / "results.md").read_text()
  assert all(f"| {name} |" in table for name in METHODS)
  # A re-run finds every stage finished and every point evaluated.
  again = _frontier(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "==> stage" not in again.stdout
