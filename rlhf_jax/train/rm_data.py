"""Real preference data for reward models (HH-RLHF pairs, OASST K-way rankings) and the shared glue.

Data: `load_comparisons` reads TFDS builder splits (`rlhf_jax.data.builders.load`) into a list of
comparison records {"id", "messages", "responses", "ranks"}; `split_by_prompt` makes a held-out
set by a hash of the prompt (never by record, so no prompt is in both sides); `get_tokenizer`
trains a byte-level BPE on the train side's text only. `length_baseline` is the "longer answer
wins" accuracy that any learned RM on this data has to beat to have learned more than length.

Glue for reward models trained from scratch (experiments/rm_hh_rlhf.py, rm_oasst_kwise.py): an
optional LM warm-up of the fresh GPT on the train dialogues (`lm_warmup`) and `fresh_rm_params`;
the RM itself is trained by the one RM path, `recipes.rm.fit_reward_model`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from rlhf_jax import config as rcfg
from rlhf_jax.data import builders, chat_format, lm_data, pipeline, records as rec_lib
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import loop, supervised

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLIT_BY = ("dialogue", "first_turn")


# --------------------------------------------------------------------------------------- data


def resolve_data_dir(path: str, key: str, expect: str) -> Path:
  """`path` (relative paths are taken from the repo root) as an existing directory.

  key: the config key that set it (named in the error); expect: what should be inside.
  """
  p = Path(os.path.expanduser(str(path)))
  p = p if p.is_absolute() else (REPO_ROOT / p)
  p = p.resolve()
  if not p.is_dir():
    raise ValueError(f"rm_data.py: {key}={str(path)!r}: data directory {p} not found; it should hold "
                     f"{expect} (the shared data sits in ../shared/data beside the repo, or pass "
                     f"--config.{key}=/path/to/it)")
  return p


def load_comparisons(names: Sequence[str], split: str, manual_dir: str | os.PathLike,
                     data_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Concatenated comparison records of `split` of each builder name (built once into data_dir).

  Records keep the builder's "id" (unique across names: HH ids carry the subset). Raises
  ValueError if two records share an id or a builder is not a comparison dataset.
  """
  out: list[dict] = []
  for name in names:
    src = builders.load(name, split, data_dir, manual_dir=manual_dir)
    for i in range(len(src)):
      r = src[i]
      if "responses" not in r:
        raise ValueError(f"rm_data.py: {name} is not a comparison dataset (record keys {sorted(r)})")
      out.append(r)
    skipped = {g: s.get("skipped") for g, s in src.stats.items()}
    logging.info("rm_data: %s[%s]: %d comparisons (builder skips: %s)", name, split, len(src), skipped)
  ids = [r["id"] for r in out]
  if len(set(ids)) != len(ids):
    raise ValueError(f"rm_data.py: duplicate record ids across {list(names)}")
  return out


def prompt_key(record: Mapping[str, Any], by: str = "dialogue") -> str:
  """The text that decides a record's side of the split.

  "dialogue": the whole prompt dialogue (`records.record_key`, shared with the builders' splits);
  "first_turn": only the opening user turn, stricter (continuations of one conversation with
  different later turns stay on the same side).
  """
  if by == "dialogue":
    return rec_lib.record_key(record)
  if by == "first_turn":
    first = next(m for m in record["messages"] if m["role"] == "user")
    return first["content"]
  raise ValueError(f"rm_data.py: split_by must be one of {SPLIT_BY}, got {by!r}")


def split_by_prompt(records: Sequence[Mapping], eval_fraction: float, salt: str = "",
                    by: str = "dialogue") -> tuple[list, list]:
  """(train, eval): a record is held out iff hash(salt, prompt_key) < eval_fraction.

  Deterministic (blake2b of the key, independent of order and machine); records with the same
  key always land on the same side, so no prompt is in both. Order within each side is kept.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"rm_data.py: data.eval_fraction must be in (0, 1), got {eval_fraction}")
  train, held = [], []
  for r in records:
    (held if rec_lib.hash_unit(prompt_key(r, by), salt) < eval_fraction else train).append(r)
  if not train or not held:
    raise ValueError(f"rm_data.py: split of {len(records)} records at eval_fraction={eval_fraction} left "
                     f"{len(train)} train / {len(held)} eval records")
  return train, held


def corpus_texts(records: Iterable[Mapping]) -> Iterable[str]:
  """Every prompt turn (each distinct dialogue once) and every response: the BPE training text."""
  seen = set()
  for r in records:
    key = rec_lib.record_key(r)
    if key not in seen:
      seen.add(key)
      yield from (m["content"] for m in r["messages"])
    yield from r["responses"]


def get_tokenizer(train_records: Sequence[Mapping], vocab_size: int, workdir: str) -> tok_lib.Tokenizer:
  """`<workdir>/tokenizer` if present (a resumed run keeps its ids), else a BPE trained on the
  train records' text only and saved there."""
  return lm_data.tokenizer_for(workdir, corpus_texts(train_records), vocab_size)


def dialogue_documents(tok: tok_lib.Tokenizer, records: Sequence[Mapping]) -> list[list[int]]:
  """One chat-format token document per (prompt, response) for LM warm-up; the closing EOS is
  left off because `pipeline.pack_documents` appends one between documents. Chats that fail
  validation (a literal special-token string in the text) are left out and counted in the log."""
  docs, bad = [], 0
  for r in records:
    for resp in r["responses"]:
      try:
        ids, _ = chat_format.encode_chat(tok, list(r["messages"]) + [{"role": "assistant", "content": resp}])
      except ValueError:
        bad += 1
        continue
      docs.append(ids[:-1])
  if bad:
    logging.warning("rm_data: %d dialogue documents left out (invalid chat text)", bad)
  return docs


def ordered_pairs(records: Iterable[Mapping], by: str = "dialogue") -> list[tuple[str, str, str]]:
  """(prompt key, better response, worse response) for every strictly ordered pair of every record."""
  out = []
  for r in records:
    key, resp, ranks = prompt_key(r, by), r["responses"], r["ranks"]
    for i in range(len(resp)):
      for j in range(len(resp)):
        if ranks[i] < ranks[j]:
          out.append((key, resp[i], resp[j]))
  return out


def length_baseline(records: Iterable[Mapping]) -> dict[str, float]:
  """Pairwise accuracy of "the longer response (in characters) is better"; equal lengths score 0.5."""
  scores = [1.0 if len(w) > len(l) else 0.5 if len(w) == len(l) else 0.0
            for _, w, l in ordered_pairs(records)]
  return {"accuracy": float(np.mean(scores)) if scores else float("nan"), "num_pairs": len(scores)}


def describe(records: Sequence[Mapping]) -> dict[str, Any]:
  """Counts: records, distinct prompts, responses, ordered pairs, and the K histogram."""
  ks = np.bincount([len(r["responses"]) for r in records])
  return {"records": len(records), "prompts": len({rec_lib.record_key(r) for r in records}),
          "responses": int(sum(len(r["responses"]) for r in records)),
          "pairs": len(ordered_pairs(records)), "k_hist": {str(k): int(n) for k, n in enumerate(ks) if n}}


# ------------------------------------------------------------------------- compute accounting

UNITS = ("real", "padded")


def equal_compute_plan(n_prompts: int, n_responses: int, n_pairs: int, kwise_epochs: float,
                       prompts_per_batch: int, pairs_per_batch: int, k_max: int, unit: str = "real"
                       ) -> dict[str, dict[str, float]]:
  """Steps for K-wise batching and for shuffled pairs at equal RM compute (one pass = one response
  sequence of max_len tokens through the trunk, forward + backward).

  K-wise runs `kwise_epochs` over the n_prompts train prompts: a prompt with K responses costs K
  passes and trains C(K,2) pairs; shuffled pairs cost 2 passes per pair. unit "real" equalises
  real response passes (the algorithmic cost: K-wise pays n_responses per epoch, pairs
  2 * n_pairs); "padded" equalises computed slots (K-wise pads every prompt to k_max slots, so
  this is what the accelerator or CPU actually spends, i.e. ~wall time at equal slots per step).
  Returns per mode: steps, batch_size, real_passes, padded_passes, pair_terms (pair losses
  evaluated), pair_epochs (pair_terms / n_pairs); K-wise numbers are expectations over batches.
  """
  if unit not in UNITS:
    raise ValueError(f"rm_data.py: compare.unit must be one of {UNITS}, got {unit!r}")
  if min(n_prompts, n_responses, n_pairs, prompts_per_batch, pairs_per_batch) < 1 or kwise_epochs <= 0:
    raise ValueError(f"rm_data.py: equal_compute_plan needs positive counts, got prompts={n_prompts} "
                     f"responses={n_responses} pairs={n_pairs} batches={prompts_per_batch}/{pairs_per_batch} "
                     f"epochs={kwise_epochs}")
  s_k = max(1, round(kwise_epochs * n_prompts / prompts_per_batch))
  seen = s_k * prompts_per_batch  # prompts processed
  kwise = {"steps": s_k, "batch_size": prompts_per_batch, "real_passes": seen * n_responses / n_prompts,
           "padded_passes": seen * k_max, "pair_terms": seen * n_pairs / n_prompts}
  budget = kwise["real_passes"] if unit == "real" else kwise["padded_passes"]
  s_p = max(1, round(budget / (2 * pairs_per_batch)))
  pairs = {"steps": s_p, "batch_size": pairs_per_batch, "real_passes": 2 * s_p * pairs_per_batch,
           "padded_passes": 2 * s_p * pairs_per_batch, "pair_terms": s_p * pairs_per_batch}
  for m in (kwise, pairs):
    m["pair_epochs"] = m["pair_terms"] / n_pairs
  return {"kwise": kwise, "pairs": pairs}


# --------------------------------------------------------------------------------------- glue


def model_config(section, tok: tok_lib.Tokenizer, max_len: int) -> gpt.GPTConfig:
  """The experiment's model section sized to the tokenizer and the sequence length."""
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  d.update(vocab_size=tok.vocab_size, max_len=int(max_len))
  return rcfg.model_config(d)


def _stage_config(config, batch_size: int, num_steps: int, optim) -> mlc.ConfigDict:
  """The sections `supervised.fit` reads, for a sub-stage with its own batch size and steps."""
  c = mlc.ConfigDict({"seed": int(config.seed), "batch_size": int(batch_size), "mesh": config.mesh.to_dict(),
                      "optim": optim.to_dict(), "loop": config.loop.to_dict()})
  c.loop.num_steps = int(num_steps)
  c.optim.total_steps = int(num_steps)
  return c


def lm_warmup(config, workdir: str, model_cfg: gpt.GPTConfig, tok: tok_lib.Tokenizer,
              train_records: Sequence[Mapping], eval_records: Sequence[Mapping]):
  """Next-token pretraining of a fresh GPT on the train dialogues (config.lm section).

  Returns (gpt params, result dict); (None, {}) when config.lm.num_steps <= 0. The eval split's
  dialogues give a held-out LM loss (no preference labels are involved in either side).
  """
  lm = config.lm
  if int(lm.num_steps) <= 0:
    return None, {}
  seq = int(lm.seq_len)
  if seq > model_cfg.max_len:
    raise ValueError(f"rm_data.py: lm.seq_len={seq} exceeds the model's max_len={model_cfg.max_len}")
  rows = pipeline.pack_documents(dialogue_documents(tok, train_records), seq, tok.eos_id)
  val = pipeline.pack_documents(dialogue_documents(tok, eval_records), seq, tok.eos_id)
  c = _stage_config(config, lm.batch_size, lm.num_steps, lm.optim)
  state, last, _ = supervised.fit_lm(c, os.path.join(workdir, "lm"), model_cfg, rows, val, name="lm",
                                     eval_batches=int(lm.eval_batches))
  return state["params"], {"lm_train_rows": len(rows), "lm_steps": int(lm.num_steps),
                           "lm_train_loss": last.get("loss"), "lm_eval_loss": last.get("eval/loss")}


def fresh_rm_params(model_cfg: gpt.GPTConfig, seed: int, lm_params=None) -> dict:
  """Scalar-model params: a warmed-up trunk (lm_params) with a new head, or a fresh model."""
  rng = jax.random.PRNGKey(int(seed) + 7)
  return heads.from_lm(lm_params, model_cfg, rng) if lm_params is not None else heads.init(model_cfg, rng)


def batch_pairs(batch: Mapping[str, np.ndarray]) -> int:
  """Number of strictly ordered valid pairs in a comparison batch (ranks int32 [B,K], valid bool [B,K])."""
  ranks, valid = np.asarray(batch["ranks"]), np.asarray(batch["valid"])
  both = valid[:, :, None] & valid[:, None, :]
  return int(np.sum(both & (ranks[:, :, None] < ranks[:, None, :])))


def steady_s_per_step(run_dir: str, name: str) -> float:
  """Median seconds per step over the logged intervals of `<run_dir>/metrics.jsonl` after the first
  (the first includes jit compilation); nan if nothing was logged."""
  sps = [h[f"{name}/steps_per_sec"] for h in loop.read_metrics(run_dir) if f"{name}/steps_per_sec" in h]
  return 1.0 / float(np.median(sps[1:] or sps)) if sps else float("nan")


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=str)
