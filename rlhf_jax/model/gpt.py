"""Decoder-only GPT as pure functions over a parameter pytree.

The layers are Flax NNX modules (`layers.py`); this file turns them into pure
functions: `init` returns a nested dict of float32 arrays, and every apply
function merges that dict back into the modules inside the trace. Blocks are
stacked on a leading layer axis and run with `lax.scan`.

Params layout:
  {"wte": [V,D], "wpe": [P,D], "ln_f": {"scale","bias"} (pre-LN only),
   "blocks": {"ln1", "attn": {"qkv_kernel" [L,D,3,H,Dh], ...}, "ln2", "mlp": {...}}}

Public API:
  init(config, rng) -> params
  logits(params, config, tokens, attention_mask=None) -> float32 [B,T,V]
  hidden_states(...) -> [B,T,D] final (normalised) hidden states
  forward(...) -> (hidden, cache): the general entry, with KV cache and dropout
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.model.config import GPTConfig, preset  # noqa: F401  (re-exported)
from rlhf_jax.model.layers import Block, Embeddings, dropout, layer_norm

Params = dict[str, Any]


def _as_config(config) -> GPTConfig:
  return GPTConfig.from_dict(config)


@functools.lru_cache(maxsize=64)
def _graphdefs(cfg: GPTConfig):
  emb = nnx.eval_shape(lambda: Embeddings(cfg, nnx.Rngs(0)))
  blk = nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0)))
  return nnx.split(emb), nnx.split(blk)


def init(config, rng) -> Params:
  """Random GPT-2-style initialisation. rng: a jax PRNG key. Returns float32 params."""
  cfg = _as_config(config)
  k_emb, k_blk = jax.random.split(rng)
  params = nnx.to_pure_dict(nnx.split(Embeddings(cfg, nnx.Rngs(params=k_emb)))[1])
  make_block = lambda k: nnx.to_pure_dict(nnx.split(Block(cfg, nnx.Rngs(params=k)))[1])
  params["blocks"] = jax.vmap(make_block)(jax.random.split(k_blk, cfg.n_layer))
  return params


def param_axes(config) -> Params:
  """Logical axis names for every parameter: a dict mirroring `init`'s, with tuples as leaves."""
  cfg = _as_config(config)
  (_, emb_state), (_, blk_state) = _graphdefs(cfg)
  get = lambda v: tuple(v.get_metadata()["logical_axes"])
  is_var = lambda x: isinstance(x, nnx.Variable)
  axes = nnx.to_pure_dict(jax.tree.map(get, emb_state, is_leaf=is_var))
  blocks = nnx.to_pure_dict(jax.tree.map(get, blk_state, is_leaf=is_var))
  axes["blocks"] = jax.tree.map(lambda a: ("layers",) + a, blocks, is_leaf=lambda x: isinstance(x, tuple))
  return axes


def positions_from_mask(attention_mask):
  """[B,T] 0/1 mask -> [B,T] int32 positions counting real tokens (left padding starts at 0)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def check_tokens(tokens, config) -> None:
  """Host-side check for concrete token arrays (jit would silently clamp bad ids)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  t = np.asarray(tokens)
  if t.size and (t.max() >= config.vocab_size or t.min() < 0):
    bad = int(t.max()) if t.max() >= config.vocab_size else int(t.min())
    raise ValueError(f"token id {bad} is out of range for vocab_size={config.vocab_size}")


def _block_call(cfg, bp, x, mask, kv, cache_index, key):
  graphdef = _graphdefs(cfg)[1][0]
  return nnx.merge(graphdef, bp)(x, mask, kv, cache_index, key)


def forward(params: Params, config, tokens, attention_mask=None, positions=None, cache=None,
            cache_index=None, dropout_rng=None):
  """The general forward pass.

  tokens: int32 [B,T].
  attention_mask: without cache, [B,T] (1 = real, 0 = pad); with cache, [B,S] over cache slots
    (must already mark the T new slots as real).
  positions: int32 [B,T]; derived from the mask when None (no cache only).
  cache: {"k","v": [L,B,S,H,Dh]} from `init_cache`; tokens are written at slots
    [cache_index, cache_index+T) and attend to every real slot <= their own.
  dropout_rng: PRNG key to enable dropout (training); None = deterministic.
  Returns (hidden [B,T,D] in the compute dtype after the final LN, new cache or None).
  """
  cfg = _as_config(config)
  check_tokens(tokens, cfg)
  b, t = tokens.shape
  dt = cfg.compute_dtype
  if cache is None:
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & (attention_mask[:, None, :] > 0)
  else:
    if attention_mask is None or positions is None or cache_index is None:
      raise ValueError("forward with a cache needs attention_mask [B,S], positions [B,T] and cache_index")
    s = cache["k"].shape[2]
    q_slot = cache_index + jnp.arange(t)
    mask = (jnp.arange(s)[None, None, :] <= q_slot[None, :, None]) & (attention_mask[:, None, :] > 0)

  keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  x = (params["wte"].astype(dt)[tokens] + params["wpe"].astype(dt)[positions])
  x = parallel.constrain(dropout(x, cfg.dropout, keys[0]), ("batch", "length", "embed"))

  layer_keys = None if keys[1] is None else jax.random.split(keys[1], cfg.n_layer)

  def body(x, xs):
    bp, kv, key = xs
    x, kv = _block_call(cfg, bp, x, mask, kv, cache_index, key)
    return x, kv

  if cfg.remat != "none":
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
              else jax.checkpoint_policies.nothing_saveable)
    body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)

  kvs = None if cache is None else (cache["k"], cache["v"])
  if cfg.scan_layers:
    x, kvs = jax.lax.scan(body, x, (params["blocks"], kvs, layer_keys))
  else:
    outs = []
    for i in range(cfg.n_layer):
      sl = lambda a: None if a is None else jax.tree.map(lambda y: y[i], a)
      x, kv = body(x, (sl(params["blocks"]), sl(kvs), sl(layer_keys)))
      outs.append(kv)
    kvs = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

  if cfg.pre_ln:
    x = layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], cfg.ln_eps)
  new_cache = None if cache is None else {"k": kvs[0], "v": kvs[1]}
  return x, new_cache


def hidden_states(params: Params, config, tokens, attention_mask=None, dropout_rng=None):
  """Final hidden states [B,T,D] (compute dtype); used by scalar heads and chunked losses."""
  return forward(params, config, tokens, attention_mask, dropout_rng=dropout_rng)[0]


def unembed(params: Params, config, hidden):
  """hidden [...,D] -> float32 logits [...,V] with the tied token table."""
  cfg = _as_config(config)
  logits = jnp.einsum("...d,vd->...v", hidden, params["wte"].astype(cfg.compute_dtype),
                      preferred_element_type=jnp.float32)
  return parallel.constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits


def logits(params: Params, config, tokens, attention_mask=None, dropout_rng=None):
  """Next-token logits, float32 [B,T,V]. attention_mask [B,T]: 1 = real token, 0 = padding.

  Positions are derived from the mask, so a left-padded prompt gives the same
  logits at its real tokens as the unpadded prompt.
  """
  return unembed(params, config, hidden_states(params, config, tokens, attention_mask, dropout_rng))


def init_cache(config, batch_size: int, max_len: int, dtype=None):
  """Empty KV cache {"k","v": [L,B,S,H,Dh]} in the compute dtype (or `dtype`)."""
  cfg = _as_config(config)
  if max_len > cfg.max_len:
    raise ValueError(f"cache length {max_len} exceeds the model's context window {cfg.max_len}")
  shape = (cfg.n_layer, batch_size, max_len, cfg.n_head, cfg.d_head)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def num_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
