"""GPT-4's predictable scaling: predict a model's final loss from runs with far less compute.

  python -m rlhf_jax.main --config experiments/scaling_law.py --workdir runs/scaling
  python -m rlhf_jax.main --config experiments/scaling_law.py --workdir runs/scaling --config.preset=smoke

Trains a family of GPTs (sizes "n_layer x d_model x n_head", ascending: ~13k to ~1.9M params) on
the same data with the same recipe (experiments/pretrain_tiny.py's `train`, each in
workdir/runs/<size> so it resumes); steps grow geometrically with the parameter count from
steps_min to steps_max, so compute C = flops_per_token * tokens spans > 2 orders of magnitude.
L(C) = a C^b + c is fitted to all but the largest run, the largest's final validation loss is
predicted and written to prediction.json BEFORE it is trained, and then compared with the measured
loss (scaling_law.json, scaling_law.png).

Data: Tiny Shakespeare from ../shared/data by default (real text has the long tail that makes loss
power-law-like in compute). On the synthetic world's corpus (data.source=synthetic) the same
family goes from "nothing learned" to its entropy floor (random task inputs) within ~1 decade of
compute, which no small run reveals: the prediction misses by ~20% there.
"""
import json
import math
import os
import time
from pathlib import Path

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.data import lm_data
from rlhf_jax.eval import scaling

# Real text by default: the synthetic world's templated corpus has an abrupt loss floor (its
# random task inputs) that small runs cannot reveal, so it is not power-law-like (see the docstring).
SHAKESPEARE = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
PRESETS = {
    "default": {},
    # ~1 minute on 2 CPU cores; the built-in synthetic corpus, so it runs without ../shared/data.
    "smoke": {"sizes": "1x8x2,1x16x2,2x24x2,2x32x2", "steps_min": 12, "steps_max": 24, "data.source": "synthetic",
              "data.n_docs": 1500, "batch_size": 8, "seq_len": 32, "eval_batches": 4},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.sizes = "1x16x2,2x32x2,2x64x4,3x96x4,4x128x4,4x192x6"   # ~13k .. ~1.9M params; the last is predicted
  c.steps_min = 100           # steps of the smallest model ...
  c.steps_max = 500           # ... and of the largest, geometric in the parameter count between
  c.batch_size = 16
  c.seq_len = 64
  c.lr = 3e-3
  c.warmup_steps = 30
  c.eval_batches = 32
  # source: text (data.path) or synthetic (data.n_docs documents of the built-in world)
  c.data = mlc.ConfigDict(dict(source="text", path=SHAKESPEARE, n_docs=30000, seed=0, vocab_size=512,
                               val_fraction=0.05))
  c.progress = False
  return c


def load_pretrain():
  """experiments/pretrain_tiny.py as a module (not via rlhf_jax.main: it would redefine its flags)."""
  return load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_tiny.py"))


def run_config(config, pretrain, size, steps: int, tokenizer_dir: str):
  """The pretraining experiment's config for one family member."""
  c = pretrain.member_config(size, steps, seed=config.seed, seq_len=config.seq_len,
                             vocab_size=config.data.vocab_size, batch_size=config.batch_size, lr=config.lr,
                             warmup_steps=config.warmup_steps, n_logs=4, progress=config.progress,
                             data=dict(config.data.to_dict(), tokenizer_dir=tokenizer_dir))
  c.eval_batches = config.eval_batches
  return c


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  pretrain = load_pretrain()
  sizes = pretrain.parse_sizes(config.sizes, min_count=4, why=" (3 to fit, 1 to predict)")
  # One tokenizer for the whole family (trained once on the shared corpus).
  data = mlc.ConfigDict(dict(config.data.to_dict(), tokenizer_dir=""))
  train_docs, _ = lm_data.split_documents(lm_data.load_documents(data), data.val_fraction)
  lm_data.get_tokenizer(data, train_docs, workdir)
  tok_dir = os.path.join(workdir, "tokenizer")

  cfgs = [rcfg.model_config(run_config(config, pretrain, s, 1, tok_dir).model) for s in sizes]
  n_params = [m.num_params() for m in cfgs]
  span = math.log(n_params[-1] / n_params[0]) or 1.0
  steps = [round(config.steps_min * (config.steps_max / config.steps_min) ** (math.log(n / n_params[0]) / span))
           for n in n_params]
  tokens_per_step = config.batch_size * config.seq_len
  runs = []

  def run(i):
    name = "x".join(map(str, sizes[i]))
    t0 = time.time()
    res = pretrain.train(run_config(config, pretrain, sizes[i], steps[i], tok_dir), os.path.join(workdir, "runs", name))
    runs.append({"size": name, "num_params": n_params[i], "steps": steps[i], "tokens": steps[i] * tokens_per_step,
                 "compute": scaling.training_compute(cfgs[i], config.seq_len, steps[i] * tokens_per_step),
                 "final_eval_loss": res["final_eval_loss"], "seconds": round(time.time() - t0, 1)})
    print(f"[scaling] {name}: N={n_params[i]} C={runs[-1]['compute']:.3g} loss={res['final_eval_loss']:.4f}")

  for i in range(len(sizes) - 1):
    run(i)
  fit = scaling.fit_power_law([r["compute"] for r in runs], [r["final_eval_loss"] for r in runs])
  c_big = scaling.training_compute(cfgs[-1], config.seq_len, steps[-1] * tokens_per_step)
  prediction = {"size": "x".join(map(str, sizes[-1])), "compute": c_big, "predicted_loss": float(fit.predict(c_big)),
                "fit": fit.as_dict(), "made_at": time.strftime("%Y-%m-%d %H:%M:%S")}
  with open(os.path.join(workdir, "prediction.json"), "w") as f:  # written before the big run starts
    json.dump(prediction, f, indent=2)
  print(f"[scaling] predicted final loss of {prediction['size']} (C={c_big:.3g}): {prediction['predicted_loss']:.4f}")
  run(len(sizes) - 1)

  err = scaling.prediction_error(prediction["predicted_loss"], runs[-1]["final_eval_loss"])
  computes = [r["compute"] for r in runs]
  result = {"fit": fit.as_dict(), "prediction": prediction, **err, "runs": runs,
            "compute_span": max(computes) / min(computes),
            "compute_ratio_largest_to_fitted": computes[-1] / max(computes[:-1])}
  with open(os.path.join(workdir, "scaling_law.json"), "w") as f:
    json.dump(result, f, indent=2)
  scaling.plot_fit(os.path.join(workdir, "scaling_law.png"), computes[:-1], [r["final_eval_loss"] for r in runs[:-1]],
                   fit, held_out=(computes[-1], runs[-1]["final_eval_loss"]),
                   title=f"predicted {err['predicted']:.3f} vs actual {err['actual']:.3f} "
                         f"({100 * err['rel_error']:.1f}% error)")
  print(f"[scaling] actual {err['actual']:.4f}  abs error {err['abs_error']:.4f}  rel error {err['rel_error']:.2%}")
  print(f"{'size':>10} {'params':>9} {'steps':>6} {'compute':>10} {'loss':>8}")
  for r in runs:
    print(f"{r['size']:>10} {r['num_params']:>9} {r['steps']:>6} {r['compute']:>10.3g} {r['final_eval_loss']:>8.4f}")
  return {k: result[k] for k in ("predicted", "actual", "abs_error", "rel_error", "compute_span")}
