"""hf.load / hf.save parity with transformers for GPT-2 and the Llama family (tiny random models, offline).

Families: GPT-2; Llama (GQA, untied head, llama3 rope scaling); Qwen2 (q/k/v biases, tied);
Qwen3 (q/k norms, head_dim != d_model / n_head); Mistral (MQA, linear rope scaling, a
sliding window that caps max_len).
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import sampling  # noqa: E402
from rlhf_jax.model import gpt, heads, hf, hf_config  # noqa: E402

TOL = 1e-4
V = 128
PAD = 0
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
             max_position_embeddings=64, rms_norm_eps=1e-5)
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=V,
                                            n_inner=96),
    "llama": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                              rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=24,
                                              tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**{**SMALL, "max_position_embeddings": 128},
                                                  num_key_value_heads=1, sliding_window=48,
                                                  rope_parameters=dict(rope_type="linear", rope_theta=1e4,
                                                                       factor=2.0)),
}
FAMILIES = tuple(HF_CONFIGS)


def _randomise(model, seed):
  """Non-trivial values for every tensor (norm weights near 1, everything else noisy, biases too)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      is_norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
      p.copy_(1.0 + 0.2 * noise if is_norm else 0.15 * noise)
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> (HF causal LM with random weights, its save_pretrained directory, (cfg, params) loaded)."""
  out = {}
  for i, (family, make) in enumerate(HF_CONFIGS.items()):
    torch.manual_seed(i)
    model = _randomise(transformers.AutoModelForCausalLM.from_config(make()), seed=i).eval()
    d = tmp_path_factory.mktemp(family)
    model.save_pretrained(d)
    out[family] = (model, d, hf.load(d))
  return out


def _left_padded(b=3, t=20, pads=(0, 5, 12), seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, (b, t)).astype(np.int32)
  mask = np.ones_like(tokens)
  for row, pad in enumerate(pads):
    tokens[row, :pad], mask[row, :pad] = PAD, 0
  return tokens, mask


def _hf_positions(mask):
  m = torch.tensor(mask)
  return m, torch.clamp(torch.cumsum(m, -1) - 1, min=0)


def _hf_logits(model, tokens, mask):
  m, pos = _hf_positions(mask)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=m, position_ids=pos).logits.float().numpy()


_logits = jax.jit(gpt.logits, static_argnums=(1,))
_forward = jax.jit(gpt.forward, static_argnums=(1,))


# ------------------------------------------------------------------ import parity
def test_configs_map_every_family(models):
  cfgs = {f: models[f][2][0] for f in FAMILIES}
  assert cfgs["gpt2"] == gpt.GPTConfig(vocab_size=V, max_len=64, n_layer=2, n_head=4, d_model=64, d_ff=96)
  llama = cfgs["llama"]
  assert (llama.family, llama.position, llama.norm, llama.mlp, llama.kv_heads) == ("llama", "rope", "rmsnorm",
                                                                                   "swiglu", 2)
  assert not llama.tie_embeddings and not llama.qkv_bias and not llama.bias
  assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max_len, llama.rope_theta) == (
      "llama3", 8.0, 16, 50000.0)
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].bias and cfgs["qwen2"].tie_embeddings
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].d_head == 24 and cfgs["qwen3"].head_dim == 24
  assert cfgs["mistral"].kv_heads == 1 and cfgs["mistral"].max_len == 48  # capped at the sliding window
  assert cfgs["mistral"].rope_scaling == "linear" and cfgs["mistral"].rope_factor == 2.0
  for family in FAMILIES:
    cfg, params = models[family][2]
    n_hf = sum(p.numel() for p in models[family][0].parameters())
    assert gpt.num_params(params) == cfg.num_params() == n_hf, family


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_transformers(models, family):
  model, _, (cfg, params) = models[family]
  tokens, mask = _left_padded()
  ref = _hf_logits(model, tokens, mask)
  ours = np.asarray(_logits(params, cfg, tokens, mask))
  real = mask.astype(bool)
  diff = float(np.abs(ours[real] - ref[real]).max())
  print(f"{family}: max |logit diff| (left padding, real tokens) = {diff:.3g}, logit std {ref[real].std():.3g}")
  assert ref[real].std() > 0.3
  assert diff < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached(models, family):
  _, _, (cfg, params) = models[family]
  tokens, mask = _left_padded(b=2, t=14, pads=(0, 4), seed=3)
  full = np.asarray(_logits(params, cfg, tokens, mask))
  tp = 8
  cache = gpt.init_cache(cfg, 2, 14)
  slots = np.zeros((2, 14), np.int32)
  slots[:, :tp] = mask[:, :tp]
  h, cache = _forward(params, cfg, jnp.asarray(tokens[:, :tp]), jnp.asarray(slots),
                         gpt.positions_from_mask(jnp.asarray(mask[:, :tp])), cache, 0)
  outs = [gpt.unembed(params, cfg, h)]
  lengths = mask[:, :tp].sum(1)
  for t in range(tp, 14):
    slots[:, t] = 1
    pos = jnp.asarray(lengths + t - tp)[:, None]
    h, cache = _forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(slots), pos, cache, t)
    outs.append(gpt.unembed(params, cfg, h))
  cached = np.asarray(jnp.concatenate(outs, axis=1))
  real = mask.astype(bool)
  np.testing.assert_allclose(cached[real], full[real], atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generate_matches_uncached_argmax(models, family):
  _, _, (cfg, params) = models[family]
  toks, mask = _left_padded(b=2, t=6, pads=(0, 3), seed=4)
  n = 5
  out = sampling.generate(params, cfg, jnp.asarray(toks), jnp.asarray(mask), jax.random.PRNGKey(0),
                          max_new_tokens=n, eos_id=None, pad_id=PAD, greedy=True)
  buf = np.concatenate([toks, np.zeros((2, n), np.int32)], 1)
  full_mask = np.concatenate([mask, np.ones((2, n), np.int32)], 1)
  for i in range(n):
    buf[:, 6 + i] = np.asarray(_logits(params, cfg, buf, full_mask))[:, 5 + i].argmax(-1)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), buf[:, 6:])


# ------------------------------------------------------------------ file formats
def _same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_safetensors_load_as_the_cast_weights(models, tmp_path):
  model, src, (cfg, params) = models["llama"]
  d = tmp_path / "bf16"
  transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(d)
  cfg16, p16 = hf.load(d, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16" and p16["wte"].dtype == jnp.float32
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  _same_params(p16, cast)


def test_sharded_safetensors_and_missing_shard(models, tmp_path):
  model, _, (_, params) = models["qwen3"]
  d = tmp_path / "sharded"
  model.save_pretrained(d, max_shard_size="40KB")
  shards = sorted(d.glob("model-*.safetensors"))
  assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
  _same_params(hf.load(d)[1], params)
  shards[-1].unlink()
  with pytest.raises(FileNotFoundError, match=rf"{shards[-1].name}.*model\.safetensors\.index\.json"):
    hf.load(d)


@pytest.mark.parametrize("arch, model_type", [("FalconForCausalLM", "falcon"), ("GemmaForCausalLM", "gemma")])
def test_unsupported_architecture(models, tmp_path, arch, model_type):
  d = tmp_path / arch
  shutil.copytree(models["llama"][1], d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "architectures": [arch], "model_type": model_type}))
  with pytest.raises(ValueError, match=rf"architectures=\['{arch}'\] is not supported.*LlamaForCausalLM"):
    hf.load(d)


@pytest.mark.parametrize("rope, match", [
    (dict(rope_type="yarn", factor=4.0, rope_theta=1e4), "rope type 'yarn' is not supported"),
    (dict(rope_type="dynamic", factor=2.0, rope_theta=1e4), "rope type 'dynamic' is not supported"),
    (dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_rope_is_rejected(rope, match):
  base = dict(architectures=["LlamaForCausalLM"], model_type="llama", **SMALL)
  with pytest.raises(ValueError, match=match):
    hf_config.config_from_hf({**base, "rope_parameters": rope})


def test_legacy_rope_keys_are_read():
  legacy = dict(architectures=["LlamaForCausalLM"], model_type="llama", **SMALL, rope_theta=5e5,
                rope_scaling=dict(type="linear", factor=4.0))
  cfg = hf_config.config_from_hf(legacy)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (5e5, "linear", 4.0)
  no_arch = dict(model_type="qwen3", **SMALL)  # architectures absent: model_type decides
  assert hf_config.config_from_hf(no_arch).qk_norm


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_from_pretrained_reproduces_our_logits(models, tmp_path, family):
  _, _, (cfg, params) = models[family]
  out = hf.save(cfg, params, tmp_path / family, extra_config={"bos_token_id": 1, "eos_token_id": 2})
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
  tokens, mask = _left_padded(seed=5)
  pads = ~mask.astype(bool)
  ours = np.asarray(_logits(params, cfg, tokens, mask))
  theirs = _hf_logits(back, tokens, mask)
  assert np.abs(ours - theirs)[~pads].max() < TOL
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  _same_params(params2, params)


def test_save_rejects_settings_the_family_cannot_express(models, tmp_path):
  cfg, params = models["llama"][2]
  bad = cfg.__class__(**{**cfg.__dict__, "family": "qwen2"})
  with pytest.raises(ValueError, match="family='qwen2'"):
    hf.save(bad, params, tmp_path / "bad")


# ------------------------------------------------------------------ reward models
def _hf_scores(model, tokens, mask):
  m, pos = _hf_positions(mask)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=m, position_ids=pos).logits[:, 0].numpy()


@pytest.mark.parametrize("family, bias", [("gpt2", 0.7), ("qwen2", 0.0)])
def test_reward_model_export_matches_heads_rewards(models, tmp_path, family, bias):
  _, _, (cfg, params) = models[family]
  rng = np.random.default_rng(7)
  rm = {"gpt": heads.trunk(params), "head": {"kernel": jnp.asarray(rng.standard_normal(cfg.d_model), jnp.float32),
                                             "bias": jnp.float32(bias)}}
  out = hf.save_reward_model(cfg, rm, tmp_path / "rm", extra_config={"pad_token_id": PAD})
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(back).__name__.endswith("ForSequenceClassification") and back.config.num_labels == 1
  left_t, left_m = _left_padded(seed=8)
  right_t, right_m = left_t[:, ::-1].copy(), left_m[:, ::-1].copy()
  for tokens, mask in ((left_t, left_m), (right_t, right_m)):
    ours = np.asarray(heads.rewards(rm, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(_hf_scores(back, tokens, mask), ours, atol=TOL)
  cfg2, rm2 = hf.load_reward_model(out)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(rm2["head"]["kernel"]), np.asarray(rm["head"]["kernel"]))
  np.testing.assert_allclose(np.asarray(heads.rewards(rm2, cfg2, jnp.asarray(left_t), jnp.asarray(left_m))),
                             np.asarray(heads.rewards(rm, cfg, jnp.asarray(left_t), jnp.asarray(left_m))),
                             atol=TOL)


def test_reward_model_bias_without_a_norm_bias_is_an_error(models, tmp_path):
  cfg, params = models["llama"][2]
  rm = heads.from_lm(params, cfg, jax.random.PRNGKey(0))
  assert "lm_head" not in rm["gpt"]
  with pytest.raises(ValueError, match="head bias is 0.5"):
    hf.save_reward_model(cfg, heads.shift_bias(rm, 0.5), tmp_path / "rm")


# ------------------------------------------------------------------ vocabulary resize
def test_resize_vocab_mean_rows_and_unchanged_old_logits(models):
  cfg, params = models["llama"][2]
  tokens, mask = _left_padded(b=2, t=10, pads=(0, 3), seed=9)
  new_cfg, grown = gpt.resize_vocab(params, cfg, V + 4, new_ids=range(V, V + 4))
  assert new_cfg.vocab_size == V + 4 and not new_cfg.tie_embeddings
  for name in ("wte", "lm_head"):
    old, new = np.asarray(params[name]), np.asarray(grown[name])
    assert new.shape == (V + 4, cfg.d_model)
    np.testing.assert_array_equal(new[:V], old)
    np.testing.assert_allclose(new[V:], np.broadcast_to(old.mean(0), (4, cfg.d_model)), atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, grown["blocks"], params["blocks"])
  before = np.asarray(_logits(params, cfg, tokens, mask))
  after = np.asarray(_logits(grown, new_cfg, tokens, mask))
  np.testing.assert_allclose(after[..., :V], before, atol=1e-5)
  # An existing (reserved) id listed in new_ids is reset to the mean too.
  _, reset = gpt.resize_vocab(params, cfg, V, new_ids=[5])
  np.testing.assert_allclose(np.asarray(reset["wte"][5]), np.asarray(params["wte"]).mean(0), atol=1e-6)
  with pytest.raises(ValueError, match="shrink"):
    gpt.resize_vocab(params, cfg, V - 1, [])

