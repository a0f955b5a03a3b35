"""The frontier experiment: best-of-n estimators against brute force, budget sizing, and every method's stage
config. Its smoke preset end to end (structure only; one method of each kind) is in
tests/test_instructgpt_smoke.py, where it starts from the main job's smoke stages."""
import itertools
import json
import math

from pathlib import Path

import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.eval import bootstrap, rm_diagnostics
from rlhf_jax.recipes import frontier

EXP = Path(__file__).resolve().parents[1] / "experiments"


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


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_every_method_wires_and_sizes(tmp_path, preset):
  """Every method of experiments/frontier_tiny.py (the smoke run trains one of each kind): its stage
  config points at the shared stages and gets >= 1 step and a checkpoint from the budget."""
  (tmp_path / "pretrain").mkdir()
  (tmp_path / "pretrain" / "stage.json").write_text(json.dumps({"stage": "pretrain", "data": {"seq_len": 64}}))
  exp = load_experiment(str(EXP / "frontier_tiny.py"))
  c = exp.get_config()
  c.preset = preset
  c = rcfg.apply_preset(c, exp.PRESETS)
  names = [n for n in c.methods.split(",") if n != "best_of_n"]
  assert set(names) <= set(exp.METHODS) and "best_of_n" in c.methods.split(",")
  if preset == "default":
    assert names == list(exp.METHODS)
  kinds = set()
  for name, (file, kind) in exp.METHODS.items():
    assert file.exists() and kind in frontier.KINDS, name
    kinds.add(kind)
    sc = c.stages[name]
    frontier.wire(kind, sc, str(tmp_path), 0)
    assert sc.init_from == str(tmp_path / "sft"), name
    sized = frontier.size_stage(kind, sc, str(tmp_path), int(c.budget.policy_tokens), int(c.budget.n_checkpoints))
    assert sized["steps"] >= 1 and sized["policy_tokens"] >= sized["tokens_per_step"] > 0, (name, sized)
    loop_cfg = sc.ppo.loop if kind == "iterated" else sc.loop
    assert 1 <= loop_cfg.ckpt_every <= loop_cfg.num_steps, name
  assert kinds == set(frontier.KINDS)
  assert {exp.METHODS[n][1] for n in names} == set(frontier.KINDS)   # the smoke run trains every kind

