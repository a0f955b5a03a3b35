"""Transformer building blocks as Flax NNX modules.

Every parameter carries `logical_axes` metadata (MaxText's idea): names such as
("embed", "mlp") that `rlhf_jax.parallel` maps to mesh axes by rules. Modules
are only used through `nnx.split`/`nnx.merge` in `gpt.py`; callers see pure
functions over nested dicts of arrays.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.model.config import GPTConfig

NEG_INF = -1e30  # finite, so fully masked rows (left padding) give no NaN


# ----------------------------------------------------------------- LayerNorm
# XLA:CPU's autodiff of LayerNorm is several times slower than the forward; a
# hand-written VJP (one fused reduction pair) removes most of that cost.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps):
  """x [..., D] any float; scale, bias [D]. Computed in float32, returns x.dtype."""
  y, _ = _ln_fwd(x, scale, bias, eps)
  return y


def _ln_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  xhat = xc * rstd
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (xhat, rstd, scale)


def _ln_bwd(eps, res, g):
  del eps
  xhat, rstd, scale = res
  gf = g.astype(jnp.float32)  # g has x's dtype, since y does
  red = tuple(range(gf.ndim - 1))
  dscale = jnp.sum(gf * xhat, axis=red).astype(scale.dtype)
  dbias = jnp.sum(gf, axis=red).astype(scale.dtype)
  gx = gf * scale.astype(jnp.float32)
  dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
               - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
  return dx.astype(g.dtype), dscale, dbias


layer_norm.defvjp(_ln_fwd, _ln_bwd)


def dropout(x, rate: float, key):
  """Inverted dropout; identity when key is None or rate == 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention(q, k, v, mask, dropout_rate=0.0, key=None):
  """Scaled dot-product attention.

  q [B,T,H,Dh], k/v [B,S,H,Dh] (compute dtype); mask [B,T,S] bool (True = may attend).
  Softmax in float32. Returns [B,T,H,Dh] in q.dtype.
  """
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout(probs, dropout_rate, key).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def _normal(rngs, shape, std):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class LayerNorm(nnx.Module):
  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
  """Multi-head causal self-attention with a fused QKV kernel [D, 3, H, Dh]."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, h, dh = cfg.d_model, cfg.n_head, cfg.d_head
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)  # GPT-2's residual-projection scaling
    self.qkv_kernel = nnx.Param(_normal(rngs, (d, 3, h, dh), cfg.init_std),
                                logical_axes=("embed", None, "heads", "head_dim"))
    self.qkv_bias = nnx.Param(jnp.zeros((3, h, dh), jnp.float32), logical_axes=(None, "heads", "head_dim"))
    self.out_kernel = nnx.Param(_normal(rngs, (h, dh, d), out_std), logical_axes=("heads", "head_dim", "embed"))
    self.out_bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
    self.rate = cfg.dropout

  def __call__(self, x, mask, kv=None, cache_index=None, keys=(None, None)):
    """x [B,T,D]; mask [B,T,S]; kv: optional (k_cache, v_cache) [B,S,H,Dh] to write at cache_index."""
    dt = x.dtype
    qkv = jnp.einsum("btd,dchk->btchk", x, self.qkv_kernel[...].astype(dt)) + self.qkv_bias[...].astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = parallel.constrain(q, ("batch", "length", "heads", "head_dim"))
    if kv is not None:
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
      kv = (k, v)
    out = attention(q, k.astype(dt), v.astype(dt), mask, self.rate, keys[0])
    y = jnp.einsum("bthk,hkd->btd", out, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)
    return dropout(y, self.rate, keys[1]), kv


class MLP(nnx.Module):
  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_mlp
    self.fc_kernel = nnx.Param(_normal(rngs, (d, f), cfg.init_std), logical_axes=("embed", "mlp"))
    self.fc_bias = nnx.Param(jnp.zeros((f,), jnp.float32), logical_axes=("mlp",))
    self.proj_kernel = nnx.Param(_normal(rngs, (f, d), cfg.init_std / math.sqrt(2 * cfg.n_layer)),
                                 logical_axes=("mlp", "embed"))
    self.proj_bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
    self.rate = cfg.dropout

  def __call__(self, x, key=None):
    dt = x.dtype
    h = x @ self.fc_kernel[...].astype(dt) + self.fc_bias[...].astype(dt)
    h = parallel.constrain(h, ("batch", "length", "mlp"))
    h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" (tanh approximation)
    y = h @ self.proj_kernel[...].astype(dt) + self.proj_bias[...].astype(dt)
    return dropout(y, self.rate, key)


class Block(nnx.Module):
  """One transformer block: pre-LN (GPT-2/3) or post-LN (GPT-1)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
    self.attn = Attention(cfg, rngs)
    self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
    self.mlp = MLP(cfg, rngs)
    self.pre_ln = cfg.pre_ln

  def __call__(self, x, mask, kv=None, cache_index=None, key=None):
    keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    if self.pre_ln:
      a, kv = self.attn(self.ln1(x), mask, kv, cache_index, keys[:2])
      x = x + a
      x = x + self.mlp(self.ln2(x), keys[2])
    else:
      a, kv = self.attn(x, mask, kv, cache_index, keys[:2])
      x = self.ln1(x + a)
      x = self.ln2(x + self.mlp(x, keys[2]))
    return parallel.constrain(x, ("batch", "length", "embed")), kv


class Embeddings(nnx.Module):
  """Token table (tied with the unembedding), learned positions, and the final LN (pre-LN only)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.wte = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std),
                         logical_axes=("vocab", "embed"))
    self.wpe = nnx.Param(_normal(rngs, (cfg.max_len, cfg.d_model), cfg.init_std / 2),
                         logical_axes=(None, "embed"))
    if cfg.pre_ln:
      self.ln_f = LayerNorm(cfg.d_model, cfg.ln_eps)
