"""Tests for rlhf_jax/losses/ranking.py against an explicit loop over all pairs."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.ranking import kwise_ranking_loss, pairwise_loss


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _reference(rewards, ranks, valid):
  """Brute force: per-prompt mean over ordered pairs, then mean over prompts with pairs."""
  per_prompt, all_pairs_correct, all_margins = [], [], []
  per_prompt_acc = []
  for r, rk, v in zip(rewards.astype(np.float64), ranks, valid):
    terms, correct = [], []
    for i in range(len(r)):
      for j in range(len(r)):
        if v[i] and v[j] and rk[i] < rk[j]:
          terms.append(-_np_log_sigmoid(r[i] - r[j]))
          correct.append(r[i] > r[j])
          all_margins.append(r[i] - r[j])
    if terms:
      per_prompt.append(np.mean(terms))
      per_prompt_acc.append(np.mean(correct))
      all_pairs_correct.extend(correct)
  if not per_prompt:
    return {"loss": 0.0, "accuracy": 0.0, "prompt_mean_accuracy": 0.0, "num_pairs": 0, "num_prompts": 0,
            "margin": 0.0}
  return {
      "loss": np.mean(per_prompt),
      "accuracy": np.mean(all_pairs_correct),
      "prompt_mean_accuracy": np.mean(per_prompt_acc),
      "num_pairs": len(all_pairs_correct),
      "num_prompts": len(per_prompt),
      "margin": np.mean(all_margins),
  }


def _random_batch(rng, b, k, ragged=True, ties=False):
  rewards = rng.normal(size=(b, k)).astype(np.float32) * 2.0
  if ties:
    ranks = rng.integers(0, max(k // 2, 2), size=(b, k)).astype(np.int32)
  else:
    ranks = np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)
  if ragged:
    n_valid = rng.integers(2, k + 1, size=b)
    valid = np.arange(k)[None, :] < n_valid[:, None]
  else:
    valid = np.ones((b, k), bool)
  return rewards, ranks, valid


_jit_loss = jax.jit(kwise_ranking_loss)  # one compile per shape; eager op-by-op is slower to test


def _run(rewards, ranks, valid):
  return _jit_loss(jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(valid))


@pytest.mark.parametrize("k", list(range(2, 10)))
def test_matches_bruteforce_all_pairs(k):
  rng = np.random.default_rng(k)
  for ragged in (False, True):
    rewards, ranks, valid = _random_batch(rng, 5, k, ragged=ragged)
    loss, metrics = _run(rewards, ranks, valid)
    ref = _reference(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    for key in ("accuracy", "prompt_mean_accuracy", "margin"):
      np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(metrics["num_pairs"]) == ref["num_pairs"]
    assert int(metrics["num_prompts"]) == ref["num_prompts"] == 5
    # Without ties the pair count per prompt is C(K_valid, 2) (InstructGPT's 1/C(K,2)).
    assert ref["num_pairs"] == sum(math.comb(int(n), 2) for n in valid.sum(1))
    vr = rewards[valid].astype(np.float64)
    np.testing.assert_allclose(metrics["reward_mean"], vr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_std"], vr.std(), rtol=1e-5)


def test_random_invalid_positions_not_just_suffix():
  rng = np.random.default_rng(0)
  rewards, ranks, _ = _random_batch(rng, 6, 7, ragged=False)
  valid = rng.random((6, 7)) < 0.6
  valid[:, :2] = True
  loss, metrics = _run(rewards, ranks, valid)
  ref = _reference(rewards, ranks, valid)
  np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
  assert int(metrics["num_pairs"]) == ref["num_pairs"]


def test_ties_form_no_pair():
  rewards = np.array([[1.0, -0.5, 0.3]], np.float32)
  ranks = np.array([[0, 0, 1]], np.int32)  # responses 0 and 1 are tied
  valid = np.ones((1, 3), bool)
  loss, metrics = _run(rewards, ranks, valid)
  assert int(metrics["num_pairs"]) == 2
  expected = -(_np_log_sigmoid(1.0 - 0.3) + _np_log_sigmoid(-0.5 - 0.3)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Random batches with many ties also match the brute force.
  rng = np.random.default_rng(1)
  for k in (3, 6, 9):
    rewards, ranks, valid = _random_batch(rng, 8, k, ties=True)
    loss, metrics = _run(rewards, ranks, valid)
    ref = _reference(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    assert int(metrics["num_prompts"]) == ref["num_prompts"]


def test_prompt_without_pairs_is_excluded_from_mean():
  rng = np.random.default_rng(2)
  rewards, ranks, valid = _random_batch(rng, 3, 4, ragged=False)
  loss_two, m_two = _run(rewards[:2], ranks[:2], valid[:2])
  valid_one = valid.copy()
  valid_one[2] = [True, False, False, False]  # a single valid response: no pair
  loss_one, m_one = _run(rewards, ranks, valid_one)
  np.testing.assert_allclose(loss_one, loss_two, rtol=1e-6)
  assert int(m_one["num_prompts"]) == 2
  all_tied = ranks.copy()
  all_tied[2] = 0  # every response tied: also no pair
  loss_tied, m_tied = _run(rewards, all_tied, valid)
  np.testing.assert_allclose(loss_tied, loss_two, rtol=1e-6)
  assert int(m_tied["num_prompts"]) == 2
  # No pairs at all: loss 0, not NaN.
  loss0, m0 = _run(rewards, np.zeros_like(ranks), valid)
  assert float(loss0) == 0.0 and float(m0["num_pairs"]) == 0.0


def test_gradient_direction_and_invalid_entries_get_exact_zero():
  rng = np.random.default_rng(3)
  rewards, ranks, valid = _random_batch(rng, 4, 6, ragged=True)
  valid[:, 4:] = False
  valid[:, :2] = True
  rewards[~valid] = np.nan  # garbage in padding slots must stay inert
  f = lambda r: kwise_ranking_loss(r, jnp.asarray(ranks), jnp.asarray(valid))[0]
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(rewards))
  g = np.asarray(g)
  assert np.isfinite(float(loss))
  np.testing.assert_array_equal(g[~valid], 0.0)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(valid[b])
    best = idx[np.argmin(ranks[b, idx])]
    worst = idx[np.argmax(ranks[b, idx])]
    assert g[b, best] < 0 and g[b, worst] > 0
  # Total gradient per prompt is zero (loss depends only on differences).
  np.testing.assert_allclose(g.sum(1), 0.0, atol=1e-6)


def test_invariant_to_per_prompt_constant_shift():
  rng = np.random.default_rng(4)
  rewards, ranks, valid = _random_batch(rng, 5, 7)
  shift = rng.normal(size=(5, 1)).astype(np.float32) * 10
  l1, m1 = _run(rewards, ranks, valid)
  l2, m2 = _run(rewards + shift, ranks, valid)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(m2["accuracy"], m1["accuracy"])
  np.testing.assert_allclose(m2["margin"], m1["margin"], rtol=1e-4)


def test_numerically_stable_for_large_margins():
  rewards = np.array([[-1e4, 1e4]], np.float32)  # badly wrong by a huge margin
  loss, metrics = _run(rewards, np.array([[0, 1]], np.int32), np.ones((1, 2), bool))
  np.testing.assert_allclose(loss, 2e4, rtol=1e-6)
  g = jax.jit(jax.grad(lambda r: kwise_ranking_loss(r, jnp.array([[0, 1]]), jnp.ones((1, 2), bool))[0]))(
      jnp.asarray(rewards)
  )
  np.testing.assert_allclose(g, [[-1.0, 1.0]], rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.0


def test_pairwise_loss_equals_mean_neg_log_sigmoid():
  rng = np.random.default_rng(5)
  chosen = rng.normal(size=8).astype(np.float32)
  rejected = rng.normal(size=8).astype(np.float32)
  loss, metrics = jax.jit(pairwise_loss)(jnp.asarray(chosen), jnp.asarray(rejected))
  np.testing.assert_allclose(loss, np.mean(-_np_log_sigmoid(chosen.astype(np.float64) - rejected)), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(chosen > rejected))
  assert int(metrics["num_pairs"]) == 8


def test_jit_identical():
  rng = np.random.default_rng(6)
  args = tuple(jnp.asarray(a) for a in _random_batch(rng, 4, 5))
  # XLA may fuse reductions differently under jit: equal up to float32 rounding.
  chex.assert_trees_all_close(jax.jit(kwise_ranking_loss)(*args), kwise_ranking_loss(*args), rtol=1e-6, atol=1e-7)
  c, r = jnp.asarray(rng.normal(size=4)), jnp.asarray(rng.normal(size=4))
  chex.assert_trees_all_close(jax.jit(pairwise_loss)(c, r), pairwise_loss(c, r), rtol=1e-6, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
  r = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="ranks shape"):
    kwise_ranking_loss(r, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match="valid must be bool"):
    kwise_ranking_loss(r, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="ranks must be integer"):
    kwise_ranking_loss(r, jnp.zeros((2, 3)), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match="pairwise_loss"):
    pairwise_loss(jnp.zeros(3), jnp.zeros(4))
