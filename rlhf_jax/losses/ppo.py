"""PPO-ptx losses and helpers (Ziegler et al. 2019; Ouyang et al. 2022).

Everything numeric here is pure and jit-able and works on [B, T] arrays aligned
with a response mask: ``mask[b, t] == 1`` on response tokens (the tokens the
policy generated), 0 on prompt and padding. All reductions are masked means
over response tokens with the denominator guarded, so an all-zero mask gives 0,
never NaN, and padded positions contribute neither value nor gradient (inputs
are passed through ``jnp.where`` on the mask, so even NaN padding is inert).

The KL controllers at the bottom are small host-side Python objects: they run
between PPO iterations, not inside jit; ``adaptive_kl_update`` is the pure,
jit-able rule they use.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

Metrics = Dict[str, jax.Array]

_FILE = "rlhf_jax/losses/ppo.py"


# ----------------------------------------------------------------------------- helpers


def _check_same_shape(where: str, **arrays: jax.Array) -> None:
  shapes = {k: tuple(v.shape) for k, v in arrays.items()}
  first_key = next(iter(shapes))
  ref = shapes[first_key]
  if len(ref) != 2:
    raise ValueError(f"{_FILE}:{where}: {first_key} must be [B,T], got {ref}")
  for k, s in shapes.items():
    if s != ref:
      raise ValueError(f"{_FILE}:{where}: {k} shape {s} != {first_key} shape {ref}")


def _maskf(mask: jax.Array) -> jax.Array:
  return mask.astype(jnp.float32)


def _masked(x: jax.Array, maskf: jax.Array) -> jax.Array:
  """x as float32 with masked positions replaced by 0 (NaN-safe: a select, not a multiply)."""
  return jnp.where(maskf > 0, x.astype(jnp.float32), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over positions where mask is nonzero; 0 when the mask is empty.

  Args:
    x: float [...]; mask: same shape, bool or float (weights are used as given).
  Returns:
    float32 scalar.
  """
  m = _maskf(mask)
  total = jnp.sum(m)
  return jnp.sum(_masked(x, m) * m) / jnp.where(total > 0, total, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Population (biased, divide by N) variance of x over the mask; float32 scalar."""
  m = _maskf(mask)
  mean = masked_mean(x, m)
  return masked_mean(jnp.square(_masked(x, m) - mean), m)


# ----------------------------------------------------------------------------- rewards / KL


def per_token_kl(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-token KL estimate ``log pi(y_t) - log pi_ref(y_t)`` (the k1 estimator).

  Its expectation under samples from pi is KL(pi || pi_ref); single tokens can be negative.

  Args:
    logprobs, ref_logprobs: float [B, T] (log-prob of the sampled token).
    mask: [B, T], 1 on response tokens.
  Returns:
    float32 [B, T], 0 on masked positions.
  """
  _check_same_shape("per_token_kl", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
  m = _maskf(mask)
  return _masked(logprobs, m) - _masked(ref_logprobs, m)


def sequence_kl(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-sequence KL estimate: sum over response tokens of ``per_token_kl``; float32 [B]."""
  return jnp.sum(per_token_kl(logprobs, ref_logprobs, mask), axis=1)


def last_token_index(mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Index of the last position where mask is nonzero, per row.

  Args:
    mask: [B, T] bool or float.
  Returns:
    (idx int32 [B], has_any bool [B]); idx is 0 for rows with no real token.
  """
  m = _maskf(mask) > 0
  t = m.shape[1]
  last_from_end = jnp.argmax(m[:, ::-1], axis=1)  # first True scanning backwards
  has_any = jnp.any(m, axis=1)
  idx = jnp.where(has_any, t - 1 - last_from_end, 0).astype(jnp.int32)
  return idx, has_any


def kl_penalized_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    beta: jax.Array | float,
) -> jax.Array:
  """Per-token RLHF reward: ``-beta * KL_t`` on response tokens, plus the RM score at the end.

  Args:
    scores: float [B], reward-model score of each full response.
    logprobs, ref_logprobs: float [B, T], policy / reference log-prob of token t,
      aligned with mask.
    mask: [B, T], 1 on response tokens (a contiguous run per row, ragged lengths).
    beta: KL coefficient, Python float or traced scalar.
  Returns:
    float32 [B, T]; 0 off the mask; ``scores[b]`` added at the last index where
    ``mask[b] == 1`` (rows with an empty mask get no score).
  """
  _check_same_shape("kl_penalized_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
  if scores.shape != (logprobs.shape[0],):
    raise ValueError(f"{_FILE}:kl_penalized_rewards: scores must be [B]={logprobs.shape[0]}, got {scores.shape}")
  kl = per_token_kl(logprobs, ref_logprobs, mask)
  rewards = -jnp.asarray(beta, jnp.float32) * kl
  idx, has_any = last_token_index(mask)
  at_end = jax.nn.one_hot(idx, mask.shape[1], dtype=jnp.float32) * has_any[:, None]
  return rewards + at_end * scores.astype(jnp.float32)[:, None]


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: jax.Array | float,
    lam: jax.Array | float,
) -> Tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over response tokens.

  ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``,
  computed with a reverse-time ``lax.scan``. The value and advantage of any
  position with mask 0 count as 0, so the episode ends (bootstrap 0) after the
  last real token; a gap inside a row would also act as an episode end.

  Args:
    rewards, values: float [B, T]; mask: [B, T], 1 on response tokens.
    gamma, lam: Python floats or traced scalars.
  Returns:
    (advantages, returns), float32 [B, T]; returns = advantages + values;
    both 0 on masked positions. Neither carries gradient (stop_gradient),
    as they are regression/weighting targets.
  """
  _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
  m = _maskf(mask)
  r = jax.lax.stop_gradient(_masked(rewards, m))
  v = jax.lax.stop_gradient(_masked(values, m))
  gamma = jnp.asarray(gamma, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  # V_{t+1}, with 0 past the end of the sequence (and masked positions already 0).
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  deltas = (r + gamma * next_v - v) * m

  def step(next_adv, xs):
    delta_t, m_t = xs
    adv_t = (delta_t + gamma * lam * next_adv) * m_t
    return adv_t, adv_t

  _, adv_tm = jax.lax.scan(step, jnp.zeros(v.shape[0], jnp.float32), (deltas.T, m.T), reverse=True)
  advantages = adv_tm.T
  returns = (advantages + v) * m
  return advantages, returns


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """Normalise x to masked mean 0 / std 1 over real tokens.

  Uses the population (biased, divide-by-N) variance. With ``shift_mean=False``
  the original masked mean is added back (scale only), as is usual for rewards.

  Args:
    x: float [B, T]; mask: [B, T]; shift_mean: static bool; eps: added to the variance.
  Returns:
    float32 [B, T], 0 on masked positions.
  """
  _check_same_shape("whiten", x=x, mask=mask)
  m = _maskf(mask)
  mean = masked_mean(x, m)
  var = masked_var(x, m)
  out = (_masked(x, m) - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * m


# ----------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: jax.Array | float,
) -> Tuple[jax.Array, Metrics]:
  """PPO clipped surrogate, as a loss to minimise.

  ``ratio = exp(logprobs - old_logprobs)``; per token
  ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``, masked mean.
  Gradient flows only through ``logprobs`` (old log-probs and advantages are
  stop-gradiented).

  Args:
    logprobs: float [B, T], current policy log-prob of the sampled tokens.
    old_logprobs: float [B, T], behaviour-policy log-probs from the rollout.
    advantages: float [B, T]. mask: [B, T]. clip_eps: scalar.
  Returns:
    (loss, metrics): policy_loss; approx_kl (masked mean 0.5 * logratio^2, k2);
    approx_kl_k3 (masked mean (ratio - 1) - logratio); clip_frac (fraction of
    tokens where the clipped branch is active); ratio_mean. All float32 scalars.
  """
  _check_same_shape("policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
  m = _maskf(mask)
  adv = jax.lax.stop_gradient(_masked(advantages, m))
  logratio = _masked(logprobs, m) - jax.lax.stop_gradient(_masked(old_logprobs, m))
  ratio = jnp.exp(logratio)
  eps = jnp.asarray(clip_eps, jnp.float32)
  pg_unclipped = -adv * ratio
  pg_clipped = -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps)
  loss = masked_mean(jnp.maximum(pg_unclipped, pg_clipped), m)

  lr = jax.lax.stop_gradient(logratio)
  rt = jax.lax.stop_gradient(ratio)
  metrics = {
      "policy_loss": loss,
      "approx_kl": masked_mean(0.5 * jnp.square(lr), m),
      "approx_kl_k3": masked_mean((rt - 1.0) - lr, m),
      "clip_frac": masked_mean((jax.lax.stop_gradient(pg_clipped) > jax.lax.stop_gradient(pg_unclipped)), m),
      "ratio_mean": masked_mean(rt, m),
  }
  return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: jax.Array | float,
) -> Tuple[jax.Array, Metrics]:
  """Clipped value loss ``0.5 * mean(max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2))``.

  Args:
    values: float [B, T], current value predictions (gradient flows here).
    old_values: float [B, T], rollout-time values. returns: float [B, T], targets.
    mask: [B, T]. clip_eps: scalar.
  Returns:
    (loss, metrics): value_loss; value_clip_frac (fraction of tokens where the
    clipped branch is larger); explained_variance ``1 - Var(R - v) / Var(R)``
    (masked, population variances; 0 when Var(R) == 0). Float32 scalars.
  """
  _check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
  m = _maskf(mask)
  v = _masked(values, m)
  old = jax.lax.stop_gradient(_masked(old_values, m))
  ret = jax.lax.stop_gradient(_masked(returns, m))
  eps = jnp.asarray(clip_eps, jnp.float32)
  v_clipped = old + jnp.clip(v - old, -eps, eps)
  l_unclipped = jnp.square(v - ret)
  l_clipped = jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(l_unclipped, l_clipped), m)

  v_sg = jax.lax.stop_gradient(v)
  var_r = masked_var(ret, m)
  var_res = masked_var(ret - v_sg, m)
  explained = jnp.where(var_r > 0, 1.0 - var_res / jnp.where(var_r > 0, var_r, 1.0), 0.0)
  metrics = {
      "value_loss": loss,
      "value_clip_frac": masked_mean(jax.lax.stop_gradient(l_clipped > l_unclipped), m),
      "explained_variance": explained,
  }
  return loss, metrics


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean token entropy of the categorical distributions in ``logits``.

  Args:
    logits: float [B, T, V] (log-softmax in float32). mask: [B, T].
  Returns:
    float32 scalar, in nats.
  """
  if logits.ndim != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
    raise ValueError(
        f"{_FILE}:entropy_from_logits: need logits [B,T,V] and mask [B,T], got {logits.shape} and {mask.shape}"
    )
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return masked_mean(ent, mask)


def ppo_ptx_loss(
    policy_loss: jax.Array,
    value_loss: jax.Array,
    ptx_lm_loss: jax.Array,
    vf_coef: jax.Array | float,
    ptx_coef: jax.Array | float,
) -> Tuple[jax.Array, Metrics]:
  """InstructGPT PPO-ptx objective as a loss: ``policy + vf_coef * value + ptx_coef * ptx``.

  ``ptx_lm_loss`` is the mean token NLL on pretraining text, so adding
  ``gamma * NLL`` is the same as subtracting ``gamma * E_pretrain[log pi(x)]``
  (Ouyang et al. 2022, eq. 2). ``ptx_coef = 0`` is plain PPO. The terms are
  simply multiplied: a zero coefficient removes a finite term exactly, but a
  NaN/inf term still poisons the total (0 * NaN = NaN), so callers must not
  pass non-finite losses (skip computing the ptx batch when gamma is 0).

  Args:
    policy_loss, value_loss, ptx_lm_loss: float scalars. vf_coef, ptx_coef: scalars.
  Returns:
    (loss, metrics) with total_loss, policy_loss, value_loss, ptx_loss (float32 scalars).
  """
  pl = jnp.asarray(policy_loss, jnp.float32)
  vl = jnp.asarray(value_loss, jnp.float32)
  xl = jnp.asarray(ptx_lm_loss, jnp.float32)
  for name, arr in (("policy_loss", pl), ("value_loss", vl), ("ptx_lm_loss", xl)):
    if arr.ndim != 0:
      raise ValueError(f"{_FILE}:ppo_ptx_loss: {name} must be a scalar, got shape {arr.shape}")
  total = pl + jnp.asarray(vf_coef, jnp.float32) * vl + jnp.asarray(ptx_coef, jnp.float32) * xl
  metrics = {"total_loss": total, "policy_loss": pl, "value_loss": vl, "ptx_loss": xl}
  return total, metrics


# ----------------------------------------------------------------------------- KL controllers


def adaptive_kl_update(
    beta: jax.Array | float,
    current_kl: jax.Array | float,
    n_steps: jax.Array | int,
    target: jax.Array | float,
    horizon: jax.Array | float,
) -> jax.Array:
  """Ziegler et al. (2019) proportional KL-coefficient update; pure and jit-able.

  ``error = clip(current_kl / target - 1, -0.2, 0.2)``;
  ``beta_new = beta * (1 + error * n_steps / horizon)``. Returns float32 scalar.
  """
  beta = jnp.asarray(beta, jnp.float32)
  error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / jnp.asarray(target, jnp.float32) - 1.0, -0.2, 0.2)
  mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / jnp.asarray(horizon, jnp.float32)
  return beta * mult


def _require_keys(cls_name: str, state: Mapping[str, Any], keys) -> None:
  missing = [k for k in keys if k not in state]
  if missing:
    raise ValueError(f"{_FILE}:{cls_name}.from_state_dict: missing key(s) {missing} in {dict(state)!r}")
  if state.get("type") not in (None, cls_name):
    raise ValueError(f"{_FILE}:{cls_name}.from_state_dict: state is for {state.get('type')!r}, not {cls_name!r}")


def _finite_float(where: str, name: str, x) -> float:
  val = float(x)
  if val != val or val in (float("inf"), float("-inf")):
    raise ValueError(f"{_FILE}:{where}: {name} must be finite, got {val}")
  return val


class AdaptiveKLController:
  """Host-side adaptive KL coefficient (Ziegler et al. 2019); see ``adaptive_kl_update``.

  Args:
    init_beta: initial coefficient (>= 0). target: target KL per sequence (> 0).
    horizon: number of samples over which the error is corrected (> 0).
  """

  def __init__(self, init_beta: float, target: float, horizon: float):
    self.value = _finite_float("AdaptiveKLController", "init_beta", init_beta)
    self.target = _finite_float("AdaptiveKLController", "target", target)
    self.horizon = _finite_float("AdaptiveKLController", "horizon", horizon)
    if self.value < 0 or self.target <= 0 or self.horizon <= 0:
      raise ValueError(
          f"{_FILE}:AdaptiveKLController: need init_beta >= 0, target > 0, horizon > 0; "
          f"got {self.value}, {self.target}, {self.horizon}"
      )

  def update(self, current_kl: float, n_steps: int) -> float:
    """Apply one update from the observed mean sequence KL over ``n_steps`` samples; returns new beta."""
    kl = _finite_float("AdaptiveKLController.update", "current_kl", current_kl)
    self.value = float(adaptive_kl_update(self.value, kl, n_steps, self.target, self.horizon))
    return self.value

  def state_dict(self) -> Dict[str, Any]:
    return {"type": "AdaptiveKLController", "beta": self.value, "target": self.target, "horizon": self.horizon}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "AdaptiveKLController":
    _require_keys("AdaptiveKLController", state, ("beta", "target", "horizon"))
    return cls(state["beta"], state["target"], state["horizon"])


class FixedKLController:
  """Host-side constant KL coefficient with the same interface as ``AdaptiveKLController``."""

  def __init__(self, beta: float):
    self.value = _finite_float("FixedKLController", "beta", beta)
    if self.value < 0:
      raise ValueError(f"{_FILE}:FixedKLController: beta must be >= 0, got {self.value}")

  def update(self, current_kl: float, n_steps: int) -> float:
    """No-op (beta stays fixed); returns beta."""
    del current_kl, n_steps
    return self.value

  def state_dict(self) -> Dict[str, Any]:
    return {"type": "FixedKLController", "beta": self.value}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "FixedKLController":
    _require_keys("FixedKLController", state, ("beta",))
    return cls(state["beta"])
