"""The frontier experiment: best-of-n estimators against brute force, budget sizing, and the smoke preset
end to end (structure only: every method ran, every metric is present and finite; not the outcome)."""
import itertools
import json
import math

import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax.eval import bootstrap, rm_diagnostics
from rlhf_jax.recipes import frontier

from main_fixtures import finite, run_smoke  # tests/ is on sys.path


def test_best_of_n_expected_equals_the_mean_over_all_subsets():
  rng = np.random.default_rng(0)
  gold, rm = rng.random((5, 6)), rng.normal(size=(5, 6))
  for n in range(1, 7):
    want = [np.mean([gold[p, max(s, key=lambda j: rm[p, j])] for s in itertools.combinations(range(6), n)])
            for p in range(5)]
    np.testing.assert_allclose(rm_diagnostics.best_of_n_expected(gold, rm, n), want, rtol=1e-12)
  np.testing.assert_allclose(rm_diagnostics.best_of_n_expected(gold, rm, 1), gold.mean(1))
  with pytest.raises(ValueError, match="1 <= n <= N=6"):
    rm_diagnostics.best_of_n_expected(gold, rm, 7)


def test_best_of_n_kl_and_bootstrap():
  assert rm_diagnostics.best_of_n_kl(1) == 0.0
  assert rm_diagnostics.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
  lo, hi = bootstrap.mean_ci(np.arange(100.0), n_boot=500)
  assert lo < 49.5 < hi and hi - lo < 25
  with pytest.raises(ValueError, match="non-empty 1-D"):
    bootstrap.mean_ci([])


def test_budget_sizing_counts_policy_tokens(tmp_path):
  (tmp_path / "pretrain").mkdir()
  (tmp_path / "pretrain" / "stage.json").write_text(json.dumps({"stage": "pretrain", "data": {"seq_len": 128}}))
  ppo = mlc.ConfigDict(dict(batch_size=64, max_prompt_len=32, ptx_batch_size=16, ptx_seq_len=0,
                            ppo=dict(max_new_tokens=24, ppo_epochs=2, ptx_coef=0.0), loop=dict(log_every=5)))
  assert frontier.tokens_per_step("ppo", ppo, str(tmp_path)) == 64 * 56 * 2
  ppo.ppo.ptx_coef = 1.0
  assert frontier.tokens_per_step("ppo", ppo, str(tmp_path)) == 64 * 56 * 2 + 16 * 128 * 2
  group = mlc.ConfigDict(dict(batch_size=16, max_prompt_len=32, ptx_batch_size=16, ptx_seq_len=0,
                              pg=dict(group_size=4, max_new_tokens=24, ppo_epochs=2, ptx_coef=0.0), loop=dict(log_every=5)))
  assert frontier.tokens_per_step("group", group, str(tmp_path)) == 64 * 56 * 2   # = PPO's, without ptx
  dpo = mlc.ConfigDict(dict(batch_size=16, k_max=9, max_len=64, loop=dict(log_every=10)))
  sized = frontier.size_stage("dpo", dpo, str(tmp_path), budget=16 * 9 * 64 * 10, n_checkpoints=3)
  assert sized["steps"] == 10 and dpo.loop.num_steps == 10 and dpo.loop.ckpt_every == 4
  assert dpo.loop.max_to_keep == 5
  assert frontier.gold_per_nat({"gold_mean": 0.6, "kl_to_sft": 2.0}, 0.5, 0.05) == pytest.approx(0.05)
  assert frontier.gold_per_nat({"gold_mean": 0.6, "kl_to_sft": 0.01}, 0.5, 0.05) is None


def _run(workdir):
  return run_smoke("frontier_tiny.py", workdir, timeout=1800)


def test_frontier_smoke(tmp_path):
  """The smoke preset from nothing: the main job's pretrain/sft/rm smoke stages, then every method."""
  out = _run(tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
  summary = json.load(open(tmp_path / "summary.json"))
  methods = ("ppo", "ppo_ptx", "dpo_pairwise", "dpo_kwise", "dpo_plackett_luce", "dpo_ipo", "rloo", "grpo",
             "iterated_ppo", "best_of_n")
  assert list(summary["methods"]) == list(methods)
  for name in methods:
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
  assert all(f"| {name} |" in table for name in methods)
  # A re-run finds every stage finished and every point evaluated.
  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "==> stage" not in again.stdout
