"""Scalar heads on the GPT trunk: the reward model and the value function.

InstructGPT's reward model is the SFT model with the unembedding replaced by a
scalar head; the token table stays as the input embedding. The value function
starts from the reward model. Both are "scalar models" with params
  {"gpt": <gpt params without lm_head>, "head": {"kernel": [D], "bias": []}}
(an untied unembedding is dropped from the trunk: it is never used).
The reward is read at one token per sequence (the last real token, i.e. the
EOS that ends the response); values are read at every position.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.model import gpt


def init_head(d_model: int, rng) -> dict:
  """N(0, 1/sqrt(D+1)) kernel and zero bias (lm-human-preferences' reward head init)."""
  kernel = jax.random.normal(rng, (d_model,), jnp.float32) / math.sqrt(d_model + 1)
  return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def trunk(lm_params: dict) -> dict:
  """A language model's params without its untied unembedding (lm_head), if any."""
  return {k: v for k, v in lm_params.items() if k != "lm_head"}


def init(config, rng) -> dict:
  """A randomly initialised scalar model (trunk + head)."""
  cfg = gpt.GPTConfig.from_dict(config)
  k1, k2 = jax.random.split(rng)
  return {"gpt": trunk(gpt.init(cfg, k1)), "head": init_head(cfg.d_model, k2)}


def from_lm(lm_params: dict, config, rng, zero_head: bool = False) -> dict:
  """Scalar model from a language model's params (e.g. SFT): new head, same trunk."""
  cfg = gpt.GPTConfig.from_dict(config)
  head = init_head(cfg.d_model, rng)
  if zero_head:
    head = jax.tree.map(jnp.zeros_like, head)
  return {"gpt": trunk(lm_params), "head": head}


def param_axes(config) -> dict:
  return {"gpt": trunk(gpt.param_axes(config)), "head": {"kernel": ("embed",), "bias": ()}}


def last_token_index(attention_mask):
  """[B,T] 0/1 mask -> int32 [B] index of each row's last real token (works for left or right padding)."""
  t = attention_mask.shape[-1]
  rev_first = jnp.argmax(jnp.flip(attention_mask > 0, axis=-1), axis=-1)
  return (t - 1 - rev_first).astype(jnp.int32)


def apply_head(head: dict, hidden):
  """hidden [...,D] -> float32 [...]."""
  return (jnp.einsum("...d,d->...", hidden.astype(jnp.float32), head["kernel"].astype(jnp.float32))
          + head["bias"].astype(jnp.float32))


def rewards(params: dict, config, tokens, attention_mask, index=None, dropout_rng=None, prefix_embeds=None):
  """Scalar reward per sequence, float32 [B], read at `index` [B] (default: last real token).

  tokens, attention_mask: [B,T] (prompt + response, any padding side).
  transformers' *ForSequenceClassification instead reads the last token that is not
  pad_token_id; the two agree when the pads are exactly the masked positions (the pad
  id occurs nowhere in the real tokens), which is what `hf.save_reward_model` relies on.
  prefix_embeds: optional [B,P,D] read before the tokens (image tokens; `gpt.hidden_states`);
  index and attention_mask stay token-relative.
  """
  hidden = gpt.hidden_states(params["gpt"], config, tokens, attention_mask, dropout_rng, prefix_embeds)
  if index is None:
    index = last_token_index(attention_mask)
  picked = jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return apply_head(params["head"], picked)


def values(params: dict, config, tokens, attention_mask, dropout_rng=None, prefix_embeds=None):
  """Per-position scalar, float32 [B,T]: the value of the state after reading token t (after the
  optional prefix_embeds [B,P,D], as in `rewards`)."""
  hidden = gpt.hidden_states(params["gpt"], config, tokens, attention_mask, dropout_rng, prefix_embeds)
  return apply_head(params["head"], hidden)


def shift_bias(params: dict, offset) -> dict:
  """Adds `offset` to the head bias (InstructGPT: make the demonstrations score mean 0 before RL)."""
  head = {**params["head"], "bias": params["head"]["bias"] + jnp.asarray(offset, jnp.float32)}
  return {**params, "head": head}
