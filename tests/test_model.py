"""GPT model: presets, padding invariance, KV cache, variants, scalar-head plumbing, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import gpt
from rlhf_jax.model.config import GPTConfig, preset

CFG = preset("nano", dropout=0.0, vocab_size=97)


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
  ref = gpt.logits(params, CFG, tokens)
  for pad in (1, 4):
    padded = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), jnp.ones((3, 9), jnp.int32)], axis=1)
    out = gpt.logits(params, CFG, padded, mask)
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # fully masked pad rows give no NaN


def test_right_padding_does_not_change_real_positions(params):
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, CFG.vocab_size)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  junk = tokens.at[1, 5:].set(3)
  a, b = gpt.logits(params, CFG, tokens, mask), gpt.logits(params, CFG, junk, mask)
  np.testing.assert_allclose(a[1, :5], b[1, :5], atol=1e-6)


@pytest.mark.parametrize("variant", [dict(), dict(pre_ln=False), dict(scan_layers=False), dict(remat="full")])
def test_kv_cache_incremental_decoding_matches_full_forward(variant):
  cfg = preset("nano", dropout=0.0, vocab_size=97, **variant)
  p = gpt.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, cfg.vocab_size)
  full = gpt.logits(p, cfg, tokens)
  cache = gpt.init_cache(cfg, 2, 16)
  slots = jnp.zeros((2, 16), jnp.int32)
  # prefill 5 tokens, then one token at a time
  slots = slots.at[:, :5].set(1)
  h, cache = gpt.forward(p, cfg, tokens[:, :5], slots, jnp.broadcast_to(jnp.arange(5), (2, 5)), cache, 0)
  outs = [gpt.unembed(p, cfg, h)]
  for t in range(5, 12):
    slots = slots.at[:, t].set(1)
    h, cache = gpt.forward(p, cfg, tokens[:, t:t + 1], slots, jnp.full((2, 1), t), cache, t)
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
  det1, det2 = gpt.logits(p, cfg, tokens), gpt.logits(p, cfg, tokens)
  np.testing.assert_array_equal(det1, det2)
  s1 = gpt.logits(p, cfg, tokens, dropout_rng=jax.random.PRNGKey(1))
  s2 = gpt.logits(p, cfg, tokens, dropout_rng=jax.random.PRNGKey(2))
  assert not np.allclose(s1, s2)


def test_bfloat16_compute_is_close_to_float32(params):
  cfg16 = preset("nano", dropout=0.0, vocab_size=97, dtype="bfloat16")
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, 97)
  out16 = gpt.logits(params, cfg16, tokens)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, gpt.logits(params, CFG, tokens), atol=0.1)


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
