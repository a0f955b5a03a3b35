"""The main job's smoke preset: every stage runs, every metric is present and finite, re-runs resume.

This asserts the pipeline's structure, not the paper's claims (those need the full run).
"""
import json

from main_fixtures import finite, run_smoke  # tests/ is on sys.path

STAGES = ("pretrain", "pretrain_large", "sft", "rm", "ppo", "ppo_ptx")


def _run(workdir):
  return run_smoke("instructgpt_tiny.py", workdir, timeout=900)


def test_instructgpt_smoke_pipeline(tmp_path):
  out = _run(tmp_path)
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
  assert 0.0 <= summary["rm"]["heldout_accuracy"] <= 1.0
  bon = summary["rm"]["best_of_n_sft"]
  for key in ("gold_mean_sample", "gold_best_of_n_rm", "gold_best_of_n_oracle"):
    assert 0.0 <= bon[key] <= 1.0, (key, bon[key])
  assert bon["gold_best_of_n_oracle"] >= max(bon["gold_best_of_n_rm"], bon["gold_mean_sample"])
  assert set(summary["elo"]["ratings"]) == {"pretrained", "pretrained_large", "sft", "ppo", "ppo_ptx"}
  assert len(summary["beta_sweep"]) >= 2
  assert set(summary["claims"]) and all("holds" in c for c in summary["claims"].values())
  for png in ("rm_accuracy.png", "ppo_curves.png", "gold_by_model.png", "beta_sweep.png"):
    assert (tmp_path / "plots" / png).stat().st_size > 1000
  # A re-run resumes: every stage is found finished, nothing is retrained.
  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "==> stage" not in again.stdout
