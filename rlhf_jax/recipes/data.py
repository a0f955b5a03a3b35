"""Where a stage's records and pretraining rows come from: one dispatch for every recipe.

`data.train` is a comma-separated list of sources, each one of
  synthetic                  the built-in world (demonstrations / prompts; comparisons are made by
                             the RM stage itself, by gold-labelling policy samples)
  <path>.jsonl[.gz]          a user file in any of TRL's formats or our K-way format
  <builder>[/<config>]       a TFDS builder, e.g. hh_rlhf/helpful-base, oasst_rankings/rankings
(see `rlhf_jax.data.sources`). `data.eval` takes the same; without it the held-out records are
split off `data.train` by a hash of the prompt. Builds land under `data.cache_dir`, else
`<workdir>/data`, never in the current directory.
"""
from __future__ import annotations

import logging
import os

import ml_collections as mlc
import numpy as np

from rlhf_jax.data import lm_data, pipeline, records, sources, synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.train import stages

log = logging.getLogger(__name__)

KINDS = records.KINDS


def data_config(**overrides) -> mlc.ConfigDict:
  """The `data` section every generic stage shares (plus the synthetic world's sizes)."""
  c = dict(train="synthetic", eval="", eval_fraction=0.05, train_split="train", limit=0, eval_limit=0,
           cache_dir="", seed=0, n_train=2000, n_eval=256, filler_rate=0.0, eval_split="eval")
  c.update(overrides)
  return mlc.ConfigDict(c)


def _specs(text: str, key: str) -> list[str]:
  specs = [s.strip() for s in str(text).split(",") if s.strip()]
  if not specs:
    raise ValueError(f"config.{key} is empty: give 'synthetic', a JSONL path or a builder name")
  return specs


def _synthetic(data, kind: str):
  n, n_eval, seed = int(data.n_train), int(data.n_eval), int(data.seed)
  if kind == "demonstrations":
    rate = float(data.get("filler_rate", 0.0))
    return (synthetic.demonstrations(n, seed, "train", filler_rate=rate),
            synthetic.demonstrations(n_eval, seed, "eval", filler_rate=rate))
  if kind == "prompts":   # data.eval_split "dev": held-out prompts that are not eval-split instances
    return synthetic.prompts(n, seed, "train"), synthetic.prompts(n_eval, seed, data.get("eval_split", "eval"))
  raise ValueError(f"data.train=synthetic gives no {kind}: the RM stage makes synthetic comparisons by "
                   "gold-labelling policy samples (experiments/rm.py with data.train=synthetic)")


def stage_records(data, kind: str, workdir: str) -> tuple[list, list, dict]:
  """(train records, eval records, report) of `kind` for a stage (see the module docstring)."""
  if kind not in KINDS:
    raise ValueError(f"stage_records: kind must be one of {KINDS}, got {kind!r}")
  train, held, reports = [], [], []
  specs = _specs(data.train, "data.train")
  if data.eval and (len(specs) > 1 or specs == ["synthetic"]):
    raise ValueError(f"data.eval={data.eval!r} needs exactly one non-synthetic data.train source, got "
                     f"{data.train!r} (several sources, or the built-in world, split their own held-out records)")
  for spec in specs:
    if spec == "synthetic":
      tr, ev = _synthetic(data, kind)
      rep = {"source": "synthetic", "train": len(tr), "eval": len(ev)}
    else:
      tr, ev, rep = sources.load(spec, kind, split=data.train_split, eval_spec=data.eval,
                                 eval_fraction=float(data.eval_fraction), seed=int(data.seed),
                                 cache_dir=data.cache_dir or os.path.join(workdir, "data"), limit=int(data.limit))
    train.extend(tr)
    held.extend(ev)
    reports.append(rep)
  if int(data.eval_limit) > 0:
    held = held[:int(data.eval_limit)]
  if not train:
    raise ValueError(f"data.train={data.train!r}: no {kind} records")
  log.info("%s: %d train / %d eval records from %s", kind, len(train), len(held), data.train)
  return train, held, {"kind": kind, "train": len(train), "eval": len(held), "sources": reports}


def ptx_rows(spec: str, tok, seq_len: int, workdir: str, val_fraction: float = 0.05, limit: int = 0):
  """Pretraining rows for PPO-ptx and the alignment-tax metric: (train int32 [N,T+1], val [M,T+1]).

  spec: a pretraining stage workdir (its corpus and tokenizer, which must equal the policy's),
  a plain-text file (documents split at blank lines), or a JSONL file of {"text"} lines.
  """
  if stages.is_stage_dir(spec):
    info = stages.read_stage(spec)
    if info["stage"] != "pretrain" or "data" not in info:
      raise ValueError(f"ptx_from={spec!r} is a {info['stage']!r} stage; expected a pretraining workdir or a text file")
    data_cfg = mlc.ConfigDict(info["data"])
    ptx_tok, train, val = lm_data.prepare_lm_data(data_cfg, seq_len if seq_len else data_cfg.seq_len, spec)
    tok_lib.check_compatible(tok, ptx_tok, "the policy", spec)
    return train, val
  if not os.path.isfile(spec):
    raise ValueError(f"ptx_from={spec!r}: not a pretraining workdir or a text/JSONL file")
  if spec.endswith((".jsonl", ".jsonl.gz", ".json")):
    tr, ev, _ = sources.load(spec, "text", eval_fraction=val_fraction, limit=limit, cache_dir=os.path.join(workdir, "data"))
    docs_train, docs_val = [r["text"] for r in tr], [r["text"] for r in ev]
  else:
    docs = lm_data.load_documents(mlc.ConfigDict({"source": "text", "path": spec}))
    docs_train, docs_val = lm_data.split_documents(docs, val_fraction)
    if limit:
      docs_train = docs_train[:limit]
  train = pipeline.pack_documents([tok.encode(d) for d in docs_train], seq_len, tok.eos_id)
  val = pipeline.pack_documents([tok.encode(d) for d in docs_val], seq_len, tok.eos_id)
  if not len(train) or not len(val):
    raise ValueError(f"ptx_from={spec!r}: too little text for rows of {seq_len + 1} tokens "
                     f"({len(train)} train / {len(val)} validation rows)")
  return np.asarray(train), np.asarray(val)
