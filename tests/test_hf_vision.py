"""SigLIP vision towers from Hugging Face directories (issue 15): `hf_vision.load_vision_tower` /
`save_vision_tower` against transformers' SiglipVisionModel / SiglipModel on random-init tiny
models built offline."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.model import hf_vision, vit  # noqa: E402

TOWER = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, num_channels=3, layer_norm_eps=1e-6)
TEXT = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
TOL = 1e-5
_encode = jax.jit(vit.encode, static_argnums=(1,))


def _randomize(model, seed):
  """Every parameter random (HF's init leaves biases and LayerNorms at 0 / 1), so each mapping counts."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = 0.2 * torch.randn(p.shape, generator=g)
      p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
  return model.eval()


def _images(b=3, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 1.0, (b, 32, 32, 3)).astype(np.float32)


def _hf_out(model, images):
  """transformers' last_hidden_state for [0, 1] NHWC images (normalised as SiglipImageProcessor does)."""
  pixels = torch.from_numpy((images.transpose(0, 3, 1, 2) - 0.5) / 0.5)
  with torch.no_grad():
    return model(pixel_values=pixels).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A SiglipVisionModel dir, a SiglipModel dir with the same tower, a head-carrying tower, the
  torch models and their outputs on a fixed batch."""
  root = tmp_path_factory.mktemp("siglip")
  torch.manual_seed(0)
  tower = _randomize(transformers.SiglipVisionModel(
      transformers.SiglipVisionConfig(**TOWER, vision_use_head=False)), 1)
  tower.save_pretrained(root / "tower")
  full = transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=dict(TOWER, vision_use_head=False), text_config=TEXT))
  full.vision_model.load_state_dict(tower.state_dict())
  full.save_pretrained(root / "full")
  headed = _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)), 2)
  headed.save_pretrained(root / "headed")
  images = _images()
  return {"root": root, "tower": tower, "headed": headed, "images": images,
          "ref": _hf_out(tower, images), "ref_headed": _hf_out(headed, images)}


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_parity_with_transformers(dirs):
  cfg, params = hf_vision.load_vision_tower(dirs["root"] / "tower")
  assert cfg == vit.ViTConfig(image_size=32, patch_size=8, channels=3, d_model=32, n_layer=2, n_head=4,
                              d_ff=64, pool="none", ln_eps=1e-6, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)
  out = _encode(params, cfg, jnp.asarray(dirs["images"]))
  assert out.shape == dirs["ref"].shape == (3, 16, 32)
  err = _max_err(out, dirs["ref"])
  print(f"siglip last_hidden_state max abs err {err:.2e}")
  assert err < TOL, err


def test_full_siglip_model_loads_the_same_tower(dirs):
  cfg, params = hf_vision.load_vision_tower(dirs["root"] / "tower")
  cfg_full, params_full = hf_vision.load_vision_tower(dirs["root"] / "full")
  assert cfg_full == cfg
  jax.tree.map(np.testing.assert_array_equal, params_full, params)


def test_head_is_refused_or_dropped(dirs):
  with pytest.raises(ValueError, match=r"config\.json: vision_use_head=true.*drop_head=True"):
    hf_vision.load_vision_tower(dirs["root"] / "headed")
  cfg, params = hf_vision.load_vision_tower(dirs["root"] / "headed", drop_head=True)
  assert _max_err(_encode(params, cfg, jnp.asarray(dirs["images"])), dirs["ref_headed"]) < TOL


def test_save_loads_in_transformers(dirs, tmp_path):
  """Our random ViT (MLP width no multiple of D, per-channel normalisation) -> SiglipVisionModel."""
  cfg = vit.ViTConfig(image_size=32, patch_size=8, d_model=32, n_layer=2, n_head=4, d_ff=48,
                      pixel_mean=(0.4, 0.5, 0.6), pixel_std=(0.2, 0.3, 0.25))
  leaves, tree = jax.tree.flatten(vit.init(cfg, jax.random.key(3)))
  keys = jax.random.split(jax.random.key(4), len(leaves))          # non-zero biases, non-unit norms
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  d = hf_vision.save_vision_tower(cfg, params, tmp_path / "ours")
  model, info = transformers.SiglipVisionModel.from_pretrained(d, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  pre = json.loads((d / hf_vision.PREPROCESSOR_NAME).read_text())
  images = dirs["images"]
  pixels = (images - np.asarray(pre["image_mean"], np.float32)) / np.asarray(pre["image_std"], np.float32)
  with torch.no_grad():
    ref = model.eval()(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  assert _max_err(_encode(params, cfg, jnp.asarray(images)), ref) < TOL
  cfg2, params2 = hf_vision.load_vision_tower(d)                              # and back
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params)
  processor = transformers.AutoImageProcessor.from_pretrained(d)              # the written preprocessor
  img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  got = processor(images=[img], return_tensors="np")["pixel_values"]
  want = np.asarray(vit.normalize(jnp.asarray(img[None] / 255.0, jnp.float32), cfg)).transpose(0, 3, 1, 2)
  assert _max_err(got, want) < 1e-6


def test_preprocessor_config_is_read(dirs, tmp_path):
  d = _copy(dirs, tmp_path)
  pre = {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25,
         "do_rescale": True, "rescale_factor": 1 / 255}
  (d / hf_vision.PREPROCESSOR_NAME).write_text(json.dumps(pre))
  cfg, _ = hf_vision.load_vision_tower(d)
  assert cfg.pixel_mean == (0.1, 0.2, 0.3) and cfg.pixel_std == (0.25,) * 3
  (d / hf_vision.PREPROCESSOR_NAME).write_text(json.dumps({**pre, "do_normalize": False}))
  assert hf_vision.load_vision_tower(d)[0].pixel_mean == ()
  (d / hf_vision.PREPROCESSOR_NAME).write_text(json.dumps({**pre, "do_rescale": False}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: do_rescale=False"):
    hf_vision.load_vision_tower(d)
  (d / hf_vision.PREPROCESSOR_NAME).write_text(json.dumps({**pre, "image_mean": [0.5, 0.5]}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: image_mean has 2 entries"):
    hf_vision.load_vision_tower(d)


def test_loaded_tower_saves_back_unchanged(dirs, tmp_path):
  cfg, params = hf_vision.load_vision_tower(dirs["root"] / "tower")
  model = transformers.SiglipVisionModel.from_pretrained(hf_vision.save_vision_tower(cfg, params, tmp_path / "t"))
  want = dirs["tower"].state_dict()
  got = model.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def _copy(dirs, tmp_path, name="tower"):
  d = tmp_path / name
  shutil.copytree(dirs["root"] / name, d)
  return d


def _edit_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
  from safetensors.numpy import load_file, save_file
  tensors = fn(load_file(str(d / "model.safetensors")))
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_bad_directories(dirs, tmp_path):
  load = hf_vision.load_vision_tower
  d = _copy(dirs, tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load(d)

  d = _copy(dirs, tmp_path / "a")
  _edit_config(d, model_type="clip_vision_model")
  with pytest.raises(ValueError, match=r"config\.json: model_type 'clip_vision_model'.*\['siglip_vision_model', "
                                       r"'siglip'\]"):
    load(d)
  _edit_config(d, model_type="siglip_vision_model", hidden_act="quick_gelu")
  with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
    load(d)
  _edit_config(d, hidden_act="gelu_pytorch_tanh", image_size=30)
  with pytest.raises(ValueError, match="patch_size=8 does not divide image_size=30"):
    load(d)
  _edit_config(d, image_size=[32, 16])
  with pytest.raises(ValueError, match=r"image_size=\[32, 16\] is not square"):
    load(d)

  d = _copy(dirs, tmp_path / "b")
  _edit_weights(d, lambda t: {k: v for k, v in t.items() if k != "encoder.layers.1.mlp.fc2.bias"})
  with pytest.raises(ValueError, match=r"tensor 'encoder\.layers\.1\.mlp\.fc2\.bias' is missing"):
    load(d)

  d = _copy(dirs, tmp_path / "c")
  _edit_weights(d, lambda t: {**t, "embeddings.position_embedding.weight": np.zeros((9, 32), np.float32)})
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'embeddings\.position_embedding\.weight' has "
                                       r"shape \(9, 32\), expected \(16, 32\)"):
    load(d)

  d = _copy(dirs, tmp_path / "d")
  _edit_weights(d, lambda t: {**t, "head.probe": np.zeros((1, 1, 32), np.float32)})
  with pytest.raises(ValueError, match=r"model\.safetensors: holds SigLIP's attention-pooling head.*drop_head"):
    load(d)
  assert load(d, drop_head=True)[0].d_model == 32

  d = _copy(dirs, tmp_path / "e")
  _edit_weights(d, lambda t: {**t, "extra.weight": np.zeros((2,), np.float32)})
  with pytest.raises(ValueError, match=r"1 tensor\(s\) are not part of a SigLIP vision tower: \['extra\.weight'\]"):
    load(d)
  assert load(d, strict=False)[0].d_model == 32


def test_save_refusals(tmp_path):
  cfg = vit.ViTConfig(pool="mean")
  with pytest.raises(ValueError, match="pool='mean' has no SiglipVisionModel counterpart"):
    hf_vision.save_vision_tower(cfg, vit.init(cfg, jax.random.key(0)), tmp_path / "m")
  cfg = vit.ViTConfig()
  params = vit.init(cfg, jax.random.key(0))
  params["pos"] = params["pos"][:3]
  with pytest.raises(ValueError, match=r"save_vision_tower: param \['pos'\] has shape \(3, 64\), expected \(16, 64\)"):
    hf_vision.save_vision_tower(cfg, params, tmp_path / "p")


def test_vit_config_defaults_unchanged():
  """The new ViTConfig fields default to the old behaviour: no normalisation, F = mlp_ratio * D."""
  cfg = vit.ViTConfig(mlp_ratio=2)
  assert cfg.block_config().d_mlp == 2 * cfg.d_model and cfg.pixel_mean == cfg.pixel_std == ()
  x = jnp.asarray(_images(2))
  assert vit.normalize(x, cfg) is x
  assert vit.ViTConfig(pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3).pixel_mean == (0.5, 0.5, 0.5)   # JSON lists
  with pytest.raises(ValueError, match="pixel_mean and pixel_std"):
    vit.ViTConfig(pixel_mean=(0.5,), pixel_std=(0.5,))
  with pytest.raises(ValueError, match="pixel_std must be positive"):
    vit.ViTConfig(pixel_mean=(0.5,) * 3, pixel_std=(0.5, 0.0, 0.5))


def test_vision_recipe_starts_from_an_hf_tower(dirs, tmp_path):
  """experiments/vision_tiny.py --config.vit_from=DIR: the VLM's encoder is the SigLIP tower."""
  import ml_collections as mlc
  from rlhf_jax.recipes import vision
  cfg, params = hf_vision.load_vision_tower(dirs["root"] / "tower")
  got_cfg, got = vision.vision_tower(mlc.ConfigDict({"vit_from": str(dirs["root"] / "tower")}))
  assert got_cfg == cfg
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  big = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TOWER, "image_size": 64},
                                                                       vision_use_head=False))
  big.save_pretrained(tmp_path / "big")
  with pytest.raises(ValueError, match="image world draws 32x32x3"):
    vision.vision_tower(mlc.ConfigDict({"vit_from": str(tmp_path / "big")}))
