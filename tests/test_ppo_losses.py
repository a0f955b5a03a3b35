"""Tests for rlhf_jax/losses/ppo.py: brute-force references, hand cases and masking invariants."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo
from rlhf_jax.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    adaptive_kl_update,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    per_token_kl,
    policy_loss,
    ppo_ptx_loss,
    sequence_kl,
    value_loss,
    whiten,
)

B, T = 5, 9


def _ragged_mask(seed=0):
  """Response runs with ragged starts (prompt prefix) and ends (padding), one empty row."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, T), np.float32)
  for b in range(B - 1):
    start = rng.integers(0, 3)
    end = rng.integers(start + 1, T + 1)
    mask[b, start:end] = 1.0
  mask[0, 2:] = 1.0  # one row running to the very end
  return mask  # last row stays empty


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda: rng.normal(size=(B, T)).astype(np.float32)
  return f, rng


def _gae_reference(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    last = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        last = 0.0
        continue
      next_v = values[b, t + 1] if t + 1 < rewards.shape[1] and mask[b, t + 1] else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


# ----------------------------------------------------------------------------- rewards / KL


def test_kl_penalized_rewards_score_at_last_real_token():
  f, rng = _arrays(1)
  mask = _ragged_mask(1)
  lp, ref = f(), f()
  scores = rng.normal(size=B).astype(np.float32)
  beta = 0.3
  rewards = np.asarray(kl_penalized_rewards(jnp.asarray(scores), lp, ref, mask, beta))
  expected = -beta * (lp - ref) * mask
  for b in range(B):
    idx = np.flatnonzero(mask[b])
    if idx.size:
      expected[b, idx[-1]] += scores[b]
  np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(rewards[mask == 0], 0.0)
  assert not mask[-1].any() and np.all(rewards[-1] == 0.0)  # empty row: no score anywhere
  # beta as a traced scalar under jit gives the same result.
  jitted = jax.jit(kl_penalized_rewards)(scores, lp, ref, mask, jnp.float32(beta))
  np.testing.assert_allclose(jitted, rewards, rtol=1e-6, atol=1e-7)


def test_per_token_and_sequence_kl():
  f, _ = _arrays(2)
  mask = _ragged_mask(2)
  lp, ref = f(), f()
  np.testing.assert_allclose(per_token_kl(lp, ref, mask), (lp - ref) * mask, rtol=1e-6)
  np.testing.assert_allclose(sequence_kl(lp, ref, mask), ((lp - ref) * mask).sum(1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GAE / whiten


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_reverse_python_loop(gamma, lam):
  f, _ = _arrays(3)
  mask = _ragged_mask(3)
  rewards, values = f(), f()
  adv, ret = gae(rewards, values, mask, gamma, lam)
  ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)
  np.testing.assert_array_equal(np.asarray(ret)[mask == 0], 0.0)
  # Traced gamma / lam under jit.
  jadv, jret = jax.jit(gae)(rewards, values, mask, jnp.float32(gamma), jnp.float32(lam))
  np.testing.assert_allclose(jadv, adv, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jret, ret, rtol=1e-6, atol=1e-6)


def test_gae_with_gamma_lam_one_gives_monte_carlo_returns():
  f, _ = _arrays(4)
  mask = _ragged_mask(4)
  rewards, values = f(), f()
  _, ret = gae(rewards, values, mask, 1.0, 1.0)
  # Returns-to-go over the response, independent of the values.
  mc = np.cumsum(((rewards * mask)[:, ::-1]), axis=1)[:, ::-1] * mask
  np.testing.assert_allclose(ret, mc, rtol=1e-5, atol=1e-5)


def test_whiten_masked_moments():
  f, _ = _arrays(5)
  mask = _ragged_mask(5)
  x = f() * 3.0 + 2.0
  w = np.asarray(whiten(x, mask))
  real = mask > 0
  np.testing.assert_allclose(w[real].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(w[real].std(), 1.0, rtol=1e-5)  # population std
  np.testing.assert_array_equal(w[~real], 0.0)
  ws = np.asarray(whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(ws[real].mean(), x[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(ws[real].std(), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(ws[~real], 0.0)
  chex.assert_trees_all_close(jax.jit(whiten, static_argnums=2)(x, mask, False), ws, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- losses


def test_policy_loss_ratio_one_is_negative_mean_advantage():
  f, _ = _arrays(6)
  mask = _ragged_mask(6)
  lp, adv = f(), f()
  loss, m = policy_loss(lp, lp, adv, mask, 0.2)
  np.testing.assert_allclose(loss, -(adv * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(m["clip_frac"]) == 0.0 and float(m["approx_kl"]) == 0.0 and float(m["approx_kl_k3"]) == 0.0
  np.testing.assert_allclose(m["ratio_mean"], 1.0)
  # Gradient at ratio 1 is -A / N on real tokens (policy-gradient direction).
  g = jax.jit(jax.grad(lambda l: policy_loss(l, lp, adv, mask, 0.2)[0]))(jnp.asarray(lp))
  np.testing.assert_allclose(g, -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)


def test_policy_loss_clipping_hand_cases():
  eps = 0.2
  ratio = np.array([[1.5, 1.5, 0.5, 0.5]], np.float32)
  adv = np.array([[1.0, -1.0, 1.0, -1.0]], np.float32)
  old = np.zeros_like(ratio)
  new = np.log(ratio)
  mask = np.ones_like(ratio)
  # Per token: max(-A r, -A clip(r)):
  #   A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped: no incentive to push further)
  #   A=-1, r=1.5 -> max( 1.5,  1.2) =  1.5 (unclipped: bad action made likelier is penalised fully)
  #   A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped)
  #   A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped)
  expected = np.array([-1.2, 1.5, -0.5, 0.8])
  f = lambda l: policy_loss(l, old, adv, mask, eps)
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(new))
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_frac"], 0.5)
  np.testing.assert_allclose(m["ratio_mean"], 1.0)
  lr = np.log(ratio.astype(np.float64))
  np.testing.assert_allclose(m["approx_kl"], np.mean(0.5 * lr**2), rtol=1e-5)
  np.testing.assert_allclose(m["approx_kl_k3"], np.mean((ratio - 1) - lr), rtol=1e-5)
  # Clipped tokens get zero gradient; unclipped get -A * ratio / N.
  np.testing.assert_allclose(g, [[0.0, 1.5 / 4, -0.5 / 4, 0.0]], rtol=1e-6, atol=1e-8)


def test_value_loss_clipping_hand_cases():
  eps = 0.2
  old = np.array([[0.0, 0.0, 1.0]], np.float32)
  ret = np.array([[1.0, 1.0, 1.0]], np.float32)
  v = np.array([[0.5, 0.1, 1.5]], np.float32)
  mask = np.ones_like(v)
  # token 0: unclipped (0.5-1)^2=0.25, clipped v->0.2: 0.64 -> 0.64 (clipped branch, no gradient)
  # token 1: |v-old| < eps, both 0.81 -> 0.81
  # token 2: unclipped 0.25, clipped v->1.2: 0.04 -> 0.25 (unclipped)
  f = lambda x: value_loss(x, old, ret, mask, eps)
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(v))
  np.testing.assert_allclose(loss, 0.5 * np.mean([0.64, 0.81, 0.25]), rtol=1e-6)
  np.testing.assert_allclose(m["value_clip_frac"], 1.0 / 3.0, rtol=1e-6)
  # d/dv 0.5*mean((v-R)^2) = (v-R)/N on unclipped tokens, 0 on the clipped one.
  np.testing.assert_allclose(g, [[0.0, -0.9 / 3, 0.5 / 3]], rtol=1e-5, atol=1e-7)


def test_explained_variance():
  f, _ = _arrays(7)
  mask = _ragged_mask(7)
  ret = f()
  _, m_perfect = value_loss(ret, ret, ret, mask, 0.2)
  np.testing.assert_allclose(m_perfect["explained_variance"], 1.0, rtol=1e-6)
  zeros = np.zeros_like(ret)
  _, m_zero = value_loss(zeros, zeros, ret, mask, 1e9)
  real = mask > 0
  r = ret[real].astype(np.float64)
  np.testing.assert_allclose(m_zero["explained_variance"], 1.0 - np.var(r) / np.var(r), atol=1e-6)
  v = f()
  _, m = value_loss(v, v, ret, mask, 0.2)
  expected = 1.0 - np.var(r - v[real]) / np.var(r)
  np.testing.assert_allclose(m["explained_variance"], expected, rtol=1e-5)
  _, m_const = value_loss(v, v, np.ones_like(ret), mask, 0.2)
  assert float(m_const["explained_variance"]) == 0.0  # Var(R) == 0: defined as 0, not NaN


def test_entropy_from_logits():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(B, T, 13)).astype(np.float32)
  mask = _ragged_mask(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(entropy_from_logits(logits, mask), (ent * mask).sum() / mask.sum(), rtol=1e-5)
  uniform = np.zeros((1, 2, 13), np.float32)
  np.testing.assert_allclose(entropy_from_logits(uniform, np.ones((1, 2))), np.log(13), rtol=1e-6)


def test_ppo_ptx_loss_combination_and_zero_coef():
  def total(params, ptx_coef):
    pl, vl, xl = params
    return ppo_ptx_loss(pl, vl, xl, 0.5, ptx_coef)[0]

  params = (jnp.float32(1.0), jnp.float32(2.0), jnp.float32(3.0))
  np.testing.assert_allclose(total(params, 0.25), 1.0 + 0.5 * 2.0 + 0.25 * 3.0)
  g = jax.grad(total)(params, 0.25)
  np.testing.assert_allclose([float(x) for x in g], [1.0, 0.5, 0.25])
  g0 = jax.grad(total)(params, 0.0)  # gamma = 0 is plain PPO: the ptx term drops out exactly
  assert float(g0[2]) == 0.0 and float(total(params, 0.0)) == 2.0
  _, m = ppo_ptx_loss(1.0, 2.0, 3.0, 0.5, 0.25)
  assert set(m) == {"total_loss", "policy_loss", "value_loss", "ptx_loss"}


# ----------------------------------------------------------------------------- masking invariants


def _corrupt(x, mask, fill):
  return np.where(mask > 0, x, fill).astype(np.float32)


@pytest.mark.parametrize("fill", [123.0, np.nan])
def test_padding_values_change_nothing_including_gradients(fill):
  f, rng = _arrays(9)
  mask = _ragged_mask(9)
  lp, old, adv, v, old_v, ret, ref = (f() for _ in range(7))
  scores = rng.normal(size=B).astype(np.float32)

  def everything(lp, old, adv, v, old_v, ret, ref):
    pl, pm = policy_loss(lp, old, adv, mask, 0.2)
    vl, vm = value_loss(v, old_v, ret, mask, 0.2)
    rw = kl_penalized_rewards(scores, lp, ref, mask, 0.1)
    a, r = gae(rw, v, mask, 0.99, 0.95)
    w = whiten(a, mask)
    return pl + vl + jnp.sum(w) + jnp.sum(r), (pm, vm, rw, a, r, w)

  clean = (lp, old, adv, v, old_v, ret, ref)
  dirty = tuple(_corrupt(x, mask, fill) for x in clean)
  grad_fn = jax.jit(jax.value_and_grad(everything, argnums=(0, 3), has_aux=True))
  (l1, aux1), g1 = grad_fn(*clean)
  (l2, aux2), g2 = grad_fn(*dirty)
  chex.assert_trees_all_equal((l1, aux1), (l2, aux2))
  chex.assert_trees_all_equal(g1, g2)
  for g in g2:
    np.testing.assert_array_equal(np.asarray(g)[mask == 0], 0.0)


def test_empty_mask_gives_zero_not_nan():
  f, _ = _arrays(10)
  zero = np.zeros((B, T), np.float32)
  x = f()
  loss, m = policy_loss(x, x * 0.5, x, zero, 0.2)
  vl, vm = value_loss(x, x, x, zero, 0.2)
  for val in [loss, vl, *m.values(), *vm.values(), *gae(x, x, zero, 0.9, 0.9), whiten(x, zero)]:
    assert np.all(np.asarray(val) == 0.0)


# ----------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_numbers():
  c = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
  # KL far above target: error clipped at +0.2.
  np.testing.assert_allclose(c.update(12.0, 256), 0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)
  # Within the clip range: error = 6.6/6 - 1 = 0.1 -> beta grows.
  b = c.value
  np.testing.assert_allclose(c.update(6.6, 512), b * (1 + 0.1 * 512 / 10000), rtol=1e-6)
  # Below target: error = 5.7/6 - 1 = -0.05 -> shrinks.
  b = c.value
  np.testing.assert_allclose(c.update(5.7, 1000), b * (1 - 0.05 * 1000 / 10000), rtol=1e-6)
  # Far below: clipped at -0.2.
  b = c.value
  np.testing.assert_allclose(c.update(0.0, 1000), b * (1 - 0.2 * 1000 / 10000), rtol=1e-6)
  b = c.value
  assert c.update(6.0, 1000) == pytest.approx(b, rel=1e-7)  # on target: unchanged


def test_adaptive_kl_update_jit_matches_class():
  c = AdaptiveKLController(0.05, 3.0, 2000)
  beta = jnp.float32(0.05)
  upd = jax.jit(adaptive_kl_update)
  for kl in (10.0, 2.5, 3.3, 0.1):
    c.update(kl, 64)
    beta = upd(beta, jnp.float32(kl), 64, 3.0, 2000.0)
  np.testing.assert_allclose(float(beta), c.value, rtol=1e-6)


def test_kl_controller_state_round_trip_and_errors():
  c = AdaptiveKLController(0.2, 6.0, 10000)
  c.update(20.0, 256)
  restored = AdaptiveKLController.from_state_dict(c.state_dict())
  assert restored.value == c.value and restored.target == c.target and restored.horizon == c.horizon
  assert restored.update(1.0, 128) == c.update(1.0, 128)
  fixed = FixedKLController(0.05)
  assert fixed.update(100.0, 1000) == 0.05
  assert FixedKLController.from_state_dict(fixed.state_dict()).value == 0.05
  with pytest.raises(ValueError, match=r"missing key\(s\) \['horizon'\]"):
    AdaptiveKLController.from_state_dict({"beta": 0.1, "target": 6.0})
  with pytest.raises(ValueError, match="not 'FixedKLController'"):
    FixedKLController.from_state_dict(c.state_dict())
  with pytest.raises(ValueError, match="current_kl must be finite"):
    c.update(float("nan"), 1)
  with pytest.raises(ValueError, match="target > 0"):
    AdaptiveKLController(0.1, 0.0, 100)


# ----------------------------------------------------------------------------- jit / errors


def test_all_losses_jit_identical():
  f, rng = _arrays(11)
  mask = _ragged_mask(11)
  a, b_, c = f(), f(), f()
  logits = rng.normal(size=(B, T, 7)).astype(np.float32)
  cases = [
      (policy_loss, (a, b_, c, mask, 0.2)),
      (value_loss, (a, b_, c, mask, 0.2)),
      (gae, (a, b_, mask, 0.99, 0.95)),
      (per_token_kl, (a, b_, mask)),
      (sequence_kl, (a, b_, mask)),
      (entropy_from_logits, (logits, mask)),
      (ppo_ptx_loss, (1.0, 2.0, 3.0, 0.5, 0.1)),
      (ppo.masked_mean, (a, mask)),
  ]
  for fn, args in cases:
    chex.assert_trees_all_close(jax.jit(fn)(*args), fn(*args), rtol=1e-6, atol=1e-7)


def test_bad_shapes_raise_clear_errors():
  x = np.zeros((B, T), np.float32)
  with pytest.raises(ValueError, match=r"ppo.py:policy_loss: mask shape"):
    policy_loss(x, x, x, x[:, :-1], 0.2)
  with pytest.raises(ValueError, match=r"ppo.py:kl_penalized_rewards: scores must be \[B\]"):
    kl_penalized_rewards(np.zeros((B, 1)), x, x, x, 0.1)
  with pytest.raises(ValueError, match=r"ppo.py:gae: rewards must be \[B,T\]"):
    gae(x[0], x[0], x[0], 0.9, 0.9)
  with pytest.raises(ValueError, match="must be a scalar"):
    ppo_ptx_loss(x, 1.0, 1.0, 0.5, 0.1)
