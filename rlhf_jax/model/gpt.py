"""Decoder-only transformer (GPT-2 and the Llama family) as pure functions over a parameter pytree.

The layers are Flax NNX modules (`layers.py`); this file turns them into pure
functions: `init` returns a nested dict of float32 arrays, and every apply
function merges that dict back into the modules inside the trace. Blocks are
stacked on a leading layer axis L and run with `lax.scan`.

Params layout (one layout for every family; D = d_model, H = n_head,
KV = kv heads, Dh = head_dim, F = d_ff, V = vocab, P = max_len; [?] = only
with the config option named; logical axis names in parentheses):
  wte        [V,D]        ("vocab","embed")
  wpe        [P,D]        (None,"embed")                 [position="learned"]
  ln_f       {"scale" [D], "bias" [D] (layernorm with bias)}  ("norm",)   [pre_ln]
  lm_head    [V,D]        ("vocab","embed")              [tie_embeddings=False]
  blocks:    every leaf has a leading [L] ("layers",)
    ln1, ln2   {"scale" [D], "bias" [D] (layernorm with bias)}
    attn:
      q_kernel   [D,H,Dh]     ("embed","heads","head_dim")
      kv_kernel  [D,2,KV,Dh]  ("embed",None,"kv_heads","head_dim")   (k | v)
      q_bias     [H,Dh], kv_bias [2,KV,Dh]                           [qkv_bias]
      out_kernel [H,Dh,D]     ("heads","head_dim","embed")
      out_bias   [D]                                                 [bias]
      q_norm, k_norm  {"scale" [Dh]}                                 [qk_norm]
    mlp:
      fc_kernel   [D,F] ("embed","mlp")   (= up_proj for swiglu)
      gate_kernel [D,F] ("embed","mlp")                              [mlp="swiglu"]
      proj_kernel [F,D] ("mlp","embed")
      fc_bias / gate_bias [F], proj_bias [D]                         [bias]
Query head h uses K/V head h // (H / KV). RoPE uses transformers' rotate_half
convention, so HF q/k weights need no permutation.

Public API:
  init(config, rng) -> params
  param_axes(config) -> logical axis names mirroring `init`
  logits(params, config, tokens, attention_mask=None) -> float32 [B,T,V]
  hidden_states(...) -> [B,T,D] final (normalised) hidden states
  forward(...) -> (hidden, cache): the general entry, with KV cache, dropout and an optional
    prefix of input embeddings (prefix_embeds [B,P,D]: the image tokens of `vlm.py`)
  unembed(params, config, hidden) -> float32 logits
  init_cache(config, batch_size, max_len) -> {"k","v": [L,B,KV,S,Dh]} (head-major)
  decode_params(params, config), unstack_cache(cache), stack_cache(cache): layouts for decode loops
  resize_vocab(params, config, new_vocab_size, new_ids) -> (config, params)
  upgrade_legacy_params(params) -> params (fused qkv_kernel checkpoints -> this layout)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.model.config import GPTConfig, preset  # noqa: F401  (re-exported)
from rlhf_jax.model.layers import Block, Embeddings, dropout, layer_norm, rms_norm, rope_tables

Params = dict[str, Any]


def _as_config(config) -> GPTConfig:
  return GPTConfig.from_dict(config)


@functools.lru_cache(maxsize=64)
def _graphdefs(cfg: GPTConfig):
  emb = nnx.eval_shape(lambda: Embeddings(cfg, nnx.Rngs(0)))
  blk = nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0)))
  return nnx.split(emb), nnx.split(blk)


def init(config, rng) -> Params:
  """Random GPT-2-style initialisation: N(0, init_std), residual projections scaled by 1/sqrt(2L),
  norms at scale 1 / bias 0. rng: a jax PRNG key. Returns float32 params in the layout above."""
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


def _block_call(cfg, bp, x, mask, rope, kv, cache_index, key):
  graphdef = _graphdefs(cfg)[1][0]
  return nnx.merge(graphdef, bp)(x, mask, rope, kv, cache_index, key)


def norm(p: Params, config, x):
  """The config's norm with params p ({"scale"} or {"scale","bias"}) over x [..., D]."""
  cfg = _as_config(config)
  if cfg.norm == "rmsnorm":
    return rms_norm(x, p["scale"], cfg.ln_eps)
  bias = p["bias"] if "bias" in p else jnp.zeros_like(p["scale"])
  return layer_norm(x, p["scale"], bias, cfg.ln_eps)


def embed(params: Params, config, tokens, positions, prefix_embeds=None):
  """tokens int [B,T], positions int [B,P+T] -> [B,P+T,D] input embeddings in the compute dtype (before
  dropout): [prefix_embeds [B,P,D] (optional; P = 0 without) | token embeddings], each plus its learned
  position embedding."""
  cfg = _as_config(config)
  dt = cfg.compute_dtype
  x = params["wte"].astype(dt)[tokens]
  if prefix_embeds is not None:
    x = jnp.concatenate([prefix_embeds.astype(dt), x], axis=1)
  if cfg.position == "learned":
    x = x + params["wpe"].astype(dt)[positions]
  return x


def forward(params: Params, config, tokens, attention_mask=None, positions=None, cache=None,
            cache_index=None, dropout_rng=None, prefix_embeds=None):
  """The general forward pass.

  tokens: int32 [B,T].
  prefix_embeds: optional [B,P,D] input embeddings (e.g. projected image patches, `vlm.py`) read
    before the tokens: the sequence is then T' = P + T long, [prefix | tokens], and
    attention_mask, positions, cache slots and the returned hidden count all T' positions. The
    prefix gets the position embedding (or RoPE) of its positions like a token; None = tokens only.
  attention_mask: without cache, [B,T] (1 = real, 0 = pad); with cache, [B,S] over cache slots
    (must already mark the T new slots as real).
  positions: int32 [B,T]; derived from the mask when None (no cache only).
  cache: {"k","v": [L,B,KV,S,Dh]} from `init_cache` (or per layer, `unstack_cache`); tokens are written at slots
    [cache_index, cache_index+T) and attend to every real slot <= their own.
  dropout_rng: PRNG key to enable dropout (training); None = deterministic.
  Positions index the learned table or rotate q/k (RoPE), in the cached path too.
  Returns (hidden [B,T,D] in the compute dtype after the final norm, new cache or None).
  """
  cfg = _as_config(config)
  check_tokens(tokens, cfg)
  b, t = tokens.shape
  if prefix_embeds is not None:
    if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != b or prefix_embeds.shape[2] != cfg.d_model:
      raise ValueError(f"rlhf_jax/model/gpt.py:forward: prefix_embeds {tuple(prefix_embeds.shape)} must be "
                       f"[B={b},P,D={cfg.d_model}]")
    t = t + prefix_embeds.shape[1]
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
    s = _cache_slots(cache)
    q_slot = cache_index + jnp.arange(t)
    mask = (jnp.arange(s)[None, None, :] <= q_slot[None, :, None]) & (attention_mask[:, None, :] > 0)

  keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  x = embed(params, cfg, tokens, positions, prefix_embeds)
  rope = rope_tables(cfg, positions) if cfg.position == "rope" else None
  x = parallel.constrain(dropout(x, cfg.dropout, keys[0]), ("batch", "length", "embed"))

  layer_keys = None if keys[1] is None else jax.random.split(keys[1], cfg.n_layer)

  # The KV cache is a carry of the layer loop: each block writes only its new K/V rows
  # (dynamic_update_slice) into the stacked [L,B,KV,S,Dh] arrays, or into its own [B,KV,S,Dh]
  # array when the cache is per layer (`unstack_cache`); layer None marks the latter.
  def body(carry, xs):
    x, kvs = carry
    bp, key, layer = xs
    kv = None if kvs is None else (*kvs, layer)
    x, kvs = _block_call(cfg, bp, x, mask, rope, kv, cache_index, key)
    return (x, kvs), None

  if cfg.resolved_remat() != "none":
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.resolved_remat() == "dots"
              else jax.checkpoint_policies.nothing_saveable)
    body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.resolved_scan_layers())

  blocks = params["blocks"]
  split_blocks = isinstance(blocks, (list, tuple))
  per_layer = cache is not None and isinstance(cache["k"], (list, tuple))
  kvs = None if cache is None else (cache["k"], cache["v"])
  if cfg.resolved_scan_layers() and not split_blocks and not per_layer:
    (x, kvs), _ = jax.lax.scan(body, (x, kvs), (blocks, layer_keys, jnp.arange(cfg.n_layer)))
  else:
    if per_layer:
      kvs = (list(kvs[0]), list(kvs[1]))
    per_block = blocks if split_blocks else unstack_layers(blocks)
    for i in range(cfg.n_layer):
      bp = per_block[i]
      key = None if layer_keys is None else layer_keys[i]
      if per_layer:
        (x, (kvs[0][i], kvs[1][i])), _ = body((x, (kvs[0][i], kvs[1][i])), (bp, key, None))
      else:
        (x, kvs), _ = body((x, kvs), (bp, key, i))
    if per_layer:
      kvs = (tuple(kvs[0]), tuple(kvs[1]))

  if cfg.pre_ln:
    x = norm(params["ln_f"], cfg, x)
  new_cache = None if cache is None else {"k": kvs[0], "v": kvs[1]}
  return x, new_cache


def _cache_slots(cache) -> int:
  k = cache["k"]
  return k[0].shape[2] if isinstance(k, (list, tuple)) else k.shape[3]


def decode_params(params: Params, config) -> Params:
  """The params laid out for a decoding loop (call it once, outside the loop):
  "blocks" as a tuple of L per-layer dicts, and "unembed_t" = the unembedding transposed to [D,V].

  XLA does not hoist loop-invariant slices or transposes of weights out of a while loop, so a
  decode loop over stacked blocks copies every weight on every step (measured: ~70% of a CPU
  decode step), and the [V,D] unembedding is contracted in its slow transposed form. `forward`
  runs split blocks unrolled; `unembed` uses "unembed_t" when present. Idempotent."""
  if isinstance(params["blocks"], (list, tuple)):
    return params
  return {**params, "blocks": unstack_layers(params["blocks"]),
          "unembed_t": jnp.transpose(unembedding_table(params, config))}


def unstack_layers(blocks) -> tuple:
  """Stacked [L,...] block params -> a tuple of L per-layer trees, by one `split` per leaf.

  Its transpose is one concatenate per leaf, where L indexing slices (`y[i]`) transpose to L
  zero-padded [L,...] buffers summed: in an unrolled train step on CPU those pads and adds cost
  more than the step's elementwise math, and XLA fuses them again into each Adam consumer."""
  leaves, treedef = jax.tree.flatten(blocks)
  n = leaves[0].shape[0]
  parts = [jnp.split(leaf, n, axis=0) for leaf in leaves]
  return tuple(treedef.unflatten([p[i][0] for p in parts]) for i in range(n))


def unstack_cache(cache):
  """{"k","v": [L,B,KV,S,Dh]} -> {"k","v": tuple of L [B,KV,S,Dh]}: each layer's cache its own
  buffer, so a decode step updates it in place and attention reads it without a slice copy."""
  return {name: tuple(cache[name][i] for i in range(cache[name].shape[0])) for name in ("k", "v")}


def stack_cache(cache):
  """Inverse of `unstack_cache` (no-op for a stacked cache)."""
  if not isinstance(cache["k"], (list, tuple)):
    return cache
  return {name: jnp.stack(cache[name]) for name in ("k", "v")}


def hidden_states(params: Params, config, tokens, attention_mask=None, dropout_rng=None, prefix_embeds=None):
  """Final hidden states [B,T,D] (compute dtype) at the token positions; used by scalar heads and
  chunked losses. prefix_embeds: optional [B,P,D] input embeddings read before the tokens (the image
  tokens of `vlm.py`, always real): attention_mask [B,T] then covers the tokens only, the sequence
  is [prefix | tokens], and the P prefix positions are dropped from the output."""
  if prefix_embeds is None:
    return forward(params, config, tokens, attention_mask, dropout_rng=dropout_rng)[0]
  p = prefix_embeds.shape[1]
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  full = prefix_mask(attention_mask, p)
  return forward(params, config, tokens, full, dropout_rng=dropout_rng, prefix_embeds=prefix_embeds)[0][:, p:]


def prefix_mask(attention_mask, num_prefix: int):
  """[B,T] token mask -> int32 [B,P+T] mask of [prefix | tokens]: the P prefix positions (image
  tokens) are always real."""
  b = attention_mask.shape[0]
  return jnp.concatenate([jnp.ones((b, num_prefix), jnp.int32), attention_mask.astype(jnp.int32)], axis=1)


def unembedding_table(params: Params, config):
  """The unembedding [V,D]: wte (tied) or lm_head (tie_embeddings=False), in the params' dtype."""
  return params["wte"] if _as_config(config).tie_embeddings else params["lm_head"]


def unembed(params: Params, config, hidden):
  """hidden [...,D] -> float32 logits [...,V] with wte (tied) or lm_head (tie_embeddings=False)."""
  cfg = _as_config(config)
  if "unembed_t" in params:   # `decode_params`: [D,V], the plain matmul form
    logits = jnp.einsum("...d,dv->...v", hidden, params["unembed_t"].astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...d,vd->...v", hidden, unembedding_table(params, cfg).astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
  return parallel.constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits


def logits(params: Params, config, tokens, attention_mask=None, dropout_rng=None, prefix_embeds=None):
  """Next-token logits, float32 [B,T,V]. attention_mask [B,T]: 1 = real token, 0 = padding.

  Positions are derived from the mask, so a left-padded prompt gives the same
  logits at its real tokens as the unpadded prompt. prefix_embeds: see `hidden_states`.
  """
  return unembed(params, config, hidden_states(params, config, tokens, attention_mask, dropout_rng, prefix_embeds))


def init_cache(config, batch_size: int, max_len: int, dtype=None):
  """Empty KV cache {"k","v": [L,B,KV,S,Dh]} in the compute dtype (or `dtype`): head-major, so
  attention reads each layer's slots with no transpose."""
  cfg = _as_config(config)
  if max_len > cfg.max_len:
    raise ValueError(f"cache length {max_len} exceeds the model's context window {cfg.max_len}")
  shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.d_head)
  dtype = dtype or cfg.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def num_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ------------------------------------------------------------ vocabulary resize
def _mean_resized(table, new_rows: int, new_ids: np.ndarray):
  """table [V,D] -> [new_rows,D]: appended rows and rows `new_ids` = the mean of the V old rows."""
  mean = jnp.mean(table.astype(jnp.float32), axis=0).astype(table.dtype)
  grown = jnp.concatenate([table, jnp.broadcast_to(mean, (new_rows - table.shape[0], table.shape[1]))])
  return grown.at[new_ids].set(mean) if new_ids.size else grown


def resize_vocab(params: Params, config, new_vocab_size: int, new_ids: Iterable[int] = ()):
  """Grows the vocabulary for new tokens (e.g. chat-template specials), TRL / transformers style.

  wte (and lm_head when untied) grow to new_vocab_size rows if that is larger; every
  appended row and every row listed in new_ids (which may be existing, reserved ids)
  is set to the mean of the table's rows before the resize. Other rows and params are
  unchanged. Scalar models pass their trunk (params["gpt"]).
  Returns (config with vocab_size = max(old, new_vocab_size), params).
  """
  cfg = _as_config(config)
  old = params["wte"].shape[0]
  size = max(old, int(new_vocab_size))
  if int(new_vocab_size) < old:
    raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {old} to {new_vocab_size}")
  ids = np.asarray(sorted(set(int(i) for i in new_ids)), np.int32)
  if ids.size and (ids.min() < 0 or ids.max() >= size):
    raise ValueError(f"resize_vocab: new_ids must lie in [0, {size}), got {ids.min()}..{ids.max()}")
  out = {**params, "wte": _mean_resized(params["wte"], size, ids)}
  if "lm_head" in params:
    out["lm_head"] = _mean_resized(params["lm_head"], size, ids)
  return dataclasses.replace(cfg, vocab_size=size), out


def upgrade_legacy_params(params):
  """Converts checkpoints with the former fused attention (qkv_kernel [L,D,3,H,Dh], qkv_bias
  [L,3,H,Dh]) to q_kernel/kv_kernel (q_bias/kv_bias); any nesting (e.g. {"gpt": ...}).
  Params already in the current layout are returned unchanged."""
  if not isinstance(params, dict):
    return params
  out = {k: upgrade_legacy_params(v) for k, v in params.items()}
  if "qkv_kernel" in out:
    qkv = out.pop("qkv_kernel")
    out["q_kernel"], out["kv_kernel"] = qkv[..., 0, :, :], qkv[..., 1:, :, :]
  if "qkv_bias" in out:
    b = out.pop("qkv_bias")
    out["q_bias"], out["kv_bias"] = b[..., 0, :, :], b[..., 1:, :, :]
  return out
