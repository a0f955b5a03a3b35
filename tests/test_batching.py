"""rlhf_jax/data/batching.py: the one pad-to-fixed-batch."""
import numpy as np
import pytest

from rlhf_jax.data import batching


def test_arrays_padded_with_first_row_of_the_batch():
  rows = [np.full(3, i, np.int32) for i in range(5)]
  padded = batching.pad_to_batches(rows, 2)
  assert padded.n_real == 5 and len(padded.batches) == 3
  assert all(b.shape == (2, 3) and b.dtype == np.int32 for b in padded.batches)
  np.testing.assert_array_equal(padded.batches[2], [[4, 4, 4], [4, 4, 4]])
  np.testing.assert_array_equal(padded.valid, [[True, True], [True, True], [True, False]])
  np.testing.assert_array_equal(padded.unpad([b[:, 0] * 10 for b in padded.batches]), [0, 10, 20, 30, 40])


def test_a_2d_array_is_a_sequence_of_rows():
  rows = np.arange(12).reshape(4, 3)
  padded = batching.pad_to_batches(rows, 3)
  np.testing.assert_array_equal(padded.batches[1], [rows[3], rows[3], rows[3]])


def test_dicts_and_tuples_keep_their_structure_and_key_order():
  dicts = [{"b": np.int32(i), "a": np.zeros(2) + i} for i in range(3)]
  padded = batching.pad_to_batches(dicts, 2)
  assert list(padded.batches[0]) == ["b", "a"]
  assert padded.batches[0]["b"].dtype == np.int32 and padded.batches[0]["a"].shape == (2, 2)
  tuples = [(np.full(2, i), np.int32(-i)) for i in range(3)]
  padded = batching.pad_to_batches(tuples, 2)
  t, u = padded.batches[1]
  np.testing.assert_array_equal(t, [[2, 2], [2, 2]])
  out = padded.unpad([(x[:, 0], y) for x, y in padded.batches])
  assert isinstance(out, tuple)
  np.testing.assert_array_equal(out[0], [0, 1, 2])
  np.testing.assert_array_equal(out[1], [0, -1, -2])
  out = padded.unpad([{"s": x.sum(1)} for x, _ in padded.batches])
  np.testing.assert_array_equal(out["s"], [0, 2, 4])


def test_num_rows_and_filler_give_whole_batches_of_filler():
  rows = [{"x": np.ones(2), "w": np.float32(1)}]
  filler = {"x": np.zeros(2), "w": np.float32(0)}
  padded = batching.pad_to_batches(rows, 2, num_rows=3, filler=filler)
  assert len(padded.batches) == 2 and padded.n_real == 1
  np.testing.assert_array_equal(np.concatenate([b["w"] for b in padded.batches]), [1, 0, 0, 0])
  np.testing.assert_array_equal(padded.valid.ravel(), [True, False, False, False])
  # a host with no examples of its own still gets its share of (filler) batches
  padded = batching.pad_to_batches([], 2, num_rows=3, filler=filler)
  assert len(padded.batches) == 2 and padded.n_real == 0 and not padded.valid.any()


def test_exact_multiple_empty_and_bad_input():
  assert len(batching.pad_to_batches([np.zeros(1)] * 4, 2).batches) == 2
  padded = batching.pad_to_batches([], 4)
  assert padded.batches == [] and padded.n_real == 0 and padded.valid.shape == (0, 4)
  with pytest.raises(ValueError, match="batch_size"):
    batching.pad_to_batches([np.zeros(1)], 0)
  with pytest.raises(ValueError, match="filler"):
    batching.pad_to_batches([], 2, num_rows=1)
