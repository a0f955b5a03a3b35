"""Pretraining text -> tokenizer -> packed train/validation rows.

Sources (config `data.source`):
  synthetic  the built-in world's misaligned web-text corpus (`synthetic.pretraining_corpus`;
             `data.fewshot_fraction`, default 0, mixes in multi-example documents of correct answers)
  text       a plain-text file (`data.path`), split into documents at blank lines
The tokenizer is trained on the training documents (or loaded from `data.tokenizer_dir`) and
saved in `<workdir>/tokenizer`; a resumed run and every later stage reload that copy, so
token ids never change under a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

from rlhf_jax.data import pipeline, synthetic
from rlhf_jax.data import tokenizer as tok_lib


def load_documents(data) -> list[str]:
  if data.source == "synthetic":
    # .get: stage.json files written before the key existed (and hand-built configs) lack it.
    return synthetic.pretraining_corpus(int(data.n_docs), seed=int(data.seed),
                                        fewshot_fraction=float(data.get("fewshot_fraction", 0.0)))
  if data.source == "text":
    if not data.get("path") or not os.path.exists(data.path):
      raise ValueError(f"data.path={data.get('path')!r}: text corpus file not found")
    with open(data.path, encoding="utf-8") as f:
      docs = [d.strip() for d in f.read().split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
      raise ValueError(f"{data.path}: no text found")
    return docs
  raise ValueError(f"data.source must be 'synthetic' or 'text', got {data.source!r}")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic split by a hash of each document, so train and validation never share one."""
  def is_val(d):
    return int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction
  train = [d for d in docs if not is_val(d)]
  val = [d for d in docs if is_val(d)]
  return train, val


def tokenizer_for(workdir: str, texts: Iterable[str], vocab_size: int | None = None, tokenizer_dir: str = "",
                  special_tokens: Sequence[str] = tok_lib.SPECIAL_TOKENS) -> tok_lib.Tokenizer:
  """The run's tokenizer: `<workdir>/tokenizer` if present (a resumed run keeps its token ids),
  else the one in `tokenizer_dir` if given, else a byte-level BPE of `vocab_size` trained on
  `texts` (only then consumed) with `special_tokens`; a new one is saved in `<workdir>/tokenizer`."""
  path = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return tok_lib.load(path)
  if tokenizer_dir:
    tok = tok_lib.load(tokenizer_dir)
  elif vocab_size is None:
    raise ValueError(f"rlhf_jax/data/lm_data.py: no tokenizer in {path} and no tokenizer_dir, so one is "
                     "trained, which needs a vocab_size")
  else:
    tok = tok_lib.train_bpe(texts, int(vocab_size), special_tokens=special_tokens)
  tok_lib.save(tok, path)
  return tok


def get_tokenizer(data, train_docs: list[str], workdir: str) -> tok_lib.Tokenizer:
  """`tokenizer_for` the `data` section (`tokenizer_dir`, else a BPE of `vocab_size` on train_docs)."""
  return tokenizer_for(workdir, train_docs, data.get("vocab_size"), data.get("tokenizer_dir") or "")


# (data section, seq_len, tokenizer file, corpus file) -> the prepared data. A pipeline reads its
# pretraining corpus in many stages (pretraining, every PPO-ptx / KL-sweep run, the evaluation), and
# building it (the corpus, then tokenising every document) took ~4 s each time.
_PREPARED: dict = {}


def _fingerprint(path: str) -> str:
  if not os.path.exists(path):
    return ""
  st = os.stat(path)
  return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _prepared_key(data, seq_len: int, workdir: str) -> str:
  fields = data.to_dict() if hasattr(data, "to_dict") else dict(data)
  corpus = _fingerprint(str(fields["path"])) if fields.get("source") == "text" and fields.get("path") else ""
  tokenizer = _fingerprint(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  return json.dumps([fields, int(seq_len), tokenizer, corpus], sort_keys=True, default=str)


def prepare_lm_data(data, seq_len: int, workdir: str):
  """Returns (tokenizer, train_rows int32 [N, seq_len+1], val_rows int32 [M, seq_len+1]).

  Memoised in the process on the data section, seq_len and the workdir's tokenizer file (and a text
  corpus's size and mtime); the returned arrays are read-only (they are shared between callers)."""
  key = _prepared_key(data, seq_len, workdir)
  if key in _PREPARED:
    return _PREPARED[key]
  out = _prepare_lm_data(data, seq_len, workdir)
  for a in out[1:]:
    a.setflags(write=False)
  while len(_PREPARED) >= 4:                    # a few corpora per process (each a few MB)
    _PREPARED.pop(next(iter(_PREPARED)))
  _PREPARED[_prepared_key(data, seq_len, workdir)] = out   # the key after a new tokenizer was saved
  return out


def _prepare_lm_data(data, seq_len: int, workdir: str):
  docs = load_documents(data)
  train_docs, val_docs = split_documents(docs, float(data.val_fraction))
  tok = get_tokenizer(data, train_docs, workdir)
  encode = lambda ds: [tok.encode(d) for d in ds]
  train_rows = pipeline.pack_documents(encode(train_docs), seq_len, tok.eos_id)
  val_rows = pipeline.pack_documents(encode(val_docs), seq_len, tok.eos_id)
  logging.info("LM data: %d train docs -> %d rows, %d val docs -> %d rows of %d tokens (vocab %d)",
               len(train_docs), len(train_rows), len(val_docs), len(val_rows), seq_len + 1, tok.vocab_size)
  return tok, np.asarray(train_rows), np.asarray(val_rows)
