"""grain input pipelines: fixed-shape numpy batches with resumable iterator state.

All iterators are grain `DatasetIterator`s: `get_state()`/`set_state()` are
saved in every checkpoint by the training loop, so a resumed run continues with
the exact next batch. Each host reads a disjoint shard (`shard_index`,
`shard_count`, by default `jax.process_index()`/`jax.process_count()`), and the
per-host batch is the global batch divided by the number of hosts.
"""
from __future__ import annotations

from typing import Sequence

import grain
import jax
import numpy as np


def host_batch_size(global_batch_size: int, shard_count: int | None = None) -> int:
  shard_count = jax.process_count() if shard_count is None else shard_count
  if global_batch_size % shard_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of hosts "
                     f"{shard_count}")
  return global_batch_size // shard_count


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
  """Packs token documents into full rows for next-token prediction.

  Documents are joined into one stream, each followed by `eos_id`, and cut into
  rows of seq_len + 1 tokens (row[:-1] are inputs, row[1:] targets); the
  incomplete tail is dropped. Returns int32 [N, seq_len + 1].
  """
  stream = np.fromiter((t for d in docs for t in (*d, eos_id)), dtype=np.int32)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"corpus of {len(stream)} tokens is too short for one row of {seq_len + 1}")
  # Rows overlap by one token so every token in the stream is a target exactly once.
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def _lm_example(row):
  return {"tokens": row[:-1], "targets": row[1:], "mask": np.ones(row.shape[0] - 1, np.int32)}


def lm_batches(rows: np.ndarray, global_batch_size: int, seed: int, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch) batches of packed LM rows for this host.

  rows: int32 [N, T+1] from `pack_documents`. Yields dicts of int32 arrays
  {"tokens","targets","mask": [B_host, T]}. num_epochs=None repeats forever.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  bsz = host_batch_size(global_batch_size, shard_count)
  ds = grain.MapDataset.source(rows)[shard_index::shard_count]
  if len(ds) < bsz:
    raise ValueError(f"host shard has {len(ds)} rows, fewer than one batch of {bsz}")
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(_lm_example).batch(bsz, drop_remainder=True)
  return iter(ds.to_iter_dataset())


def lm_eval_batches(rows: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Deterministic, unshuffled held-out batches (incomplete tail dropped)."""
  n = (len(rows) // batch_size) * batch_size
  return [_lm_example_batch(rows[i:i + batch_size]) for i in range(0, n, batch_size)]


def _lm_example_batch(rows):
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones_like(rows[:, 1:])}
