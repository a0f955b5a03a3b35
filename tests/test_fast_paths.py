"""The fast paths equal the reference paths (benchmarks/RESULTS.md measures what they buy).

- `layers.dense` (hand-written VJP, weight gradient as one token-contracting dot) vs `x @ w`
  differentiated by JAX;
- the whole model's gradient with the fast layers vs a plain-einsum reference forward;
- unrolled layers vs `lax.scan`, remat variants;
- the chunked cross-entropy (no [B,T,V] logits) vs full logits;
- per-layer KV cache (decode loops) vs the stacked cache, and cached vs uncached logits.
Gradients agree to 1e-5 (float32).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import gpt, layers
from rlhf_jax.train import steps
from model_fixtures import init_params  # tests/ is on sys.path


CFG = gpt.preset("nano", dropout=0.0, vocab_size=96, max_len=32)
LLAMA = dataclasses.replace(CFG, family="llama", position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                            qkv_bias=False, n_kv_head=2, tie_embeddings=False)


def _params():
  return init_params(CFG, 0)


def _llama_params():
  return init_params(LLAMA, 1)


B, T = 3, 12


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  attn = np.ones((B, T), np.int32)
  attn[1, :4] = 0                      # one left-padded row
  mask = attn.copy()
  mask[:, :3] = 0
  return {"tokens": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]), "mask": jnp.asarray(mask),
          "attention_mask": jnp.asarray(attn)}


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
def test_dense_custom_vjp_matches_autodiff(shape):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (5, 4))
  g = jax.random.normal(kg, shape[:-1] + (4,))
  fast = jax.vjp(layers.dense, x, w)
  ref = jax.vjp(lambda a, b: a @ b, x, w)
  _close(fast[0], ref[0])
  _close(fast[1](g), ref[1](g))


@pytest.mark.parametrize("shape", [(64, 48), (2, 40, 48)])
def test_dense_in_bfloat16_accumulates_in_float32(shape):
  """bf16 compute: the forward and both gradients are the float32 products of the bf16-rounded operands (exact in
  float32) summed in float32, then rounded, so they equal a float64 reference up to f32 summation order; the
  weight gradient through its row-major x^T on CPU included. The weight gradient comes back in w's float32."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(5), 3)
  x = jax.random.normal(kx, shape).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (48, 24))                      # float32 master weights
  g = jax.random.normal(kg, shape[:-1] + (24,)).astype(jnp.bfloat16)
  y, vjp = jax.jit(lambda a, b: jax.vjp(layers.dense, a, b))(x, w)
  dx, dw = jax.jit(vjp)(g)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  x64, w64, g64 = (np.asarray(v, np.float64) for v in (x, w.astype(jnp.bfloat16), g))
  ref_y, ref_dx = x64 @ w64, g64 @ w64.T
  ref_dw = x64.reshape(-1, 48).T @ g64.reshape(-1, 24)
  np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max())
  for got, ref in ((y, ref_y), (dx, ref_dx)):   # rounded once to bf16 (8 bits of mantissa)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2 ** -8, atol=2 ** -8 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_gradient_is_the_float32_sum_over_leading_axes(dtype):
  """add_bias: y + b in y's dtype; the bias gradient (a ones-vector dot in 16-bit compute) is the float32 sum of the
  cotangent over every leading axis, and the cotangent passes through to y unchanged."""
  ky, kb, kg = jax.random.split(jax.random.PRNGKey(6), 3)
  y = jax.random.normal(ky, (3, 40, 2, 8)).astype(dtype)
  b = jax.random.normal(kb, (2, 8))                       # float32 master bias [KV-style trailing shape]
  g = jax.random.normal(kg, y.shape).astype(dtype)
  out, vjp = jax.jit(lambda a, c: jax.vjp(layers.add_bias, a, c))(y, b)
  dy, db = jax.jit(vjp)(g)
  assert (out.dtype, dy.dtype, db.dtype) == (dtype, dtype, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(y + b.astype(dtype), np.float32))
  np.testing.assert_array_equal(np.asarray(dy, np.float32), np.asarray(g, np.float32))
  ref = np.asarray(g, np.float64).reshape(-1, 16).sum(0).reshape(2, 8)
  np.testing.assert_allclose(np.asarray(db), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_softmax_last_matches_jax_softmax_and_its_gradient():
  """The attention softmax's written-out backward equals autodiff of jax.nn.softmax (masked entries and a fully
  masked row included); the forward is the same computation."""
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 5, 9)) * 4
  mask = jnp.tril(jnp.ones((5, 9), bool), 4).at[0].set(False)
  x = jnp.where(mask, x, layers.NEG_INF)
  g = jax.random.normal(jax.random.PRNGKey(8), x.shape)
  p, vjp = jax.vjp(layers.softmax_last, x)
  ref, ref_vjp = jax.vjp(lambda a: jax.nn.softmax(a, axis=-1), x)
  np.testing.assert_allclose(np.asarray(p), np.asarray(ref), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), rtol=1e-5, atol=1e-6)


def test_dense_nd_matches_einsum_for_attention_kernels():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 3, 5))     # [B,T,H,Dh]
  w = jax.random.normal(jax.random.PRNGKey(4), (3, 5, 6))        # [H,Dh,D]
  f = lambda a, b: jnp.sum(jnp.sin(layers.dense_nd(a, b, 2)))
  r = lambda a, b: jnp.sum(jnp.sin(jnp.einsum("bthk,hkd->btd", a, b)))
  _close(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(r, argnums=(0, 1))(x, w))


def _reference_logits(params, cfg, tokens, attention_mask):
  """A plain forward with jnp einsums and autodiffed norms (no custom VJPs, no head-major
  layout): the reference the fast model is checked against."""
  pos = gpt.positions_from_mask(attention_mask)
  x = params["wte"][tokens] + (params["wpe"][pos] if cfg.position == "learned" else 0)
  t = tokens.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & (attention_mask[:, None, :] > 0)
  rope = layers.rope_tables(cfg, pos) if cfg.position == "rope" else None

  def norm(p, h):
    h32 = h.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
      return h32 / jnp.sqrt(jnp.mean(h32 ** 2, -1, keepdims=True) + cfg.ln_eps) * p["scale"]
    mu = jnp.mean(h32, -1, keepdims=True)
    var = jnp.mean((h32 - mu) ** 2, -1, keepdims=True)
    return (h32 - mu) / jnp.sqrt(var + cfg.ln_eps) * p["scale"] + p.get("bias", 0.0)

  for i in range(cfg.n_layer):
    bp = jax.tree.map(lambda a: a[i], params["blocks"])
    a, m = bp["attn"], bp["mlp"]
    h = norm(bp["ln1"], x)
    q = jnp.einsum("btd,dhk->bthk", h, a["q_kernel"])
    kv = jnp.einsum("btd,dchk->btchk", h, a["kv_kernel"])
    if "q_bias" in a:
      q, kv = q + a["q_bias"], kv + a["kv_bias"]
    k, v = kv[:, :, 0], kv[:, :, 1]
    if rope is not None:
      q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)
    rep = cfg.n_head // cfg.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(cfg.d_head)
    p = jax.nn.softmax(jnp.where(mask[:, None], s, layers.NEG_INF), -1)
    o = jnp.einsum("bhts,bshd->bthd", p, v)
    x = x + jnp.einsum("bthk,hkd->btd", o, a["out_kernel"]) + a.get("out_bias", 0.0)
    h = norm(bp["ln2"], x)
    up = h @ m["fc_kernel"] + m.get("fc_bias", 0.0)
    if "gate_kernel" in m:
      up = jax.nn.silu(h @ m["gate_kernel"]) * up
    else:
      up = jax.nn.gelu(up, approximate=True)
    x = x + up @ m["proj_kernel"] + m.get("proj_bias", 0.0)
  x = norm(params["ln_f"], x)
  return jnp.einsum("btd,vd->btv", x, gpt.unembedding_table(params, cfg))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_gradient_matches_plain_reference(family):
  cfg, params = (CFG, _params()) if family == "gpt2" else (LLAMA, _llama_params())
  batch = _batch(cfg)

  def ref_loss(p):
    from rlhf_jax.losses.lm import lm_loss
    return lm_loss(_reference_logits(p, cfg, batch["tokens"], batch["attention_mask"]), batch["targets"],
                   batch["mask"])[0]
  fast_loss = lambda p: steps.lm_loss_fn(cfg)(p, batch, None)[0]
  lf, gf = jax.jit(jax.value_and_grad(fast_loss))(params)
  lr, gr = jax.jit(jax.value_and_grad(ref_loss))(params)
  np.testing.assert_allclose(lf, lr, atol=1e-5)
  _close(gf, gr)


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(scan_layers=False), dict(remat="full"),
                                     dict(remat="dots", scan_layers=True)])
def test_layer_loop_and_remat_variants_give_the_same_gradient(variant):
  batch = _batch(LLAMA, 1)
  base = dataclasses.replace(LLAMA, scan_layers=True, remat="none")
  cfg = dataclasses.replace(base, **variant)
  grad = lambda c: jax.jit(jax.value_and_grad(lambda p: steps.lm_loss_fn(c)(p, batch, None)[0]))(_llama_params())
  _close(grad(cfg), grad(base))


def test_auto_defaults_resolve_per_backend():
  cfg = gpt.preset("nano")
  assert cfg.remat == "auto" and cfg.scan_layers is None
  on_cpu = jax.default_backend() == "cpu"
  assert cfg.resolved_remat() == ("none" if on_cpu else "dots")
  assert cfg.resolved_scan_layers() == (not on_cpu)
  assert dataclasses.replace(cfg, remat="full").resolved_scan_layers()     # remat needs the scan on XLA:CPU
  assert not dataclasses.replace(cfg, scan_layers=False, remat="full").resolved_scan_layers()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_cross_entropy_matches_full_logits(family):
  cfg, params = (CFG, _params()) if family == "gpt2" else (LLAMA, _llama_params())
  batch = _batch(cfg, 2)
  full = jax.jit(jax.value_and_grad(lambda p: steps.lm_loss_fn(cfg, chunk_size=0)(p, batch, None)[0]))(params)
  chunked = jax.jit(jax.value_and_grad(lambda p: steps.lm_loss_fn(cfg, chunk_size=5)(p, batch, None)[0]))(params)
  _close(full, chunked)


def test_large_logits_use_the_chunked_loss_and_never_form_full_logits():
  assert steps.loss_chunk_size(2, 128, 50257) == 0                   # 51 MB: one matmul
  c = steps.loss_chunk_size(8, 1024, 151936)                         # Qwen, 5 GB of logits
  assert c and 8 * c * 151936 * 4 <= steps.CHUNK_LOGITS_BUDGET and c & (c - 1) == 0
  vocab = 4096
  batch = jax.eval_shape(lambda: _batch(CFG))
  seq = batch["tokens"].shape[1]
  cfg = dataclasses.replace(CFG, vocab_size=vocab)
  params = jax.eval_shape(lambda: gpt.init(cfg, jax.random.PRNGKey(0)))
  old = steps.FULL_LOGITS_BUDGET, steps.CHUNK_LOGITS_BUDGET
  try:   # shrink the budgets so these tiny shapes take the chunked path
    steps.FULL_LOGITS_BUDGET, steps.CHUNK_LOGITS_BUDGET = B * seq * vocab * 4 - 1, B * 4 * vocab * 4
    assert steps.loss_chunk_size(B, seq, vocab) == 4
    fn = jax.grad(lambda p, b: steps.lm_loss_fn(cfg)(p, b, None)[0])
    hlo = jax.jit(fn).lower(params, batch).as_text()
  finally:
    steps.FULL_LOGITS_BUDGET, steps.CHUNK_LOGITS_BUDGET = old
  assert f"{B}x{seq}x{vocab}xf32" not in hlo
  assert f"{B}x4x{vocab}xf32" in hlo


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_layer_cache_equals_stacked_cache_and_uncached(family):
  cfg, params = (CFG, _params()) if family == "gpt2" else (LLAMA, _llama_params())
  batch = _batch(cfg, 3)
  toks, attn = batch["tokens"], batch["attention_mask"]
  full = jax.jit(gpt.logits, static_argnums=1)(params, cfg, toks, attn)
  step = jax.jit(gpt.forward, static_argnums=1)   # one program per (prefill, one-token) shape, not per primitive
  s = T + 2
  pos = gpt.positions_from_mask(attn)
  cache_mask = jnp.concatenate([attn, jnp.zeros((B, 2), jnp.int32)], 1)
  outs = {}
  for name, (p, cache) in {"stacked": (params, gpt.init_cache(cfg, B, s)),
                           "per_layer": (gpt.decode_params(params, cfg),
                                         gpt.unstack_cache(gpt.init_cache(cfg, B, s)))}.items():
    # Prefill 8 tokens, then feed the remaining 4 one at a time.
    h, cache = step(p, cfg, toks[:, :8], cache_mask, pos[:, :8], cache, 0)
    hs = [h]
    for i in range(8, T):
      h, cache = step(p, cfg, toks[:, i:i + 1], cache_mask, pos[:, i:i + 1], cache, i)
      hs.append(h)
    outs[name] = (gpt.unembed(params, cfg, jnp.concatenate(hs, 1)), gpt.stack_cache(cache))
  real = np.asarray(attn) > 0
  for logits, _ in outs.values():
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[real], atol=2e-5)
  _close(outs["stacked"][1], outs["per_layer"][1], 1e-6)
  assert outs["stacked"][1]["k"].shape == (cfg.n_layer, B, cfg.kv_heads, s, cfg.d_head)


def test_inverse_cdf_categorical_draws_the_softmax_distribution():
  """The sampler's one-uniform-per-row draw has softmax(logits) frequencies and never draws an
  excluded (-inf) token; rows are independent."""
  from rlhf_jax import sampling
  logits = jnp.asarray([[2.0, 0.5, -jnp.inf, -1.0, 1.0, -jnp.inf],
                        [-jnp.inf, -jnp.inf, 0.0, -jnp.inf, -jnp.inf, -jnp.inf]], jnp.float32)
  n = 40000
  draws = jax.vmap(lambda k: sampling.categorical(k, logits))(jax.random.split(jax.random.PRNGKey(0), n))
  draws = np.asarray(draws)
  assert draws.shape == (n, 2) and draws.dtype == np.int32
  freq = np.bincount(draws[:, 0], minlength=6) / n
  probs = np.asarray(jax.nn.softmax(logits[0]))
  se = np.sqrt(probs * (1 - probs) / n)
  assert (np.abs(freq - probs) <= 4 * se + 1e-9).all(), (freq, probs)
  assert freq[2] == 0 and freq[5] == 0
  assert (draws[:, 1] == 2).all()
