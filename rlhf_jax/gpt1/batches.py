"""Task records -> fixed-shape numpy arrays -> train/eval batches for GPT-1 fine-tuning.

Every example of every task is N token sequences of length T (N = 1 for classification and
entailment, 2 for similarity, `max_options` for multiple choice), right padded:

  tokens, attention_mask: int32 [N, T]   (padding: pad id, mask 0)
  extract_index:          int32 [N]      position of each sequence's extract token
  option_mask:            bool  [N]      real sequences (multiple choice: real options)
  label:                  int32 []       class index, or index of the correct option
  weight:                 float32 []     1 for real examples, 0 for eval padding

Records are checked once, up front: a malformed record (missing key, blank text, bad label)
raises ValueError naming it; a multiple-choice record with more than `max_options` options is
skipped and counted; cuts to `max_len` are counted (`pipeline.PipelineStats`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import grain
import jax
import numpy as np

from rlhf_jax.data import batching, pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.gpt1 import transforms

KEYS = ("tokens", "attention_mask", "extract_index", "option_mask", "label", "weight")


def num_sequences(task: str, max_options: int) -> int:
  """N: sequences per example."""
  transforms.check_task(task)
  return {"similarity": 2, "multiple_choice": int(max_options)}.get(task, 1)


def _label(record: Mapping, n_choices: int, where: str) -> int:
  if "label" not in record:
    raise ValueError(f"gpt1: {where}: missing key 'label'")
  label = record["label"]
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < n_choices:
    raise ValueError(f"gpt1: {where}: key 'label': expected an integer in [0, {n_choices}), got {label!r}")
  return int(label)


def encode_records(task: str, records: Sequence[Mapping], tok: Tokenizer, max_len: int, *,
                   n_classes: int = 2, max_options: int = 4, name: str = "gpt1"
                   ) -> tuple[dict[str, np.ndarray], pipeline.PipelineStats]:
  """All records -> arrays with a leading example axis M (see module docstring), and stats."""
  n = num_sequences(task, max_options)
  stats = pipeline.PipelineStats(name)
  rows = []
  for i, rec in enumerate(records):
    where = f"record {i}" + (f" (id {rec['id']!r})" if isinstance(rec, Mapping) and rec.get("id") else "")
    stats.seen += 1
    if not isinstance(rec, Mapping):
      raise ValueError(f"gpt1: {where}: expected a dict record, got {type(rec).__name__}")
    if task == "multiple_choice" and len(rec.get("options") or ()) > n:
      stats.skipped["too_many_options"] += 1
      stats.first.setdefault("too_many_options", where)
      continue
    seqs, cut = transforms.layout(task, rec, tok, max_len, where)
    label = _label(rec, len(seqs) if task == "multiple_choice" else n_classes, where)
    if cut:
      stats.truncated["cut_to_max_len"] += 1
      stats.first.setdefault("cut_to_max_len", where)
    rows.append((seqs, label))
  stats.kept = stats.host_records = len(rows)
  m = len(rows)
  out = {"tokens": np.full((m, n, max_len), tok.pad_id, np.int32),
         "attention_mask": np.zeros((m, n, max_len), np.int32),
         "extract_index": np.zeros((m, n), np.int32), "option_mask": np.zeros((m, n), bool),
         "label": np.zeros((m,), np.int32), "weight": np.ones((m,), np.float32)}
  for j, (seqs, label) in enumerate(rows):
    for k, s in enumerate(seqs):
      out["tokens"][j, k, :len(s)] = s
      out["attention_mask"][j, k, :len(s)] = 1
      out["extract_index"][j, k] = len(s) - 1
      out["option_mask"][j, k] = True
    out["label"][j] = label
  stats.log()
  return out, stats


class _Take:
  """Picklable grain map: example index -> dict of that example's arrays."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)

  def __call__(self, index):
    return {k: v[int(index)] for k, v in self.arrays.items()}


def train_batches(arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch) batches of this host's examples; resumable (get/set_state)."""
  bsz = pipeline.host_batch_size(global_batch_size)
  idx = np.arange(len(arrays["label"]))[jax.process_index()::jax.process_count()]
  if len(idx) < bsz:
    raise ValueError(f"gpt1: {len(idx)} training examples on this host, fewer than one batch of {bsz}")
  ds = grain.MapDataset.source(idx).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(_Take(arrays)).batch(bsz, drop_remainder=True)
  return iter(ds.to_iter_dataset(pipeline.READ_OPTIONS))


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Unshuffled batches of this host's share; the tail is filled with weight-0 copies of example 0,
  and every host gets the same number of batches (hosts evaluate in lockstep)."""
  total = len(arrays["label"])
  if total == 0:
    return []
  pc = jax.process_count()
  examples = [{k: v[i] for k, v in arrays.items()} for i in range(jax.process_index(), total, pc)]
  filler = {k: v[0] for k, v in arrays.items()}
  filler["weight"] = np.zeros_like(filler["weight"])
  return batching.pad_to_batches(examples, batch_size, num_rows=-(-total // pc), filler=filler).batches
