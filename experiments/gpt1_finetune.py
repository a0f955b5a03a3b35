"""GPT-1 supervised fine-tuning (Radford et al. 2018): a linear head on the extract token's final
hidden state, trained with L3 = L2 (task cross-entropy) + λ·L1 (LM loss on the same inputs).

  python -m rlhf_jax.main --config experiments/gpt1_finetune.py --workdir runs/gpt1 --config.task=similarity
  python -m rlhf_jax.main --config experiments/gpt1_finetune.py --workdir runs/gpt1 --sweep   # 4 tasks x λ∈{0,0.5}
  python -m rlhf_jax.main --config experiments/gpt1_finetune.py --workdir runs/gpt1_pt --config.init_from=runs/pretrain

Trunk: with `init_from` empty (default) a tiny post-LN GPT (the paper's layout, `model.pre_ln=False`)
is pretrained here on the synthetic corpus, with the task tokens <|start|> <|delim|> <|extract|>
in its BPE (untrained, as in the paper); the run is cached under `pretrain.cache_root` and shared
by all sweep points, so λ = 0 and λ = 0.5 start from the same weights. With `init_from` (e.g. a
`pretrain_tiny.py` workdir) the three tokens are appended to its tokenizer and `wte` grows by
fresh rows. Tasks (`task`): classification, entailment, similarity, multiple_choice from the
synthetic world (`rlhf_jax.gpt1.tasks`), or `data.source=gpt1_tasks/<task>` with user JSONL/TSV
`data.data_files` ("path" = train, or "train=a.jsonl,eval=b.jsonl").

Shows (default preset, 3 seeds): equal eval accuracy for λ = 0 and 0.5 on all four tasks (within
~2 points at 2k examples), but λ = 0 lets the trunk forget language modelling (eval L1 ~6 nats
vs ~1.5 with λ = 0.5).
"""
import dataclasses
import os
import time
from collections import Counter

import jax
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.data import builders
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.gpt1 import batches, heads, losses, pretrain, tasks
from rlhf_jax.train import stages, supervised

PRESETS = {
    "default": {},
    # a quick end-to-end check (~1-2 min on 2 idle CPU cores, pretraining included).
    "smoke": {"model.preset": "nano", "pretrain.n_docs": 1500, "pretrain.steps": 40,
              "pretrain.seq_len": 64, "pretrain.vocab_size": 384, "data.n_train": 256, "data.n_eval": 64,
              "epochs": 1, "batch_size": 16, "loop.log_every": 4},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.task = "entailment"       # classification | entailment | similarity | multiple_choice
  c.aux_lm_weight = 0.5       # λ (paper: 0.5)
  c.init_from = ""            # a pretraining workdir; "" = pretrain a tiny GPT here (cached)
  c.model = rcfg.model("tiny", dropout=0.0, pre_ln=False)   # inline pretraining only
  c.pretrain = mlc.ConfigDict(dict(cache_root="runs/gpt1_pretrain", n_docs=20000, data_seed=0, val_fraction=0.02,
                                   vocab_size=512, seq_len=128, steps=500, batch_size=32, lr=2e-3,
                                   warmup_steps=50, seed=0))
  c.dropout = 0.1             # trunk dropout while fine-tuning (paper: 0.1)
  c.head_dropout = 0.1        # dropout on the classifier input (paper: 0.1)
  c.data = mlc.ConfigDict(dict(source="synthetic", n_train=2000, n_eval=500, seed=0, data_dir="runs/tfds",
                               manual_dir="", data_files="", validation_fraction=0.0, train_split="train",
                               eval_split="eval", n_classes=0, max_options=4))
  c.max_len = 32              # longest synthetic input is 31 tokens
  c.epochs = 3                # paper: 3 epochs, batch 32, linear decay, warmup 0.2%
  c.batch_size = 32
  c.optim = rcfg.optim(lr=1e-3, warmup_steps=10, schedule="linear", weight_decay=0.01, b2=0.999)
  c.loop = rcfg.loop(num_steps=-1, log_every=20, ckpt_every=1000)  # -1: epochs x examples / batch
  c.mesh = rcfg.mesh()
  return c


def get_sweep():
  """λ = 0 vs λ = 0.5 on every task type (one shared pretrained trunk)."""
  return [{"task": t, "aux_lm_weight": w} for t in tasks.TASKS for w in (0.0, 0.5)]


def _data_files(spec: str):
  if "=" not in spec:
    return spec
  return dict(part.split("=", 1) for part in spec.split(","))


def load_records(data, task: str, split: str):
  if data.source == "synthetic":
    n = data.n_train if split == data.train_split else data.n_eval
    return tasks.make(task, n, data.seed, "eval" if split == data.eval_split else "train")
  if data.source.partition("/")[2] != task:
    raise ValueError(f"data.source={data.source!r} does not hold task {task!r} (expected gpt1_tasks/{task})")
  kwargs = {"data_files": _data_files(data.data_files)}
  if data.validation_fraction:
    kwargs["validation_fraction"] = float(data.validation_fraction)
  if data.n_classes:
    kwargs["num_classes"] = int(data.n_classes)
  return list(builders.load(data.source, split, data.data_dir, manual_dir=data.manual_dir or None, **kwargs))


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  start = time.time()
  cfg, tok, trunk = pretrain.load_or_pretrain(config, jax.random.PRNGKey(config.seed + 1))
  cfg = dataclasses.replace(cfg, dropout=float(config.dropout))
  pretrain_s = time.time() - start
  tok_lib.save(tok, os.path.join(workdir, "tokenizer"))
  task, data = config.task, config.data
  train_recs, eval_recs = load_records(data, task, data.train_split), load_records(data, task, data.eval_split)
  n_classes = tasks.n_classes(task) if data.source == "synthetic" else int(data.n_classes)
  if task != "multiple_choice" and n_classes < 2:
    n_classes = max(int(r["label"]) for r in train_recs) + 1
  enc = lambda recs, name: batches.encode_records(task, recs, tok, config.max_len, n_classes=n_classes,
                                                  max_options=data.max_options, name=name)
  train_arr, train_stats = enc(train_recs, "gpt1/train")
  eval_arr, eval_stats = enc(eval_recs, "gpt1/eval")
  supervised.resolve_steps(config, train_stats.kept)
  stages.write_stage(workdir, "gpt1_finetune", cfg, task=task, n_classes=n_classes,
                     aux_lm_weight=config.aux_lm_weight, init_from=config.init_from or "inline pretraining")
  params = heads.init(trunk, cfg, task, n_classes, jax.random.PRNGKey(config.seed + 2))
  fit_start = time.time()
  _, last, _ = supervised.fit(
      config, workdir, loss_fn=losses.make_loss_fn(cfg, task, float(config.aux_lm_weight), float(config.head_dropout)),
      param_axes=heads.param_axes(cfg), params=params, name="gpt1", eval_weight_key="num_examples",
      host_batches=batches.train_batches(train_arr, config.batch_size, seed=config.seed),
      eval_batches=batches.eval_batches(eval_arr, config.batch_size))
  majority = max(Counter(eval_arr["label"].tolist()).values()) / max(len(eval_arr["label"]), 1)
  result = {"task": task, "aux_lm_weight": float(config.aux_lm_weight), "eval_accuracy": last.get("eval/accuracy"),
            "eval_majority_baseline": majority, "eval_task_loss": last.get("eval/task_loss"),
            "eval_lm_loss": last.get("eval/lm_loss"), "train_task_loss": last.get("task_loss"),
            "train_lm_loss": last.get("lm_loss"), "steps": config.loop.num_steps, "n_train": train_stats.kept,
            "n_eval": eval_stats.kept, "truncated_train": sum(train_stats.truncated.values()),
            "pretrain_or_load_s": round(pretrain_s, 1), "finetune_s": round(time.time() - fit_start, 1)}
  print(result)
  return result
