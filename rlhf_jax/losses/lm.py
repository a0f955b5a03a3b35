"""Masked next-token cross-entropy for language modelling (pretraining, SFT, PPO-ptx).

All functions are pure and jit-able. Log-softmax is always evaluated in float32,
whatever the dtype of the incoming logits (bf16 log-softmax loses ~3 significant
digits, which is visible in the loss curve). Reductions are masked means over
real tokens; a mask with no real tokens gives loss 0 rather than a 0/0 NaN.

Targets are assumed already aligned with the logits (``targets[:, t]`` is the
token that ``logits[:, t]`` should predict); shifting is the caller's job.
Positions where ``mask`` is 0 may hold any target id (e.g. -100 or a pad id)
and even non-finite logits: both are replaced by safe values with selects, so
they contribute exactly nothing to the loss and get exactly 0 gradient.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

Metrics = Dict[str, jax.Array]


def _check_lm_shapes(where: str, lead_shape, targets, mask) -> None:
  """Trace-time shape checks (static shapes, so they also run under jit)."""
  if len(lead_shape) != 2:
    raise ValueError(f"rlhf_jax/losses/lm.py:{where}: expected leading dims [B,T], got {tuple(lead_shape)}")
  if tuple(targets.shape) != tuple(lead_shape):
    raise ValueError(
        f"rlhf_jax/losses/lm.py:{where}: targets shape {tuple(targets.shape)} != [B,T]={tuple(lead_shape)}"
    )
  if mask is not None and tuple(mask.shape) != tuple(lead_shape):
    raise ValueError(
        f"rlhf_jax/losses/lm.py:{where}: mask shape {tuple(mask.shape)} != [B,T]={tuple(lead_shape)}"
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"rlhf_jax/losses/lm.py:{where}: targets must be an integer array, got {targets.dtype}")


def _finalize(nll_sum: jax.Array, correct_sum: jax.Array, num_tokens: jax.Array) -> Tuple[jax.Array, Metrics]:
  denom = jnp.maximum(num_tokens, 1.0)  # empty mask -> loss 0, not NaN
  loss = nll_sum / denom
  metrics = {
      "loss": loss,
      "accuracy": correct_sum / denom,
      "num_tokens": num_tokens,
      "perplexity": jnp.exp(jax.lax.stop_gradient(loss)),
  }
  return loss, metrics


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probability of each target token.

  Args:
    logits: float [B, T, V], any float dtype (upcast to float32).
    targets: int [B, T], values in [0, V). Out-of-range ids give NaN (JAX's
      gather fill value), so mask-aware callers should use ``lm_loss``.

  Returns:
    float32 [B, T]: ``log softmax(logits)[b, t, targets[b, t]]``.
  """
  _check_lm_shapes("token_logprobs", logits.shape[:-1], targets, None)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _masked_nll_and_correct(logits_f32: jax.Array, targets: jax.Array, maskf: jax.Array):
  """Sums of NLL and of correct argmax predictions over real tokens (float32 scalars)."""
  real = maskf > 0
  # Selects (not multiplies) so padding ids (e.g. -100) and non-finite padded
  # logits can reach neither the loss nor the gradient.
  safe_targets = jnp.where(real, targets, 0)
  logits_f32 = jnp.where(real[..., None], logits_f32, 0.0)
  logp = jax.nn.log_softmax(logits_f32, axis=-1)
  tok_logp = jnp.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]
  nll_sum = -jnp.sum(jnp.where(real, tok_logp, 0.0) * maskf)
  correct = (jnp.argmax(logits_f32, axis=-1) == targets).astype(jnp.float32)
  correct_sum = jnp.sum(jax.lax.stop_gradient(correct) * maskf)
  return nll_sum, correct_sum


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> Tuple[jax.Array, Metrics]:
  """Mean token cross-entropy over real tokens.

  Args:
    logits: float [B, T, V] (any float dtype; log-softmax is done in float32).
    targets: int [B, T].
    mask: [B, T] bool or float; 1/True marks tokens that count.

  Returns:
    (loss, metrics): loss is a float32 scalar,
    ``sum_t mask * -log p(target) / max(sum mask, 1)``. metrics (float32
    scalars): ``loss``, ``accuracy`` (argmax == target, masked mean),
    ``num_tokens`` (sum of mask), ``perplexity`` (exp(loss), no gradient).
  """
  _check_lm_shapes("lm_loss", logits.shape[:-1], targets, mask)
  maskf = mask.astype(jnp.float32)
  nll_sum, correct_sum = _masked_nll_and_correct(logits.astype(jnp.float32), targets, maskf)
  return _finalize(nll_sum, correct_sum, jnp.sum(maskf))


def chunked_lm_loss(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int,
) -> Tuple[jax.Array, Metrics]:
  """``lm_loss(hidden @ unembed.T, targets, mask)`` without the full [B,T,V] logits.

  The sequence axis is split into chunks of ``chunk_size`` positions and scanned;
  each chunk's logits ([B, chunk_size, V], float32) are formed, reduced to two
  scalars and discarded. The per-chunk function is wrapped in ``jax.checkpoint``
  so the backward pass recomputes each chunk's logits instead of saving them:
  peak logits memory is O(B * chunk_size * V) in both passes.

  Args:
    hidden: float [B, T, D], final hidden states (after the final norm).
    unembed: float [V, D], the unembedding (often the tied embedding table).
    targets: int [B, T].
    mask: [B, T] bool or float.
    chunk_size: static positive int; T need not be a multiple (the tail is
      padded with masked positions).

  Returns:
    (loss, metrics), same contract as ``lm_loss``. Logits are computed with
    float32 accumulation (``preferred_element_type=float32``).
  """
  if hidden.ndim != 3:
    raise ValueError(f"rlhf_jax/losses/lm.py:chunked_lm_loss: hidden must be [B,T,D], got {hidden.shape}")
  if unembed.ndim != 2 or unembed.shape[1] != hidden.shape[2]:
    raise ValueError(
        f"rlhf_jax/losses/lm.py:chunked_lm_loss: unembed must be [V,D] with D={hidden.shape[2]}, got {unembed.shape}"
    )
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"rlhf_jax/losses/lm.py:chunked_lm_loss: chunk_size must be a positive int, got {chunk_size!r}")
  _check_lm_shapes("chunked_lm_loss", hidden.shape[:2], targets, mask)

  b, t, d = hidden.shape
  c = min(chunk_size, t) if t > 0 else 1
  n_chunks = -(-t // c)
  pad = n_chunks * c - t
  maskf = mask.astype(jnp.float32)
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    maskf = jnp.pad(maskf, ((0, 0), (0, pad)))

  # [n_chunks, B, c, ...] so the scan walks the sequence axis.
  h_chunks = hidden.reshape(b, n_chunks, c, d).swapaxes(0, 1)
  t_chunks = targets.reshape(b, n_chunks, c).swapaxes(0, 1)
  m_chunks = maskf.reshape(b, n_chunks, c).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sums(w, h, tgt, m):
    logits = jnp.einsum("bcd,vd->bcv", h, w, preferred_element_type=jnp.float32)
    return _masked_nll_and_correct(logits, tgt, m)

  def body(carry, xs):
    nll_acc, cor_acc = carry
    h, tgt, m = xs
    nll, cor = chunk_sums(unembed, h, tgt, m)
    return (nll_acc + nll, cor_acc + cor), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, correct_sum), _ = jax.lax.scan(body, (zero, zero), (h_chunks, t_chunks, m_chunks))
  return _finalize(nll_sum, correct_sum, jnp.sum(maskf))
