"""Parity of rlhf_jax.model.hf with transformers' own GPT-2 (tiny models, no network)."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.model import gpt  # noqa: E402
from rlhf_jax.model.config import GPTConfig, preset  # noqa: E402
from rlhf_jax.model.hf import load, save
from rlhf_jax.model.hf_config import config_from_hf  # noqa: E402

TOL = 1e-4
_logits = jax.jit(gpt.logits, static_argnums=(1,))   # one program per shape, not one per primitive
HF_KW = dict(n_embd=96, n_layer=3, n_head=4, n_positions=64, vocab_size=211, layer_norm_epsilon=3e-5,
             n_inner=200, resid_pdrop=0.05, embd_pdrop=0.05, attn_pdrop=0.05, initializer_range=0.03,
             bos_token_id=0, eos_token_id=0)


def _randomise(model, seed):
  """Non-trivial values for every tensor (HF init has zero biases and unit LNs, which would hide
  a mis-mapped bias or LayerNorm)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "ln" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.15 * noise)
  return model


def _hf_logits(model, tokens, mask=None):
  kw = {}
  if mask is not None:
    m = torch.tensor(mask)
    kw = dict(attention_mask=m, position_ids=torch.clamp(torch.cumsum(m, -1) - 1, min=0))
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), **kw).logits.float().numpy()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(GPT2LMHeadModel with random weights, its save_pretrained directory)."""
  torch.manual_seed(0)
  model = _randomise(transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_KW)), seed=1).eval()
  d = tmp_path_factory.mktemp("hf_gpt2")
  model.save_pretrained(d)
  return model, d


@pytest.fixture(scope="module")
def loaded(hf):
  return load(hf[1])


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(0, HF_KW["vocab_size"], (b, t)).astype(np.int32)


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _random_params(cfg, seed):
  """Params in gpt.init's layout with every leaf random (LN scales near 1); built from the
  abstract shapes, so no (slow, eager) initialiser runs."""
  shapes = jax.eval_shape(lambda k: gpt.init(cfg, k), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    x = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _copy_with_config(src, dst, **changes):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  cfg.update(changes)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


# ------------------------------------------------------------------ import
def test_config_mapping(loaded):
  cfg, params = loaded
  assert cfg == GPTConfig(vocab_size=211, max_len=64, n_layer=3, n_head=4, d_model=96, d_ff=200,
                          pre_ln=True, dropout=0.05, ln_eps=3e-5, init_std=0.03)
  assert cfg.d_head == 24
  assert params["blocks"]["attn"]["q_kernel"].shape == (3, 96, 4, 24)
  assert params["blocks"]["attn"]["kv_kernel"].shape == (3, 96, 2, 4, 24)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_config_defaults_are_gpt2_small():
  # A config.json that omits fields means transformers' GPT2Config defaults: GPT-2 small.
  cfg = config_from_hf({"model_type": "gpt2", "n_inner": None})
  small = preset("gpt2")
  for field in ("vocab_size", "max_len", "n_layer", "n_head", "d_model", "d_head", "d_mlp", "pre_ln"):
    assert getattr(cfg, field) == getattr(small, field), field
  assert (cfg.dropout, cfg.ln_eps, cfg.dtype) == (0.1, 1e-5, "float32")


def test_logits_match_transformers(hf, loaded):
  model, _ = hf
  cfg, params = loaded
  tokens = _tokens(3, 64)  # full context: every position row is used
  ref = _hf_logits(model, tokens)
  ours = np.asarray(_logits(params, cfg, tokens))
  diff = np.abs(ours - ref).max()
  print(f"max |logit diff| = {diff:.3g} (logit scale {np.abs(ref).max():.3g})")
  assert np.abs(ref).std() > 0.5  # logits are far from zero, so the tolerance is meaningful
  assert diff < TOL


def test_left_padding_matches_transformers(hf, loaded):
  model, _ = hf
  cfg, params = loaded
  tokens = _tokens(3, 20, seed=1)
  mask = np.ones_like(tokens)
  for row, pad in enumerate((0, 5, 12)):
    mask[row, :pad] = 0
    tokens[row, :pad] = 0
  ref = _hf_logits(model, tokens, mask)
  ours = np.asarray(_logits(params, cfg, tokens, attention_mask=mask))
  real = mask.astype(bool)
  diff = np.abs(ours[real] - ref[real]).max()
  print(f"left padding: max |logit diff| on real tokens = {diff:.3g}")
  assert diff < TOL


def test_bin_checkpoints_with_and_without_prefix(hf, loaded, tmp_path):
  model, src = hf
  # GPT2LMHeadModel layout: "transformer." prefix and the tied lm_head.weight.
  with_prefix = tmp_path / "lm"
  with_prefix.mkdir()
  shutil.copy(src / "config.json", with_prefix)
  sd = model.state_dict()
  assert "lm_head.weight" in sd
  torch.save(sd, with_prefix / "pytorch_model.bin")
  # GPT2Model layout as in the original OpenAI release: no prefix, plus attention buffers.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(src / "config.json", bare)
  sd = dict(model.transformer.state_dict())
  causal = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
  for i in range(HF_KW["n_layer"]):
    sd[f"h.{i}.attn.bias"] = causal
    sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  torch.save(sd, bare / "pytorch_model.bin")
  for d in (with_prefix, bare):
    cfg, params = load(d)
    assert cfg == loaded[0]
    _assert_same_params(params, loaded[1])


def test_sharded_safetensors(hf, loaded, tmp_path):
  model, src = hf
  from safetensors.torch import save_file
  d = tmp_path / "sharded"
  d.mkdir()
  shutil.copy(src / "config.json", d)
  sd = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: sd[k] for k in keys}, d / fname, metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  _assert_same_params(load(d)[1], loaded[1])
  (d / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*model\.safetensors\.index\.json"):
    load(d)


def test_bfloat16_safetensors(hf, tmp_path):
  model, src = hf
  d = tmp_path / "bf16"
  d.mkdir()
  shutil.copy(src / "config.json", d)
  from safetensors.torch import save_file
  sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.transformer.state_dict().items()}
  save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
  cfg, params = load(d, dtype="bfloat16")
  assert cfg.dtype == "bfloat16"
  np.testing.assert_array_equal(np.asarray(params["wte"]), sd["wte.weight"].float().numpy())
  want = sd["h.2.attn.c_attn.weight"].float().numpy().reshape(96, 3, 4, 24)
  np.testing.assert_array_equal(np.asarray(params["blocks"]["attn"]["q_kernel"][2]), want[:, 0])
  np.testing.assert_array_equal(np.asarray(params["blocks"]["attn"]["kv_kernel"][2]), want[:, 1:])
  assert params["wte"].dtype == np.float32


# ------------------------------------------------------------------ export
def test_export_round_trip(hf, loaded, tmp_path):
  model, _ = hf
  cfg, params = loaded
  out = save(cfg, params, tmp_path / "export")
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ref_sd, got_sd = model.state_dict(), back.state_dict()
  assert set(ref_sd) == set(got_sd)
  for k in ref_sd:
    assert torch.equal(ref_sd[k], got_sd[k]), k
  tokens = _tokens(2, 33, seed=2)
  assert np.abs(_hf_logits(back, tokens) - _hf_logits(model, tokens)).max() < TOL
  cfg2, params2 = load(out)
  assert cfg2 == cfg
  _assert_same_params(params2, params)


def test_export_of_native_params_matches_our_logits(tmp_path):
  cfg = GPTConfig(vocab_size=97, max_len=32, n_layer=2, n_head=3, d_model=48, ln_eps=1e-5, dropout=0.0)
  params = _random_params(cfg, seed=3)
  out = save(cfg, params, tmp_path / "native")
  hf_cfg = json.loads((out / "config.json").read_text())
  assert hf_cfg["n_inner"] == 4 * 48 and hf_cfg["eos_token_id"] is None
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  tokens = np.random.default_rng(5).integers(0, 97, (2, 32)).astype(np.int32)
  diff = np.abs(_hf_logits(back, tokens) - np.asarray(_logits(params, cfg, tokens))).max()
  assert diff < TOL


def test_export_rejects_configs_gpt2_cannot_express(tmp_path):
  post_ln = GPTConfig(vocab_size=50, max_len=16, n_layer=1, n_head=2, d_model=16, pre_ln=False)
  with pytest.raises(ValueError, match="post-LN"):
    save(post_ln, _random_params(post_ln, 0), tmp_path / "a")
  wide = GPTConfig(vocab_size=50, max_len=16, n_layer=1, n_head=2, d_model=16, head_dim=12)
  with pytest.raises(ValueError, match="head_dim"):
    save(wide, _random_params(wide, 0), tmp_path / "b")
  ok = GPTConfig(vocab_size=50, max_len=16, n_layer=1, n_head=2, d_model=16)
  params = _random_params(ok, 0)
  with pytest.raises(ValueError, match=r"wpe.*shape \(8, 16\)"):
    save(ok, {**params, "wpe": params["wpe"][:8]}, tmp_path / "c")
  assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_model_type_must_match_the_architecture(hf, tmp_path, model_type):
  d = _copy_with_config(hf[1], tmp_path / model_type, model_type=model_type)
  with pytest.raises(ValueError, match=rf"config\.json: model_type is '{model_type}', but architectures"):
    load(d)


def test_missing_weights_and_config(hf, tmp_path):
  d = tmp_path / "no_weights"
  d.mkdir()
  shutil.copy(hf[1] / "config.json", d)
  with pytest.raises(FileNotFoundError, match=rf"{d}: no weights found"):
    load(d)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load(tmp_path / "absent")


@pytest.mark.parametrize("changes, match", [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(add_cross_attention=True), "add_cross_attention"),
])
def test_unsupported_gpt2_variants(hf, tmp_path, changes, match):
  d = _copy_with_config(hf[1], tmp_path / "variant", **changes)
  with pytest.raises(ValueError, match=match):
    load(d)


def test_tanh_gelu_aliases_accepted(hf, loaded, tmp_path):
  d = _copy_with_config(hf[1], tmp_path / "alias", activation_function="gelu_pytorch_tanh")
  _assert_same_params(load(d)[1], loaded[1])


def _write_safetensors(model, d, edit):
  from safetensors.torch import save_file
  shutil.copy(model[1] / "config.json", d)
  sd = {k: v.clone() for k, v in model[0].state_dict().items()}
  edit(sd)
  save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_bad_tensors_are_named(hf, loaded, tmp_path):
  cases = {
      "shape": (lambda sd: sd.__setitem__("transformer.h.1.mlp.c_fc.bias", torch.zeros(7)),
                ValueError, r"'h\.1\.mlp\.c_fc\.bias' has shape \(7,\), expected \(200,\)"),
      "missing": (lambda sd: sd.pop("transformer.h.2.ln_2.weight"),
                  ValueError, r"'h\.2\.ln_2\.weight' is missing"),
      "untied": (lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"] + 1),
                 ValueError, "untied"),
      "extra": (lambda sd: sd.__setitem__("score.weight", torch.zeros(2, 96)),
                ValueError, r"score\.weight.*strict=False"),
  }
  for name, (edit, exc, match) in cases.items():
    d = tmp_path / name
    d.mkdir()
    _write_safetensors(hf, d, edit)
    with pytest.raises(exc, match=match):
      load(d)
  # A reward model's extra head can be skipped on request; the LM weights still load exactly.
  _assert_same_params(load(tmp_path / "extra", strict=False)[1], loaded[1])
