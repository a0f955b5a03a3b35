"""GPT-2 zero-shot and GPT-3 few-shot evaluation: accuracy vs number of demonstrations k and model size.

  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/in_context
  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/ic --config.init_from=runs/pretrain
  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/ic_smoke --config.preset=smoke

Without `init_from`, pretrains the model `sizes` first (experiments/pretrain_tiny.py's `train`,
each in workdir/models/<size>, so a re-run resumes/reuses them). Then, with no gradient update,
scores held-out synthetic tasks with k = 0, 1, 4 same-family demonstrations in each prompt
format (rlhf_jax/eval/in_context.py): exact match of the greedy answer and multiple choice by
log-likelihood. Writes in_context.json, in_context.png and prints a table.
"""
import json
import os

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.eval import in_context
from rlhf_jax.model import gpt
from rlhf_jax.train import stages

PRESETS = {
    "default": {},
    # ~1 minute on 2 CPU cores: two very small models, few steps, few examples.
    "smoke": {"sizes": "1x32x2,2x48x2", "pretrain_steps": 20, "n_docs": 2000, "seq_len": 160,
              "eval.n_examples": 16, "eval.formats": ("hh",)},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""                    # comma-separated pretraining workdirs; "" = pretrain `sizes` here
  c.sizes = "2x64x4,2x128x4,4x128x4"  # n_layer x d_model x n_head, pretrained when init_from is ""
  c.pretrain_steps = 500
  c.n_docs = 30000
  c.seq_len = 160                     # context window: room for ~4 demonstrations + the query + answer
  c.batch_size = 16
  c.lr = 2e-3
  c.eval = mlc.ConfigDict(dict(n_examples=200, ks=(0, 1, 4), formats=("hh", "qa", "chat"), n_choices=4,
                               max_new_tokens=12, batch_size=50, seed=0, same_family=True))
  return c


def pretrain_models(config, workdir) -> list[str]:
  pretrain = load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_tiny.py"))
  dirs = []
  for size in pretrain.parse_sizes(config.sizes):
    c = pretrain.member_config(
        size, config.pretrain_steps, seed=config.seed, seq_len=config.seq_len, vocab_size=512,
        batch_size=config.batch_size, lr=config.lr, warmup_steps=50, n_logs=5,
        data=dict(n_docs=config.n_docs,   # one tokenizer for all sizes: the first model's
                  tokenizer_dir=os.path.join(dirs[0], "tokenizer") if dirs else ""))
    dirs.append(os.path.join(workdir, "models", "x".join(map(str, size))))
    pretrain.train(c, dirs[-1])
  return dirs


def plot(path, results, ks, formats):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = (("exact_match", "exact match (greedy)"), ("mc_mean", "multiple choice (mean log-prob)"))
  fig, axes = plt.subplots(len(metrics), len(formats), figsize=(3.6 * len(formats), 6), squeeze=False)
  for col, fmt in enumerate(formats):
    for row, (key, label) in enumerate(metrics):
      ax = axes[row][col]
      for r in results:
        ax.plot(ks, [r["formats"][fmt][k][key] for k in ks], "o-", label=f"{r['name']} ({r['num_params'] / 1e3:.0f}k)")
      if key.startswith("mc"):
        ax.axhline(results[0]["formats"][fmt][ks[0]]["chance_mc"], ls=":", color="gray", label="chance")
      ax.set_xticks(list(ks))
      ax.set_xlabel("demonstrations k")
      ax.set_title(f"{fmt}: {label}", fontsize=9)
      ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("accuracy")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  model_dirs = config.init_from.split(",") if config.init_from else pretrain_models(config, workdir)
  e = config.eval
  ks = tuple(int(k) for k in e.ks)
  examples = in_context.make_examples(e.n_examples, max(ks), e.seed, n_choices=e.n_choices,
                                      same_family=e.same_family)
  results = []
  for d in model_dirs:
    _, cfg, tok, params = stages.load_stage(d)
    per_format = {fmt: in_context.evaluate(params, cfg, tok, examples, ks, fmt, max_new_tokens=e.max_new_tokens,
                                           batch_size=e.batch_size) for fmt in e.formats}
    results.append({"name": os.path.basename(os.path.normpath(d)), "workdir": d, "num_params": gpt.num_params(params),
                    "formats": per_format})
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "in_context.json"), "w") as f:
    json.dump({"ks": ks, "n_examples": e.n_examples, "results": results}, f, indent=2)
  plot(os.path.join(workdir, "in_context.png"), results, ks, tuple(e.formats))
  print(f"{'model':>10} {'params':>8} {'format':>6} {'k':>2} {'exact':>6} {'mc_sum':>6} {'mc_mean':>7} {'shots':>5}")
  for r in results:
    for fmt, by_k in r["formats"].items():
      for k, m in by_k.items():
        print(f"{r['name']:>10} {r['num_params']:>8} {fmt:>6} {k:>2} {m['exact_match']:>6.3f} {m['mc_sum']:>6.3f} "
              f"{m['mc_mean']:>7.3f} {m['mean_shots_em']:>5.2f}")
  return {f"{r['name']}/{fmt}/k={k}/{key}": m[key] for r in results for fmt, by_k in r["formats"].items()
          for k, m in by_k.items() for key in ("exact_match", "mc_mean")}
