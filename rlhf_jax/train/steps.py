"""Generic train/eval steps built from a loss function (used by experiment files).

A loss function has the signature `loss_fn(params, batch, rng) -> (loss, metrics)`;
these helpers turn it into the pure `step(state, batch) -> (state, metrics)`
that the shared loop runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.lm import chunked_lm_loss, lm_loss
from rlhf_jax.model import gpt
from rlhf_jax.train.state import accumulate_gradients, apply_gradients


def make_train_step(loss_fn, optimizer, microbatches: int = 1):
  """(state, batch) -> (state, metrics): grads (optionally accumulated), AdamW update, grad norm."""
  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, metrics), grads = accumulate_gradients(loss_fn, state["params"], batch, microbatches, rng)
    new_state = apply_gradients(state, grads, optimizer)
    return new_state, {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}
  return step


def make_eval_step(loss_fn):
  """params, batch -> metrics (deterministic: rng None disables dropout)."""
  def step(params, batch):
    loss, metrics = loss_fn(params, batch, None)
    return {**metrics, "loss": loss}
  return step


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


CHUNKED_CE_MIN_VOCAB = 32768   # GPT-2's 50k, Llama 3's 128k and Qwen's 152k vocabularies are above
CHUNKED_CE_POSITIONS = 128


def model_lm_loss(params, model_cfg, tokens, targets, mask, attention_mask=None, rng=None, chunk_size=None):
  """Masked next-token loss of the GPT on tokens [B,T] (targets, mask [B,T]) -> (loss, metrics).

  For vocabularies >= CHUNKED_CE_MIN_VOCAB the unembedding and the cross-entropy run fused over
  chunks of CHUNKED_CE_POSITIONS positions (`losses.lm.chunked_lm_loss`, rematerialised in the
  backward), so the [B,T,V] float32 logits are never materialised: for Qwen's 152k vocabulary
  at B*T = 8k tokens that is 5 GB. chunk_size overrides the choice (0 = full logits).
  """
  cfg = gpt.GPTConfig.from_dict(model_cfg)
  hidden = gpt.hidden_states(params, cfg, tokens, attention_mask, dropout_rng=rng)
  if chunk_size is None:
    chunk_size = CHUNKED_CE_POSITIONS if cfg.vocab_size >= CHUNKED_CE_MIN_VOCAB else 0
  if chunk_size:
    table = gpt.unembedding_table(params, cfg).astype(cfg.compute_dtype)
    return chunked_lm_loss(hidden, table, targets, mask, int(chunk_size))
  return lm_loss(gpt.unembed(params, cfg, hidden), targets, mask)


def lm_loss_fn(model_cfg, chunk_size=None):
  """Next-token loss on batch {"tokens","targets","mask": [B,T]} (mask selects the trained tokens);
  chunk_size: see `model_lm_loss` (None = chunked cross-entropy for large vocabularies)."""
  def loss_fn(params, batch, rng):
    return model_lm_loss(params, model_cfg, batch["tokens"], batch["targets"], batch["mask"],
                         batch.get("attention_mask"), rng, chunk_size)
  return loss_fn


def kwise_rm_loss_fn(model_cfg):
  """InstructGPT's RM loss on batch {"tokens","attention_mask": [B,K,T], "ranks","reward_index": [B,K], "valid"}.

  All K responses of a prompt are one batch element: K forward passes per prompt (reshaped
  to [B*K, T]), and the loss covers all C(K,2) pairs among them.
  """
  from rlhf_jax.losses.ranking import kwise_ranking_loss
  from rlhf_jax.model import heads

  def loss_fn(params, batch, rng):
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape((b * k,) + x.shape[2:])
    r = heads.rewards(params, model_cfg, flat(batch["tokens"]), flat(batch["attention_mask"]),
                      flat(batch["reward_index"]), dropout_rng=rng).reshape(b, k)
    return kwise_ranking_loss(r, batch["ranks"], batch["valid"])
  return loss_fn
