"""The starting point of GPT-1 fine-tuning: a pretrained trunk whose vocabulary has the task tokens.

Two ways (`load_or_pretrain`):
  * `init_from` = a pretraining workdir (e.g. `experiments/pretrain_tiny.py`'s): its tokenizer
    gets the three task tokens appended (`transforms.add_task_tokens`) and, where they land past
    the model's vocabulary, `wte` grows by fresh N(0, init_std) rows (`heads.grow_vocab`) — the
    paper's "randomly initialised" special embeddings.
  * no `init_from`: pretrain a tiny GPT here on the synthetic world's corpus, with a BPE trained
    with the task tokens in its special list (`transforms.train_task_bpe`: base specials keep
    ids 0-4, task tokens get 5-7 and never occur in pretraining, so they too start untrained).
    The run is cached in `<cache_root>/<digest of its settings>`, so every fine-tuning run and
    sweep point with the same settings shares one pretraining (it is finished when `stage.json`
    exists; an interrupted one resumes from its checkpoint).
"""
from __future__ import annotations

import json
import logging
import os

import ml_collections as mlc

from rlhf_jax.data import lm_data, pipeline
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.data.builders.common import config_digest
from rlhf_jax.gpt1 import heads, transforms
from rlhf_jax.model import gpt
from rlhf_jax.train import stages, supervised
from rlhf_jax.train.checkpoint import load_params


def from_workdir(init_from: str, rng):
  """(GPTConfig, tokenizer with task tokens, params) from a pretraining (or SFT) workdir."""
  _, cfg, tok, params = stages.load_stage(init_from, expect=("pretrain", "sft"))
  tok = transforms.add_task_tokens(tok)
  if tok.vocab_size > cfg.vocab_size:
    params = heads.grow_vocab(params, tok.vocab_size, rng, cfg.init_std)
    cfg = cfg.__class__(**{**cfg.__dict__, "vocab_size": tok.vocab_size})
  return cfg, tok, params


def pretrain_dir(pcfg, model_section) -> str:
  """Cache directory of an inline pretraining: `<cache_root>/<digest of settings>`."""
  settings = {k: v for k, v in pcfg.to_dict().items() if k != "cache_root"}
  return os.path.join(pcfg.cache_root, config_digest({"pretrain": settings, "model": model_section.to_dict()}))


def pretrain(pcfg, model_section, mesh_section) -> tuple:
  """Pretrains (or reloads) a tiny GPT on the synthetic corpus; returns (GPTConfig, tok, params).

  pcfg: cache_root, n_docs, data_seed, val_fraction, vocab_size, seq_len, steps, batch_size, lr,
  warmup_steps, seed. model_section: rcfg.model section (its vocab_size is set to the tokenizer's).
  """
  workdir = pretrain_dir(pcfg, model_section)
  if os.path.exists(os.path.join(workdir, "stage.json")):
    logging.info("gpt1: reusing the pretrained trunk in %s", workdir)
    _, cfg, tok, params = stages.load_stage(workdir, expect="pretrain")
    return cfg, tok, params
  docs = lm_data.load_documents(mlc.ConfigDict({"source": "synthetic", "n_docs": pcfg.n_docs, "seed": pcfg.data_seed}))
  train_docs, val_docs = lm_data.split_documents(docs, float(pcfg.val_fraction))
  # A resumed run reloads its tokenizer (same ids as its checkpoint); a new one has the task specials.
  tok = lm_data.tokenizer_for(workdir, train_docs, pcfg.vocab_size,
                              special_tokens=tok_lib.SPECIAL_TOKENS + transforms.TASK_TOKENS)
  cfg = gpt.GPTConfig.from_dict({**model_section.to_dict(), "vocab_size": tok.vocab_size})
  rows = pipeline.pack_documents([tok.encode(d) for d in train_docs], int(pcfg.seq_len), tok.eos_id)
  val = pipeline.pack_documents([tok.encode(d) for d in val_docs], int(pcfg.seq_len), tok.eos_id)
  fit_cfg = mlc.ConfigDict({
      "seed": int(pcfg.seed), "batch_size": int(pcfg.batch_size), "mesh": mesh_section.to_dict(),
      "optim": dict(lr=float(pcfg.lr), total_steps=int(pcfg.steps), warmup_steps=int(pcfg.warmup_steps),
                    schedule="cosine", weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8,
                    end_lr_factor=0.0, microbatches=1),
      "loop": dict(num_steps=int(pcfg.steps), log_every=max(1, int(pcfg.steps) // 5), eval_every=0,
                   ckpt_every=int(pcfg.steps), progress=False)})
  _, last, _ = supervised.fit_lm(fit_cfg, workdir, cfg, rows, val, eval_batches=8)
  # Reload from the checkpoint (fit donated its buffers) and only then mark the stage finished.
  params = load_params(os.path.join(workdir, "checkpoints"))
  result = {k: last.get(k) for k in ("loss", "eval/loss", "eval/accuracy")}
  stages.write_stage(workdir, "pretrain", cfg, gpt1_pretrain=pcfg.to_dict(), result=result)
  logging.info("gpt1: pretrained trunk in %s: %s", workdir, json.dumps(result))
  return cfg, tok, params


def load_or_pretrain(config, rng):
  """(GPTConfig, tokenizer with task tokens, params) for a fine-tuning config (see module doc)."""
  if config.init_from:
    return from_workdir(config.init_from, rng)
  return pretrain(config.pretrain, config.model, config.mesh)

