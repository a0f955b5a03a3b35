"""Transformer building blocks as Flax NNX modules.

Every parameter carries `logical_axes` metadata (MaxText's idea): names such as
("embed", "mlp") that `rlhf_jax.parallel` maps to mesh axes by rules. Modules
are only used through `nnx.split`/`nnx.merge` in `gpt.py`; callers see pure
functions over nested dicts of arrays.

One set of modules covers GPT-2 (learned positions, LayerNorm, GELU MLP,
biases) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention,
optional q/k/v biases and Qwen3's q/k norms); `GPTConfig` selects the pieces.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

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


# ------------------------------------------------------------------- RMSNorm
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
  """x [..., D] any float; scale [D]. x / rms(x) * scale, computed in float32, returns x.dtype."""
  y, _ = _rms_fwd(x, scale, eps)
  return y


def _rms_fwd(x, scale, eps):
  xf = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  xhat = xf * rstd
  y = xhat * scale.astype(jnp.float32)
  return y.astype(x.dtype), (xhat, rstd, scale)


def _rms_bwd(eps, res, g):
  del eps
  xhat, rstd, scale = res
  gf = g.astype(jnp.float32)
  red = tuple(range(gf.ndim - 1))
  dscale = jnp.sum(gf * xhat, axis=red).astype(scale.dtype)
  gx = gf * scale.astype(jnp.float32)
  dx = rstd * (gx - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
  return dx.astype(g.dtype), dscale


rms_norm.defvjp(_rms_fwd, _rms_bwd)


# --------------------------------------------------------------------- dense
# XLA:CPU differentiates `x @ w` into a weight-gradient dot with both operands transposed,
# which misses its fast matmul path (45 vs 142 GFLOP/s measured, benchmarks/RESULTS.md). The
# hand-written VJP states the weight gradient as one dot contracting the token axis of x and g
# (the "TN" form every backend runs at full speed); the input gradient is g @ w^T.
# In bf16/f16 every dot accumulates and returns float32 (then rounds to x.dtype): a 16-bit-output dot is
# converted to f32 by XLA:CPU, while bf16 operands with an f32 result run on its YNNPACK kernels, which use
# AMX / AVX512-BF16 where the CPU has them (~820 vs ~120 GFLOP/s on one AMX core, benchmarks/RESULTS.md).
# Those kernels take the weight gradient's token contraction only from a row-major x^T, so on CPU, in
# 16-bit compute, x^T is materialised first (a copy of the activations; 430-600 vs 80-120 GFLOP/s with it).
@jax.custom_vjp
def dense(x, w):
  """x [..., K] @ w [K, N] -> [..., N] in x.dtype (w is cast to x.dtype: f32 master weights,
  bf16/f16 compute; the dot accumulates in float32). The weight gradient comes back in w's dtype."""
  return _dot(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ()))).astype(x.dtype)


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dense_fwd(x, w):
  return dense(x, w), (x, w)


def _dense_bwd(res, g):
  x, w = res
  k, n = w.shape
  dx = _dot(g, w.astype(g.dtype), (((g.ndim - 1,), (1,)), ((), ())))
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  if x.dtype.itemsize < 4 and jax.default_backend() == "cpu":
    dw = _dot(with_layout_constraint(x2.T, Layout((0, 1))), g2, (((1,), (0,)), ((), ())))   # [K,T] row-major
  else:
    dw = _dot(x2, g2, (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def add_bias(y, b):
  """y [..., *b.shape] + b cast to y.dtype. float32: the plain add (unchanged program). 16-bit y
  (f32 master bias): the bias gradient is a float32 ones-vector dot over y's leading axes, where the
  transpose of the broadcast (a bf16 reduce, rounded to bf16) is widened and rewritten by XLA:CPU into
  slow reduce-windows inside the train step (130 ms of the bf16 PPO iteration, benchmarks/RESULTS.md)."""
  if jnp.dtype(y.dtype).itemsize >= 4:
    return y + b.astype(y.dtype)
  return _add_bias16(y, b)


@jax.custom_vjp
def _add_bias16(y, b):
  return y + b.astype(y.dtype)


def _add_bias16_fwd(y, b):
  return _add_bias16(y, b), b


def _add_bias16_bwd(b, g):
  g2 = g.reshape(-1, b.size)
  db = _dot(jnp.ones((g2.shape[0],), g.dtype), g2, (((0,), (0,)), ((), ())))
  return g, db.reshape(b.shape).astype(b.dtype)


_add_bias16.defvjp(_add_bias16_fwd, _add_bias16_bwd)


def dense_nd(x, w, n_in: int):
  """Dense over the last n_in axes of x with a kernel w [*in, *out] (e.g. q_kernel [D,H,Dh] with
  n_in=1, out_kernel [H,Dh,D] with n_in=2): flattens both sides, `dense`, then unflattens."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  k, n = math.prod(in_shape), math.prod(out_shape)
  lead = x.shape[:x.ndim - n_in]
  y = dense(x.reshape(lead + (k,)), w.reshape(k, n))
  return y.reshape(lead + out_shape)


# ---------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: GPTConfig) -> np.ndarray:
  """float32 [Dh/2] inverse frequencies, computed as transformers' rope init functions do
  (default, "linear": divided by factor, "llama3": Llama 3.1's smooth low-frequency scaling)."""
  dh = cfg.d_head
  exponent = np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / np.float32(dh)
  inv = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
  if cfg.rope_scaling == "linear":
    return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  if cfg.rope_scaling == "llama3":
    return _llama3_inv_freq(inv, cfg)
  return inv


def _llama3_inv_freq(inv: np.ndarray, cfg: GPTConfig) -> np.ndarray:
  factor, lo, hi = (np.float32(v) for v in (cfg.rope_factor, cfg.rope_low_freq_factor,
                                            cfg.rope_high_freq_factor))
  old_len = np.float32(cfg.rope_original_max_len)
  low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: GPTConfig, positions):
  """positions int [B,T] -> (cos, sin) float32 [B,T,Dh] (the two halves repeat, rotate_half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B,T,H,Dh]; cos/sin float32 [B,T,Dh]. x*cos + rotate_half(x)*sin in float32, returns x.dtype."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# ----------------------------------------------------------------- attention
def dropout(x, rate: float, key):
  """Inverted dropout; identity when key is None or rate == 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@jax.custom_vjp
def softmax_last(x):
  """Softmax over the last axis (x float32 [..., S]; a fully masked row needs a finite fill, as NEG_INF is).
  Same forward as jax.nn.softmax. Its backward, p * (g - sum(g * p)), is written out: for jax.nn.softmax's
  transposed JVP XLA:CPU emits one YNNPACK reduce fusion that took 4.2 ms per [8,8,128,128] call in the mini
  train step, against 0.8 ms for this (benchmarks/RESULTS.md)."""
  e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
  p = softmax_last(x)
  return p, p


def _softmax_bwd(p, g):
  gp = g * p
  return (gp - p * jnp.sum(gp, axis=-1, keepdims=True),)


softmax_last.defvjp(_softmax_fwd, _softmax_bwd)


def attention(q, k, v, mask, dropout_rate=0.0, key=None):
  """Scaled dot-product attention with grouped K/V heads (GQA; MHA when KV = H), head-major.

  q [B,H,T,Dh]; k/v [B,KV,S,Dh] with H = KV * G: query head h reads K/V head
  h // G (transformers' repeat_kv order), without materialising repeated K/V.
  mask [B,T,S] bool (True = may attend). Softmax in float32. Returns [B,H,T,Dh] in q.dtype.
  Head-major operands make both dots plain batched matmuls over (B, KV): on XLA:CPU this
  layout runs the attention forward + backward about 2x faster than [B,T,H,Dh].
  """
  b, h, t, dh = q.shape
  kv = k.shape[1]
  qg = q.reshape(b, kv, h // kv, t, dh)
  scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(dh)
  scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
  probs = softmax_last(scores)
  probs = dropout(probs, dropout_rate, key).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
  return out.reshape(b, h, t, dh)


def _normal(rngs, shape, std):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _zeros(shape, axes):
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; `bias=False` drops the shift (scale only)."""

  def __init__(self, d: int, eps: float, bias: bool = True):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("norm",))
    if bias:
      self.bias = _zeros((d,), ("norm",))
    self.eps = eps

  def __call__(self, x):
    bias = self.bias[...] if hasattr(self, "bias") else jnp.zeros_like(self.scale[...])
    return layer_norm(x, self.scale[...], bias, self.eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (scale only), as Llama/Qwen/Mistral."""

  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


def make_norm(cfg: GPTConfig, d: int):
  """The config's norm over a [..., d] axis."""
  if cfg.norm == "rmsnorm":
    return RMSNorm(d, cfg.ln_eps)
  return LayerNorm(d, cfg.ln_eps, cfg.bias)


class Attention(nnx.Module):
  """Causal self-attention: q_kernel [D,H,Dh], kv_kernel [D,2,KV,Dh], out_kernel [H,Dh,D].

  Optional: q_bias [H,Dh] / kv_bias [2,KV,Dh] (qkv_bias), out_bias [D] (bias),
  q_norm / k_norm RMSNorm over Dh before RoPE (qk_norm).
  """

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.d_head
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)  # GPT-2's residual-projection scaling
    # One draw for q, k and v: with KV = H this is the former fused [D,3,H,Dh] kernel's init.
    w = _normal(rngs, (d, h + 2 * kv, dh), cfg.init_std)
    self.q_kernel = nnx.Param(w[:, :h], logical_axes=("embed", "heads", "head_dim"))
    self.kv_kernel = nnx.Param(w[:, h:].reshape(d, 2, kv, dh),
                               logical_axes=("embed", None, "kv_heads", "head_dim"))
    if cfg.qkv_bias:
      self.q_bias = _zeros((h, dh), ("heads", "head_dim"))
      self.kv_bias = _zeros((2, kv, dh), (None, "kv_heads", "head_dim"))
    self.out_kernel = nnx.Param(_normal(rngs, (h, dh, d), out_std), logical_axes=("heads", "head_dim", "embed"))
    if cfg.bias:
      self.out_bias = _zeros((d,), ("embed",))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(dh, cfg.ln_eps)
      self.k_norm = RMSNorm(dh, cfg.ln_eps)
    self.rate = cfg.dropout

  def _project(self, x):
    """x [B,T,D] -> q [B,T,H,Dh], k, v [B,T,KV,Dh] (biases and q/k norms applied, no RoPE)."""
    q = dense_nd(x, self.q_kernel[...], 1)     # [B,T,H,Dh]
    kv = dense_nd(x, self.kv_kernel[...], 1)   # [B,T,2,KV,Dh]
    if hasattr(self, "q_bias"):
      q = add_bias(q, self.q_bias[...])
      kv = add_bias(kv, self.kv_bias[...])
    k, v = kv[:, :, 0], kv[:, :, 1]
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def __call__(self, x, mask, rope=None, kv=None, cache_index=None, keys=(None, None)):
    """x [B,T,D]; mask [B,T,S]; rope: (cos, sin) float32 [B,T,Dh] or None (learned positions).

    kv: optional (k_cache, v_cache, layer): the whole stacked cache [L,B,KV,S,Dh] and this
    block's layer index (int or traced), or this layer's own [B,KV,S,Dh] buffers and None.
    Only the T new K/V rows are written (one dynamic_update_slice at slot cache_index);
    the layer's slots are then read for attention. Returns (y [B,T,D], (k_cache, v_cache) updated, or None).
    """
    dt = x.dtype
    q, k, v = self._project(x)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    head_major = lambda a: jnp.swapaxes(a, 1, 2)            # [B,T,H,Dh] -> [B,H,T,Dh]
    q, k, v = head_major(q), head_major(k), head_major(v)
    q = parallel.constrain(q, ("batch", "heads", "length", "head_dim"))
    if kv is not None:
      k_cache, v_cache, layer = kv
      if layer is None:   # this layer's own buffer [B,KV,S,Dh]
        at = (0, 0, cache_index, 0)
        k = k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
        v = v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
      else:               # the stacked cache [L,B,KV,S,Dh]
        at = (layer, 0, 0, cache_index, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        k = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
      kv = (k_cache, v_cache)
    out = attention(q, k.astype(dt), v.astype(dt), mask, self.rate, keys[0])   # [B,H,T,Dh]
    y = dense_nd(head_major(out), self.out_kernel[...], 2)
    if hasattr(self, "out_bias"):
      y = add_bias(y, self.out_bias[...])
    return dropout(y, self.rate, keys[1]), kv


class MLP(nnx.Module):
  """gelu: gelu(x@fc) @ proj; swiglu: (silu(x@gate) * (x@fc)) @ proj (fc = HF's up_proj).

  fc_kernel / gate_kernel [D,F], proj_kernel [F,D]; biases [F] / [D] only when cfg.bias.
  """

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_mlp
    self.fc_kernel = nnx.Param(_normal(rngs, (d, f), cfg.init_std), logical_axes=("embed", "mlp"))
    if cfg.bias:
      self.fc_bias = _zeros((f,), ("mlp",))
    self.proj_kernel = nnx.Param(_normal(rngs, (f, d), cfg.init_std / math.sqrt(2 * cfg.n_layer)),
                                 logical_axes=("mlp", "embed"))
    if cfg.bias:
      self.proj_bias = _zeros((d,), ("embed",))
    if cfg.mlp == "swiglu":
      self.gate_kernel = nnx.Param(_normal(rngs, (d, f), cfg.init_std), logical_axes=("embed", "mlp"))
      if cfg.bias:
        self.gate_bias = _zeros((f,), ("mlp",))
    self.rate = cfg.dropout

  def _linear(self, x, name):
    y = dense(x, getattr(self, name + "_kernel")[...])
    if hasattr(self, name + "_bias"):
      y = add_bias(y, getattr(self, name + "_bias")[...])
    return y

  def __call__(self, x, key=None):
    h = parallel.constrain(self._linear(x, "fc"), ("batch", "length", "mlp"))
    if hasattr(self, "gate_kernel"):
      gate = parallel.constrain(self._linear(x, "gate"), ("batch", "length", "mlp"))
      h = jax.nn.silu(gate) * h
    else:
      h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" (tanh approximation)
    return dropout(self._linear(h, "proj"), self.rate, key)


class Block(nnx.Module):
  """One transformer block: pre-LN (GPT-2/3, Llama) or post-LN (GPT-1)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.ln1 = make_norm(cfg, cfg.d_model)
    self.attn = Attention(cfg, rngs)
    self.ln2 = make_norm(cfg, cfg.d_model)
    self.mlp = MLP(cfg, rngs)
    self.pre_ln = cfg.pre_ln

  def __call__(self, x, mask, rope=None, kv=None, cache_index=None, key=None):
    keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    if self.pre_ln:
      a, kv = self.attn(self.ln1(x), mask, rope, kv, cache_index, keys[:2])
      x = x + a
      x = x + self.mlp(self.ln2(x), keys[2])
    else:
      a, kv = self.attn(x, mask, rope, kv, cache_index, keys[:2])
      x = self.ln1(x + a)
      x = self.ln2(x + self.mlp(x, keys[2]))
    return parallel.constrain(x, ("batch", "length", "embed")), kv


class Embeddings(nnx.Module):
  """Token table wte, learned positions wpe (position="learned"), the final norm ln_f (pre-LN
  only) and an untied unembedding lm_head [V,D] (tie_embeddings=False)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.wte = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std),
                         logical_axes=("vocab", "embed"))
    if cfg.position == "learned":
      self.wpe = nnx.Param(_normal(rngs, (cfg.max_len, cfg.d_model), cfg.init_std / 2),
                           logical_axes=(None, "embed"))
    if cfg.pre_ln:
      self.ln_f = make_norm(cfg, cfg.d_model)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std),
                               logical_axes=("vocab", "embed"))
