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


FULL_LOGITS_BUDGET = 1 << 30   # bytes of float32 [B,T,V] logits above which the loss runs chunked
CHUNK_LOGITS_BUDGET = 1 << 28  # bytes of one chunk's [B,c,V] logits


def loss_chunk_size(batch: int, seq: int, vocab: int) -> int:
  """Positions per chunk of the fused unembedding + cross-entropy, 0 = full logits.

  Full logits while they fit FULL_LOGITS_BUDGET (1 GiB; one matmul is fastest, and on XLA:CPU the
  chunked path costs 2x the step for GPT-2 at 2 x 128 tokens); beyond it, the largest power-of-two
  chunk whose logits fit CHUNK_LOGITS_BUDGET (256 MiB). For Qwen's 152k vocabulary at 8 x 1024
  tokens the full logits would be 5 GB."""
  if batch * seq * vocab * 4 <= FULL_LOGITS_BUDGET:
    return 0
  c = 1
  while c * 2 <= seq and batch * c * 2 * vocab * 4 <= CHUNK_LOGITS_BUDGET:
    c *= 2
  return c


def model_lm_loss(params, model_cfg, tokens, targets, mask, attention_mask=None, rng=None, chunk_size=None):
  """Masked next-token loss of the GPT on tokens [B,T] (targets, mask [B,T]) -> (loss, metrics).

  When the [B,T,V] float32 logits would exceed FULL_LOGITS_BUDGET, the unembedding and the
  cross-entropy run fused over chunks of positions (`losses.lm.chunked_lm_loss`, rematerialised
  in the backward), so the full logits are never materialised (`loss_chunk_size`).
  chunk_size overrides the choice (0 = full logits).
  """
  cfg = gpt.GPTConfig.from_dict(model_cfg)
  hidden = gpt.hidden_states(params, cfg, tokens, attention_mask, dropout_rng=rng)
  if chunk_size is None:
    chunk_size = loss_chunk_size(tokens.shape[0], tokens.shape[1], cfg.vocab_size)
  if chunk_size:
    table = gpt.unembedding_table(params, cfg).astype(cfg.compute_dtype)
    return chunked_lm_loss(hidden, table, targets, mask, int(chunk_size))
  return lm_loss(gpt.unembed(params, cfg, hidden), targets, mask)


def lm_loss_fn(model_cfg, chunk_size=None):
  """Next-token loss on batch {"tokens","targets","mask": [B,T]} (mask selects the trained tokens);
  chunk_size: see `model_lm_loss` (None = chunked cross-entropy when the logits are large)."""
  def loss_fn(params, batch, rng):
    return model_lm_loss(params, model_cfg, batch["tokens"], batch["targets"], batch["mask"],
                         batch.get("attention_mask"), rng, chunk_size)
  return loss_fn


def kwise_rm_loss_fn(model_cfg, image_prefix=None):
  """InstructGPT's RM loss on batch {"tokens","attention_mask": [B,K,T], "ranks","reward_index": [B,K], "valid"}.

  All K responses of a prompt are one batch element: K forward passes per prompt (reshaped
  to [B*K, T]), and the loss covers all C(K,2) pairs among them.
  image_prefix: image prompts (issue 15): image_prefix(batch["images"] float32 [B,H,W,C]) -> [B,P,D]
  image tokens from a frozen encoder (e.g. `vlm.image_tokens` closed over the SFT stage's ViT and
  projector), computed once per prompt and read before each of its K rows.
  """
  from rlhf_jax.losses.ranking import kwise_ranking_loss
  from rlhf_jax.model import heads

  def loss_fn(params, batch, rng):
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape((b * k,) + x.shape[2:])
    prefix = None
    if image_prefix is not None:
      p = jax.lax.stop_gradient(image_prefix(batch["images"]))
      prefix = jnp.repeat(p, k, axis=0)   # row b*K + j reads prompt b's image
    r = heads.rewards(params, model_cfg, flat(batch["tokens"]), flat(batch["attention_mask"]),
                      flat(batch["reward_index"]), dropout_rng=rng, prefix_embeds=prefix).reshape(b, k)
    return kwise_ranking_loss(r, batch["ranks"], batch["valid"])
  return loss_fn


def vlm_loss_fn(vlm_cfg, frozen=None):
  """Response-only next-token loss of `vlm.logits` on batch {"images": float32 [B,H,W,C] in [0, 1],
  "tokens","targets","mask","attention_mask": int32 [B,T]} (text left-padded after the image
  prefix; mask selects the trained tokens, as in `lm_loss_fn`) -> (loss, metrics of `lm_loss`).

  frozen: optional subtrees of the VLM params held fixed (e.g. {"vit": ..., "gpt": ...} to train
  only the projector): `params` then holds the trained subtrees only and the model is
  {**frozen, **params}; the frozen arrays are constants of the trace, so they get no gradients,
  no optimizer state and no weight decay (bit-identical after training).
  """
  from rlhf_jax.model import vlm
  frozen = jax.tree.map(jnp.asarray, dict(frozen or {}))   # host numpy cannot be indexed by a tracer

  def loss_fn(params, batch, rng):
    overlap = sorted(set(frozen) & set(params))
    if overlap:
      raise ValueError(f"rlhf_jax/train/steps.py:vlm_loss_fn: {overlap} are both trained and frozen")
    full = {**frozen, **params}
    logits = vlm.logits(full, vlm_cfg, batch["images"], batch["tokens"], batch.get("attention_mask"),
                        dropout_rng=rng)
    return lm_loss(logits, batch["targets"], batch["mask"])
  return loss_fn
