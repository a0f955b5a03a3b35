"""Power-law fitting (rlhf_jax/eval/scaling.py) and the predict-before-training plumbing of
experiments/scaling_law.py (with a stand-in for pretraining whose losses follow a known law)."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.eval import scaling
from rlhf_jax.model import gpt

REPO = Path(__file__).resolve().parents[1]
A, B, C0 = 2.0e3, -0.25, 1.2


def _sse(compute, loss, a, b, c):
  r = np.asarray(loss) - (a * np.asarray(compute) ** b + c)
  return float(r @ r)


def test_fit_recovers_exact_parameters_and_extrapolates():
  compute = np.geomspace(1e8, 1e11, 5)
  fit = scaling.fit_power_law(compute, A * compute ** B + C0)
  np.testing.assert_allclose([fit.a, fit.b, fit.c], [A, B, C0], rtol=1e-5)
  big = 1e13  # 100x beyond the largest fitted point
  assert abs(fit.predict(big) - (A * big ** B + C0)) < 1e-6
  assert fit.n_points == 5 and fit.sse < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_noisy_fit_is_a_least_squares_optimum_and_predicts_well(seed):
  rng = np.random.default_rng(seed)
  compute = np.geomspace(1e8, 1e11, 8)
  loss = (A * compute ** B + C0) * (1 + 0.005 * rng.standard_normal(8))
  fit = scaling.fit_power_law(compute, loss)
  # It is at least as good as the true parameters and no nearby point is better (local optimality).
  assert fit.sse <= _sse(compute, loss, A, B, C0) + 1e-12
  for da, db, dc in [(1e-3, 0, 0), (0, 1e-4, 0), (0, 0, 1e-3)]:
    for s in (-1, 1):
      assert fit.sse <= _sse(compute, loss, fit.a * (1 + s * da), fit.b + s * db, fit.c + s * dc) + 1e-12
  truth = A * 1e12 ** B + C0
  assert abs(fit.predict(1e12) - truth) / truth < 0.03


def test_loss_floor_is_constrained_to_be_non_negative():
  compute = np.geomspace(1e6, 1e10, 6)
  pure = scaling.fit_power_law(compute, 5.0 * compute ** -0.1)
  np.testing.assert_allclose([pure.a, pure.b, pure.c], [5.0, -0.1, 0.0], rtol=1e-5, atol=1e-8)
  # Data whose unconstrained optimum has c < 0: the fit sits on c = 0 and beats a brute-force
  # search over b on that boundary (a in closed form).
  loss = 5.0 * compute ** -0.1 - 0.3
  fit = scaling.fit_power_law(compute, loss)
  assert fit.c == 0.0
  best = min(_sse(compute, loss, (compute ** b) @ loss / ((compute ** b) @ (compute ** b)), b, 0.0)
             for b in np.linspace(-2, -1e-4, 20001))
  assert fit.sse <= best + 1e-12


def test_bad_input_raises():
  with pytest.raises(ValueError, match=">= 3"):
    scaling.fit_power_law([1e9, 1e10], [3.0, 2.0])
  with pytest.raises(ValueError, match="compute > 0"):
    scaling.fit_power_law([0.0, 1e9, 1e10], [4.0, 3.0, 2.0])
  with pytest.raises(ValueError, match="finite"):
    scaling.fit_power_law([1e8, 1e9, 1e10], [4.0, np.nan, 2.0])


def test_training_compute_and_prediction_error():
  cfg = gpt.preset("nano")
  assert scaling.training_compute(cfg, 64, 1000) == cfg.flops_per_token(64) * 1000
  err = scaling.prediction_error(2.2, 2.0)
  assert err["abs_error"] == pytest.approx(0.2) and err["rel_error"] == pytest.approx(0.1)


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_experiment_predicts_the_largest_run_before_training_it(tmp_path, monkeypatch):
  exp = _load(REPO / "experiments" / "scaling_law.py", "scaling_law_under_test")
  real = exp.load_pretrain()
  trained = []

  class FakePretrain:
    """Stands in for pretrain_tiny: final loss = A * C**B + C0 of the run's own compute."""
    get_config = staticmethod(real.get_config)
    parse_sizes = staticmethod(real.parse_sizes)
    member_config = staticmethod(real.member_config)

    @staticmethod
    def train(config, workdir):
      config = rcfg.apply_preset(config, real.PRESETS)   # the real experiment accepts these overrides
      model = rcfg.model_config(config.model)
      steps, seq = config.loop.num_steps, config.data.seq_len
      assert config.optim.total_steps == steps and model.max_len == seq
      prediction_exists = (tmp_path / "prediction.json").exists()
      trained.append((os.path.basename(workdir), steps, prediction_exists))
      c = scaling.training_compute(model, seq, steps * config.batch_size * seq)
      return {"final_eval_loss": A * c ** B + C0}

  monkeypatch.setattr(exp, "load_pretrain", lambda: FakePretrain)
  config = exp.get_config()
  config.preset = "smoke"
  out = exp.train(config, str(tmp_path))
  sizes = exp.PRESETS["smoke"]["sizes"].split(",")
  assert [t[0] for t in trained] == sizes
  # The prediction file exists only when the largest model starts training.
  assert [t[2] for t in trained] == [False] * (len(sizes) - 1) + [True]
  steps = [t[1] for t in trained]
  assert steps[0] == exp.PRESETS["smoke"]["steps_min"] and steps[-1] == exp.PRESETS["smoke"]["steps_max"]
  assert steps == sorted(steps)
  pred = json.loads((tmp_path / "prediction.json").read_text())
  assert pred["size"] == sizes[-1]
  assert out["rel_error"] < 1e-6 and out["compute_span"] > 10  # exact law -> exact prediction
  saved = json.loads((tmp_path / "scaling_law.json").read_text())
  assert [r["size"] for r in saved["runs"]] == sizes
  assert saved["abs_error"] == pytest.approx(abs(saved["predicted"] - saved["actual"]))
  assert (tmp_path / "scaling_law.png").stat().st_size > 1000
  assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
