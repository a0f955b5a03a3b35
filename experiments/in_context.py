"""GPT-2 zero-shot and GPT-3 few-shot evaluation: accuracy vs number of demonstrations k and model size.

  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/in_context
  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/ic --config.init_from=runs/pretrain
  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/ic_old --config.preset=no_fewshot_docs
  python -m rlhf_jax.main --config experiments/in_context.py --workdir runs/ic_smoke --config.preset=smoke

Without `init_from`, pretrains the model `sizes` first (experiments/pretrain_tiny.py's `train`,
each in workdir/models/fewshot<fraction>/<size>, so a re-run resumes/reuses them) on the synthetic
corpus with a `fewshot_fraction` share of multi-example documents: 2-6 correctly solved train-split
tasks of one family in a row, in the hh / qa / chat formats (`synthetic.pretraining_corpus`), the
lists of worked examples web text has and GPT-3's in-context learning feeds on. The rest of the
corpus is the misaligned one (mostly wrong answers), so a model can only tell that an answer should
be correct from demonstrations in its context. Preset no_fewshot_docs pretrains on the plain corpus
(fewshot_fraction 0, the one the InstructGPT job uses), which has no such documents.

Then, with no gradient update, scores held-out (eval-split) synthetic tasks with k = 0, 1, 4
same-family demonstrations in each prompt format (rlhf_jax/eval/in_context.py): exact match of the
greedy answer and multiple choice by log-likelihood, each with its binomial standard error over the
examples (and a bootstrap 95% interval for exact match), and the exact-match gain from k = 0 to the
largest k with its SE. Writes in_context.json, in_context.png and prints a table.
Measured runs of both presets, with the analysis: docs/results/in_context/ (exact match rises with
size but, at this scale, not with k).
"""
import json
import os
import re

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.eval import in_context
from rlhf_jax.model import gpt
from rlhf_jax.train import stages

PRESETS = {
    "default": {},
    # The plain corpus (no multi-example documents): the contrast to the default.
    "no_fewshot_docs": {"fewshot_fraction": 0.0},
    # ~1 minute on 2 CPU cores: two very small models, few steps, few examples.
    "smoke": {"sizes": "1x32x2,2x48x2", "pretrain_steps": 20, "n_docs": 2000, "seq_len": 160,
              "eval.n_examples": 16, "eval.formats": ("hh",)},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = ""                    # comma-separated pretraining workdirs; "" = pretrain `sizes` here
  # n_layer x d_model x n_head, pretrained when init_from is "". Two layers (enough for induction
  # heads) and 1600 steps at lr 3e-3: at 500 steps even 4 x 128 could not copy a list.
  c.sizes = "2x32x2,2x64x4,2x128x4"
  c.pretrain_steps = 1600
  c.n_docs = 30000
  c.fewshot_fraction = 0.3            # share of multi-example (correctly solved, one family) documents
  c.seq_len = 160                     # context window: room for ~4 demonstrations + the query + answer
  c.batch_size = 16
  c.lr = 3e-3
  c.eval = mlc.ConfigDict(dict(n_examples=200, ks=(0, 1, 4), formats=("hh", "qa", "chat"), n_choices=4,
                               max_new_tokens=12, batch_size=50, seed=0, same_family=True))
  return c


def pretrain_models(config, workdir) -> list[str]:
  pretrain = load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_tiny.py"))
  dirs = []
  frac = float(config.fewshot_fraction)
  for size in pretrain.parse_sizes(config.sizes):
    c = pretrain.member_config(
        size, config.pretrain_steps, seed=config.seed, seq_len=config.seq_len, vocab_size=512,
        batch_size=config.batch_size, lr=config.lr, warmup_steps=50, n_logs=5,
        data=dict(n_docs=config.n_docs, fewshot_fraction=frac,   # one tokenizer for all sizes: the first model's
                  tokenizer_dir=os.path.join(dirs[0], "tokenizer") if dirs else ""))
    # Per corpus, so presets sharing a workdir never reuse each other's models.
    dirs.append(os.path.join(workdir, "models", f"fewshot{frac:g}", "x".join(map(str, size))))
    pretrain.train(c, dirs[-1])
  return dirs


def plot(path, results, ks, formats, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = (("exact_match", "exact match (greedy) ± SE"), ("mc_mean", "multiple choice (mean log-prob) ± SE"))
  fig, axes = plt.subplots(len(metrics), len(formats), figsize=(3.6 * len(formats), 6), squeeze=False)
  for col, fmt in enumerate(formats):
    for row, (key, label) in enumerate(metrics):
      ax = axes[row][col]
      for r in results:
        by_k = r["formats"][fmt]
        ax.errorbar(ks, [by_k[k][key] for k in ks], yerr=[by_k[k][f"{key}_se"] for k in ks], fmt="o-", capsize=3,
                    label=f"{r['name']} ({r['num_params'] / 1e3:.0f}k)")
      if key.startswith("mc"):
        ax.axhline(results[0]["formats"][fmt][ks[0]]["chance_mc"], ls=":", color="gray", label="chance")
      ax.set_xticks(list(ks))
      ax.set_xlabel("demonstrations k")
      ax.set_title(f"{fmt}: {label}", fontsize=9)
      ax.set_ylim(0, 1)
  fig.suptitle(title, fontsize=9)
  axes[0][0].set_ylabel("accuracy")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _dump(obj) -> str:
  """JSON with the per-example 0/1 lists on one line each."""
  text = json.dumps(obj, indent=2)
  return re.sub(r"\[(?:\s*[01],)*\s*[01]\s*\]", lambda m: "[" + ",".join(re.findall(r"[01]", m.group(0))) + "]", text)


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  model_dirs = config.init_from.split(",") if config.init_from else pretrain_models(config, workdir)
  e = config.eval
  ks = tuple(int(k) for k in e.ks)
  examples = in_context.make_examples(e.n_examples, max(ks), e.seed, n_choices=e.n_choices,
                                      same_family=e.same_family)
  results = []
  for d in model_dirs:
    info, cfg, tok, params = stages.load_stage(d)
    data = info.get("data") or {}   # the corpus the model was pretrained on, where its stage recorded it
    per_format = {fmt: in_context.evaluate(params, cfg, tok, examples, ks, fmt, max_new_tokens=e.max_new_tokens,
                                           batch_size=e.batch_size) for fmt in e.formats}
    gains = {fmt: in_context.exact_match_gain(by_k, max(ks), min(ks)) for fmt, by_k in per_format.items()}
    results.append({"name": os.path.basename(os.path.normpath(d)), "workdir": d, "num_params": gpt.num_params(params),
                    "data_source": data.get("source"),
                    "fewshot_fraction": data.get("fewshot_fraction", 0.0 if data else None),
                    "formats": per_format, f"exact_match_gain_k{max(ks)}_vs_k{min(ks)}": gains})
  corpus = "init_from" if config.init_from else f"fewshot_fraction={float(config.fewshot_fraction):g}"
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "in_context.json"), "w") as f:
    f.write(_dump({"ks": ks, "n_examples": e.n_examples, "corpus": corpus, "preset": config.preset,
                   "pretrain_steps": config.pretrain_steps, "n_docs": config.n_docs, "results": results}))
  plot(os.path.join(workdir, "in_context.png"), results, ks, tuple(e.formats),
       title=f"{corpus}, {e.n_examples} held-out examples")
  print(f"corpus: {corpus}; {e.n_examples} held-out examples; ± = binomial SE over examples")
  print(f"{'model':>10} {'params':>8} {'format':>6} {'k':>2} {'exact':>13} {'exact 95% CI':>13} "
        f"{'mc_sum':>13} {'mc_mean':>13} {'shots':>5}")
  for r in results:
    for fmt, by_k in r["formats"].items():
      for k, m in by_k.items():
        lo, hi = m["exact_match_ci95"]
        print(f"{r['name']:>10} {r['num_params']:>8} {fmt:>6} {k:>2} "
              f"{m['exact_match']:>6.3f} ±{m['exact_match_se']:.3f} [{lo:.3f},{hi:.3f}] "
              f"{m['mc_sum']:>6.3f} ±{m['mc_sum_se']:.3f} {m['mc_mean']:>6.3f} ±{m['mc_mean_se']:.3f} "
              f"{m['mean_shots_em']:>5.2f}")
  print(f"exact-match gain k={max(ks)} - k={min(ks)} (SE: unpaired sqrt(se^2+se^2) / paired over examples):")
  for r in results:
    for fmt, g in r[f"exact_match_gain_k{max(ks)}_vs_k{min(ks)}"].items():
      print(f"{r['name']:>10} {fmt:>6} {g['diff']:+.3f} ± {g['se_unpaired']:.3f} / {g['se_paired']:.3f} "
            f"({g['z_unpaired']:.1f} unpaired SE)")
  out = {f"{r['name']}/{fmt}/k={k}/{key}": m[key] for r in results for fmt, by_k in r["formats"].items()
         for k, m in by_k.items() for key in ("exact_match", "exact_match_se", "mc_mean", "mc_mean_se")}
  out.update({f"{r['name']}/{fmt}/exact_match_gain_k{max(ks)}_vs_k{min(ks)}": g["diff"] for r in results
              for fmt, g in r[f"exact_match_gain_k{max(ks)}_vs_k{min(ks)}"].items()})
  return out
