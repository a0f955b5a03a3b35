"""GPT model: presets, padding invariance, KV cache, variants, scalar-head plumbing, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import gpt
from rlhf_jax.model.config import GPTConfig, preset

CFG = preset("nano", dropout=0.0, vocab_size=97)
# Every Llama-family option at once: RoPE (llama3 scaling), RMSNorm, SwiGLU, GQA, q/k/v biases,
# Qwen3's q/k norms, an explicit head_dim != d_model / n_head and an untied unembedding.
LLAMA = GPTConfig(vocab_size=97, max_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=12, d_ff=80,
                  dropout=0.0, family="qwen3", position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=True,
                  bias=False, qk_norm=True, tie_embeddings=False, rope_theta=1e4, rope_scaling="llama3",
                  rope_factor=4.0, rope_original_max_len=8)


# The model jitted once per config (as every caller in the library runs it): eager op-by-op dispatch of a whole
# forward compiles each primitive on its own, seconds per test on CPU.
_forward = jax.jit(gpt.forward, static_argnums=(1,))
_logits = jax.jit(gpt.logits, static_argnums=(1,))


@pytest.fixture(scope="module")
def params():
  return gpt.init(CFG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200)])
def test_gpt2_preset_param_counts_match_hf(name, count):
  cfg = preset(name)
  shapes = jax.eval_shape(lambda: gpt.init(cfg, jax.random.PRNGKey(0)))
  assert gpt.num_params(shapes) == cfg.num_params() == count


def test_gpt1_and_gpt3_presets():
  assert not preset("gpt1").pre_ln and abs(preset("gpt1").num_params() / 1e6 - 116.5) < 1  # "117M"
  for name, billions in [("gpt3-small", 0.125), ("gpt3-xl", 1.3), ("gpt3-6.7b", 6.7), ("gpt3-13b", 13.0),
                         ("gpt3-175b", 175.0)]:
    assert abs(preset(name).num_params() / 1e9 - billions) / billions < 0.05, name


def test_left_padding_gives_the_same_logits(params):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 0, CFG.vocab_size)
  ref = _logits(params, CFG, tokens)
  for pad in (1, 4):
    padded = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), jnp.ones((3, 9), jnp.int32)], axis=1)
    out = _logits(params, CFG, padded, mask)
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # fully masked pad rows give no NaN


def test_right_padding_does_not_change_real_positions(params):
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, CFG.vocab_size)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  junk = tokens.at[1, 5:].set(3)
  a, b = _logits(params, CFG, tokens, mask), _logits(params, CFG, junk, mask)
  np.testing.assert_allclose(a[1, :5], b[1, :5], atol=1e-6)


def test_llama_options_param_count_and_layout():
  shapes = jax.eval_shape(lambda: gpt.init(LLAMA, jax.random.PRNGKey(0)))
  assert gpt.num_params(shapes) == LLAMA.num_params()
  attn, mlp = shapes["blocks"]["attn"], shapes["blocks"]["mlp"]
  assert attn["q_kernel"].shape == (2, 64, 4, 12) and attn["kv_kernel"].shape == (2, 64, 2, 2, 12)
  assert attn["q_bias"].shape == (2, 4, 12) and attn["kv_bias"].shape == (2, 2, 2, 12)
  assert attn["q_norm"]["scale"].shape == (2, 12) and "out_bias" not in attn
  assert set(mlp) == {"fc_kernel", "gate_kernel", "proj_kernel"}
  assert "wpe" not in shapes and shapes["lm_head"].shape == (97, 64) and set(shapes["ln_f"]) == {"scale"}
  assert gpt.init_cache(LLAMA, 3, 8)["k"].shape == (2, 3, 2, 8, 12)
  # Untied lm_head: 6N counts it, not the input table; no position table is subtracted.
  assert LLAMA.flops_per_token(16) == 6.0 * (LLAMA.num_params() - 97 * 64) + 12.0 * 2 * 16 * 4 * 12


def test_config_stays_hashable_and_json_round_trips():
  import dataclasses
  import json
  assert GPTConfig(**json.loads(json.dumps(dataclasses.asdict(LLAMA)))) == LLAMA
  assert hash(LLAMA) == hash(GPTConfig(**dataclasses.asdict(LLAMA)))
  old_stage_json = {k: v for k, v in dataclasses.asdict(CFG).items() if k in (
      "vocab_size", "max_len", "n_layer", "n_head", "d_model", "head_dim", "d_ff", "pre_ln", "dropout", "ln_eps",
      "init_std", "dtype", "remat", "scan_layers")}
  assert GPTConfig(**old_stage_json) == CFG and CFG.family == "gpt2" and CFG.position == "learned"


def test_llama_options_left_padding_invariance():
  p = gpt.init(LLAMA, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 97)
  ref = _logits(p, LLAMA, tokens)
  padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 9), jnp.int32)], axis=1)
  np.testing.assert_allclose(_logits(p, LLAMA, padded, mask)[:, 3:], ref, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(pre_ln=False), dict(scan_layers=False), dict(remat="full"),
                                     dict(llama=True), dict(llama=True, scan_layers=False, remat="dots")])
def test_kv_cache_incremental_decoding_matches_full_forward(variant):
  variant = dict(variant)
  if variant.pop("llama", False):
    cfg = GPTConfig(**{**LLAMA.__dict__, **variant})
  else:
    cfg = preset("nano", dropout=0.0, vocab_size=97, **variant)
  p = gpt.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, cfg.vocab_size)
  full = _logits(p, cfg, tokens)
  cache = gpt.init_cache(cfg, 2, 16)
  slots = jnp.zeros((2, 16), jnp.int32)
  # prefill 5 tokens, then one token at a time
  slots = slots.at[:, :5].set(1)
  h, cache = _forward(p, cfg, tokens[:, :5], slots, jnp.broadcast_to(jnp.arange(5), (2, 5)), cache, 0)
  outs = [gpt.unembed(p, cfg, h)]
  for t in range(5, 12):
    slots = slots.at[:, t].set(1)
    h, cache = _forward(p, cfg, tokens[:, t:t + 1], slots, jnp.full((2, 1), t), cache, t)
    outs.append(gpt.unembed(p, cfg, h))
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_post_ln_has_no_final_layer_norm_and_differs_from_pre_ln():
  post = preset("nano", pre_ln=False, dropout=0.0)
  p = gpt.init(post, jax.random.PRNGKey(0))
  assert "ln_f" not in p and "ln_f" in gpt.init(preset("nano"), jax.random.PRNGKey(0))
  assert gpt.param_axes(post).keys() == p.keys()


def test_dropout_is_stochastic_only_with_an_rng():
  cfg = preset("nano", dropout=0.5, vocab_size=97)
  p = gpt.init(cfg, jax.random.PRNGKey(0))
  tokens = jnp.ones((1, 6), jnp.int32)
  det1, det2 = _logits(p, cfg, tokens), _logits(p, cfg, tokens)
  np.testing.assert_array_equal(det1, det2)
  s1 = _logits(p, cfg, tokens, dropout_rng=jax.random.PRNGKey(1))
  s2 = _logits(p, cfg, tokens, dropout_rng=jax.random.PRNGKey(2))
  assert not np.allclose(s1, s2)


def test_bfloat16_compute_is_close_to_float32(params):
  cfg16 = preset("nano", dropout=0.0, vocab_size=97, dtype="bfloat16")
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, 97)
  out16 = _logits(params, cfg16, tokens)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, _logits(params, CFG, tokens), atol=0.1)


def test_custom_layer_norm_gradient_matches_autodiff():
  from rlhf_jax.model.layers import layer_norm
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
  s, b = jax.random.normal(jax.random.PRNGKey(1), (16,)), jax.random.normal(jax.random.PRNGKey(2), (16,))

  def ref(x, s, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-5) * s + b
  f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(x, s, b)
  for g1, g2 in zip(f(lambda x, s, b: layer_norm(x, s, b, 1e-5)), f(ref)):
    np.testing.assert_allclose(g1, g2, atol=1e-4)


def test_custom_rms_norm_gradient_matches_autodiff():
  from rlhf_jax.model.layers import rms_norm
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
  s = jax.random.normal(jax.random.PRNGKey(1), (16,))
  ref = lambda x, s: x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s
  f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1))(x, s)
  np.testing.assert_allclose(rms_norm(x, s, 1e-6), ref(x, s), atol=1e-6)
  for g1, g2 in zip(f(lambda x, s: rms_norm(x, s, 1e-6)), f(ref)):
    np.testing.assert_allclose(g1, g2, atol=1e-4)
  y = rms_norm(x.astype(jnp.bfloat16), s, 1e-6)
  assert y.dtype == jnp.bfloat16


def test_llama_options_train_with_dropout_and_bfloat16():
  cfg = GPTConfig(**{**LLAMA.__dict__, "dropout": 0.1})
  p = gpt.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 97)
  loss = lambda p: jnp.mean(_logits(p, cfg, tokens, dropout_rng=jax.random.PRNGKey(2)) ** 2)
  grads = jax.jit(jax.grad(loss))(p)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["blocks"]["attn"]["q_norm"]["scale"]).max()) > 0
  cfg16 = GPTConfig(**{**LLAMA.__dict__, "dtype": "bfloat16"})
  np.testing.assert_allclose(_logits(p, cfg16, tokens), _logits(p, LLAMA, tokens), atol=0.1)


def test_upgrade_legacy_fused_qkv_params(params):
  legacy = jax.tree.map(lambda x: x, params)
  attn = legacy["blocks"]["attn"]
  attn["qkv_kernel"] = jnp.concatenate([attn.pop("q_kernel")[:, :, None], attn.pop("kv_kernel")], axis=2)
  attn["qkv_bias"] = jnp.concatenate([attn.pop("q_bias")[:, None], attn.pop("kv_bias")], axis=1)
  up = gpt.upgrade_legacy_params({"gpt": legacy})["gpt"]
  jax.tree.map(np.testing.assert_array_equal, up, params)
  assert gpt.upgrade_legacy_params(params) == params


def test_bad_inputs_raise_clear_errors(params):
  with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
    gpt.logits(params, CFG, jnp.array([[1, 97]]))
  with pytest.raises(ValueError, match="unknown key"):
    GPTConfig.from_dict({"preset": "nano", "n_layers": 3})
  with pytest.raises(ValueError, match="unknown model preset"):
    preset("gpt5")
  with pytest.raises(ValueError, match="not divisible"):
    GPTConfig(d_model=100, n_head=3)
  with pytest.raises(ValueError, match="exceeds the model's context window"):
    gpt.init_cache(CFG, 1, CFG.max_len + 1)
  with pytest.raises(ValueError, match="multiple of n_kv_head=3"):
    GPTConfig(n_head=4, d_model=64, n_kv_head=3)
  for field, value in [("family", "gemma"), ("norm", "batchnorm"), ("mlp", "relu"), ("position", "alibi"),
                       ("rope_scaling", "yarn")]:
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be one of"):
      GPTConfig(**{field: value})
  with pytest.raises(ValueError, match="llama3 rope scaling needs rope_original_max_len"):
    GPTConfig(position="rope", rope_scaling="llama3")
