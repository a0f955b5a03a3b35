"""Fixed-shape batches from a list of examples: the one pad-to-batch of the package.

Jitted functions compile once per shape, so every host-side caller (eval batches of the data
pipeline, GPT-1 eval, batched sampling and scoring) cuts its examples into batches of exactly
`batch_size` rows, and fills the tail with filler rows that the caller ignores (slices off its
outputs, or zeroes their weight). This module only arranges rows; it knows no model.

An example is an array, a tuple of arrays, or a dict of arrays (all examples alike in
structure and shapes); a batch is the same structure with a leading axis of `batch_size`.

  padded = pad_to_batches(rows, batch_size)
  outs = [fn(b) for b in padded.batches]
  result = padded.unpad(outs)        # the real rows' outputs, concatenated
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

_WHERE = "rlhf_jax/data/batching.py"


def stack(rows: Sequence[Any]) -> Any:
  """Equal-structured examples -> one batch, each field stacked on a new leading axis.

  A dict example gives a dict (in the first example's key order), a tuple a tuple; anything
  else (an array, a scalar, a list of numbers) is one field.
  """
  first = rows[0]
  if isinstance(first, Mapping):
    return {k: np.stack([r[k] for r in rows]) for k in first}
  if isinstance(first, tuple):
    return tuple(np.stack([r[i] for r in rows]) for i in range(len(first)))
  return np.stack(rows)


class Padded(NamedTuple):
  """Batches of `batch_size` rows; rows past the first `n_real` (all in the tail) are filler."""
  batches: list
  n_real: int
  batch_size: int

  @property
  def valid(self) -> np.ndarray:
    """bool [len(batches), batch_size]: True on real rows."""
    rows = np.arange(len(self.batches) * self.batch_size).reshape(len(self.batches), self.batch_size)
    return rows < self.n_real

  def unpad(self, outputs: Sequence[Any]) -> Any:
    """Per-batch outputs (arrays, or tuples / dicts of arrays, with a leading batch axis) ->
    the real rows' outputs, concatenated in order. `outputs` must be non-empty."""
    first = outputs[0]
    if isinstance(first, Mapping):
      return {k: self.unpad([o[k] for o in outputs]) for k in first}
    if isinstance(first, tuple):
      return tuple(self.unpad([o[i] for o in outputs]) for i in range(len(first)))
    return np.concatenate([np.asarray(o) for o in outputs])[:self.n_real]


def pad_to_batches(examples: Sequence[Any], batch_size: int, *, num_rows: int = 0,
                   filler: Any = None) -> Padded:
  """`examples` cut into batches of exactly `batch_size` rows, the tail filled with filler rows.

  The rows are padded to a multiple of batch_size that is at least max(len(examples), num_rows)
  (num_rows > len(examples) gives whole batches of filler, e.g. so every host runs as many eval
  batches as the others). Each filler row is `filler` if given, else a copy of the first real
  row of its batch (or of examples[0] in a batch with no real row). No examples and no
  num_rows: no batches.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"{_WHERE}: batch_size must be an integer >= 1, got {batch_size!r}")
  n = len(examples)
  rows = max(n, int(num_rows))
  if rows and filler is None and not n:
    raise ValueError(f"{_WHERE}: num_rows={num_rows} with no examples needs an explicit filler")
  batches = []
  for start in range(0, rows, batch_size):
    chunk = list(examples[start:start + batch_size])
    fill = filler if filler is not None else (chunk[0] if chunk else examples[0])
    batches.append(stack(chunk + [fill] * (batch_size - len(chunk))))
  return Padded(batches, n, int(batch_size))
