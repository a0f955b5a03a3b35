"""Hugging Face SigLIP vision towers <-> our ViT (`vit.py`) params.

Reads a directory holding a `SiglipVisionModel` (config.json model_type "siglip_vision_model")
or a full `SiglipModel` (model_type "siglip": the tower's settings are its `vision_config`, the
text tower and logit_scale / logit_bias are skipped). Weights come from model.safetensors (or the
other layouts `hf.py` reads), with or without the `vision_model.` prefix (transformers 4 writes
it for both classes, transformers 5 drops it for SiglipVisionModel). The result computes
SiglipVisionModel's `last_hidden_state` with `vit.encode` (pool="none": every patch is an image
token). SigLIP's attention-pooling head (vision_use_head, the tensors `head.*`) has no
counterpart in ViTConfig: it is refused, or skipped with drop_head=True (last_hidden_state does
not depend on it). CLIP towers (class token, pre-LayerNorm, quick_gelu) are not supported.

The image processor's normalisation (x - image_mean) / image_std of [0, 1] images becomes
ViTConfig.pixel_mean / pixel_std: read from preprocessor_config.json when the directory has one,
else SiglipImageProcessor's defaults (0.5 / 0.5 per channel).

Name mapping (names relative to `vision_model.`; `{i}` stacks on our leading layer axis; torch
Linear weights are [out, in]: transposed):
  embeddings.patch_embedding.weight [D,C,p,p]  <-> patch_kernel [p*p*C, D] (rows (p_row, p_col, C),
                                                   `vit.patchify`'s order), .bias <-> patch_bias
  embeddings.position_embedding.weight [N,D]   <-> pos
  encoder.layers.{i}.layer_norm1 / layer_norm2 <-> blocks.ln1 / ln2 {scale, bias}
  encoder.layers.{i}.self_attn.q_proj          <-> blocks.attn.q_kernel [D,H,Dh], q_bias [H,Dh]
  encoder.layers.{i}.self_attn.k_proj + v_proj <-> blocks.attn.kv_kernel [D,2,H,Dh], kv_bias
  encoder.layers.{i}.self_attn.out_proj        <-> blocks.attn.out_kernel [H,Dh,D], out_bias
  encoder.layers.{i}.mlp.fc1 / fc2             <-> blocks.mlp.fc_* / proj_*
  post_layernorm                               <-> ln_f {scale, bias}
SigLIP's encoder layer is `layers.Block` exactly: pre-LN LayerNorm with biases, q/k/v/out biases,
softmax(q k^T / sqrt(Dh)), gelu_pytorch_tanh MLP with biases.

Public API:
  load_vision_tower(path, dtype=None, drop_head=False, strict=True) -> (ViTConfig, vit params)
  save_vision_tower(config, params, path) -> Path (a SiglipVisionModel directory)
  vision_config_from_hf(hf_config, source, dtype=None, drop_head=False, preprocessor=None,
                        preprocessor_source) -> ViTConfig
  vision_config_to_hf(config) -> dict (the SiglipVisionModel config.json)
  SUPPORTED_MODEL_TYPES
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from rlhf_jax.model import hf, vit

log = logging.getLogger(__name__)

PREPROCESSOR_NAME = "preprocessor_config.json"
SUPPORTED_MODEL_TYPES = ("siglip_vision_model", "siglip")
_PREFIX = "vision_model."
_SIGLIP_MEAN = _SIGLIP_STD = 0.5
# transformers' SiglipVisionConfig defaults for keys a config.json may omit.
_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                 layer_norm_eps=1e-6, vision_use_head=True)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")   # both are the tanh GELU `layers.MLP` computes
# Parts of a full SiglipModel that are not the vision tower (names as they appear in the file).
_OTHER_TOWER = ("text_model.", "logit_scale", "logit_bias")


# ---------------------------------------------------------------- config
def _square(v, key: str, source: str) -> int:
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f"{source}: {key}={list(v)!r} is not square; ViTConfig needs square images and patches")
    v = v[0]
  if not isinstance(v, int) or isinstance(v, bool):
    raise ValueError(f"{source}: {key} must be an integer, got {v!r}")
  return v


def _vision_section(hf_cfg: Mapping[str, Any], source: str) -> tuple[dict, str]:
  """(the vision tower's config dict, where it sits in the file) for a supported model_type."""
  model_type = hf_cfg.get("model_type")
  if model_type == "siglip_vision_model":
    return dict(hf_cfg), source
  if model_type == "siglip":
    section = hf_cfg.get("vision_config") or {}
    if not isinstance(section, Mapping):
      raise ValueError(f"{source}: vision_config must be an object, got {type(section).__name__}")
    inner = section.get("model_type", "siglip_vision_model")
    if inner != "siglip_vision_model":
      raise ValueError(f"{source}: vision_config.model_type is {inner!r}, expected 'siglip_vision_model'")
    return dict(section), f"{source} (vision_config)"
  raise ValueError(f"{source}: model_type {model_type!r} is not a supported vision tower; supported "
                   f"model_types: {list(SUPPORTED_MODEL_TYPES)}")


def _pixel_stats(preprocessor: Mapping[str, Any] | None, channels: int, source: str):
  """(pixel_mean, pixel_std) tuples for ViTConfig from a preprocessor_config.json dict (or None)."""
  if preprocessor is None:
    return (_SIGLIP_MEAN,) * channels, (_SIGLIP_STD,) * channels
  rescale = preprocessor.get("rescale_factor", 1 / 255)
  if not preprocessor.get("do_rescale", True) or abs(float(rescale) - 1 / 255) > 1e-9:
    raise ValueError(f"{source}: do_rescale={preprocessor.get('do_rescale', True)}, rescale_factor={rescale}: "
                     "the processor must map 0..255 to [0, 1] (do_rescale true, rescale_factor 1/255), the "
                     "range `vit.encode` takes")
  if not preprocessor.get("do_normalize", True):
    return (), ()
  stats = []
  for key, default in (("image_mean", _SIGLIP_MEAN), ("image_std", _SIGLIP_STD)):
    v = preprocessor.get(key, default)
    v = [v] * channels if isinstance(v, (int, float)) else list(v)
    if len(v) != channels:
      raise ValueError(f"{source}: {key} has {len(v)} entries, the model has num_channels={channels}")
    stats.append(tuple(float(x) for x in v))
  return stats[0], stats[1]


def vision_config_from_hf(hf_cfg: Mapping[str, Any], source: str = "config.json", dtype=None,
                          drop_head: bool = False, preprocessor: Mapping[str, Any] | None = None,
                          preprocessor_source: str = PREPROCESSOR_NAME) -> vit.ViTConfig:
  """A SiglipVisionConfig / SiglipConfig dict (and optionally the preprocessor_config.json dict)
  -> the ViTConfig computing its last_hidden_state from [0, 1] images."""
  v, where = _vision_section(hf_cfg, source)
  v = {**_DEFAULTS, **{k: val for k, val in v.items() if val is not None}}
  act = v["hidden_act"]
  if act not in _TANH_GELUS:
    raise ValueError(f"{where}: hidden_act={act!r} is not supported; our MLP computes the tanh GELU "
                     f"({list(_TANH_GELUS)})")
  if v["vision_use_head"] and not drop_head:
    raise ValueError(f"{where}: vision_use_head=true: SigLIP's attention-pooling head (head.*) has no "
                     "counterpart in ViTConfig (we keep all patches: pool='none' = last_hidden_state); "
                     "pass drop_head=True to load the tower without it")
  image, patch = _square(v["image_size"], "image_size", where), _square(v["patch_size"], "patch_size", where)
  d, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
  if image % patch:
    raise ValueError(f"{where}: patch_size={patch} does not divide image_size={image} (transformers "
                     "drops the remainder; ViTConfig needs it exact)")
  if d % heads:
    raise ValueError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={heads}")
  channels = int(v["num_channels"])
  mean, std = _pixel_stats(preprocessor, channels, preprocessor_source)
  return vit.ViTConfig(image_size=image, patch_size=patch, channels=channels, d_model=d,
                       n_layer=int(v["num_hidden_layers"]), n_head=heads, d_ff=int(v["intermediate_size"]),
                       pool="none", ln_eps=float(v["layer_norm_eps"]), dtype=dtype or "float32",
                       pixel_mean=mean, pixel_std=std)


def vision_config_to_hf(config) -> dict:
  """ViTConfig -> a SiglipVisionModel config.json dict (refuses what that class cannot express)."""
  cfg = vit._as_config(config)
  if cfg.pool != "none":
    raise ValueError(f"save_vision_tower: pool={cfg.pool!r} has no SiglipVisionModel counterpart "
                     "(its last_hidden_state keeps all patches: pool='none')")
  return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
          "hidden_size": cfg.d_model, "intermediate_size": cfg.block_config().d_mlp,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "num_channels": cfg.channels, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": cfg.ln_eps, "attention_dropout": 0.0,
          "vision_use_head": False, "dtype": "float32"}


def _preprocessor_to_hf(cfg: vit.ViTConfig) -> dict:
  """SiglipImageProcessor settings whose output (resize, /255, normalise) is what `encode` sees."""
  out = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "resample": 3,
         "size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": bool(cfg.pixel_mean), "do_convert_rgb": cfg.channels == 3}
  if cfg.pixel_mean:
    out.update(image_mean=list(cfg.pixel_mean), image_std=list(cfg.pixel_std))
  return out


# ---------------------------------------------------------------- name table
def _patch_row(cfg: vit.ViTConfig) -> hf._Row:
  """Conv2d weight [D,C,p,p] <-> patch_kernel [p*p*C, D] with rows in (p_row, p_col, C) order."""
  d, c, p = cfg.d_model, cfg.channels, cfg.patch_size
  return hf._Row(("embeddings.patch_embedding.weight",), ((d, c, p, p),), (("patch_kernel",),),
                 lambda w: (w.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
                 lambda k: (k.reshape(p, p, c, d).transpose(3, 2, 0, 1),))


def _rows(cfg: vit.ViTConfig) -> list:
  d, h, n, f = cfg.d_model, cfg.n_head, cfg.num_patches, cfg.block_config().d_mlp
  dh = d // h
  blk = lambda *p: ("blocks",) + p
  rows = [_patch_row(cfg),
          hf._reshape("embeddings.patch_embedding.bias", (d,), ("patch_bias",), (d,)),
          hf._reshape("embeddings.position_embedding.weight", (n, d), ("pos",), (n, d)),
          hf._reshape("post_layernorm.weight", (d,), ("ln_f", "scale"), (d,)),
          hf._reshape("post_layernorm.bias", (d,), ("ln_f", "bias"), (d,))]
  pre = "encoder.layers.{i}."
  att = pre + "self_attn."
  for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
    rows += [hf._reshape(f"{pre}{theirs}.weight", (d,), blk(ours, "scale"), (d,)),
             hf._reshape(f"{pre}{theirs}.bias", (d,), blk(ours, "bias"), (d,))]
  rows += [hf._linear(att + "q_proj.weight", blk("attn", "q_kernel"), (d,), (h, dh)),
           hf._reshape(att + "q_proj.bias", (d,), blk("attn", "q_bias"), (h, dh))]
  rows += hf._kv_rows(att, d, h, dh, True)
  rows += [hf._linear(att + "out_proj.weight", blk("attn", "out_kernel"), (h, dh), (d,)),
           hf._reshape(att + "out_proj.bias", (d,), blk("attn", "out_bias"), (d,))]
  for theirs, ours, n_in, n_out in (("fc1", "fc", d, f), ("fc2", "proj", f, d)):
    rows += [hf._linear(f"{pre}mlp.{theirs}.weight", blk("mlp", ours + "_kernel"), (n_in,), (n_out,)),
             hf._reshape(f"{pre}mlp.{theirs}.bias", (n_out,), blk("mlp", ours + "_bias"), (n_out,))]
  return rows


def _check_layout(cfg: vit.ViTConfig, params, what: str) -> None:
  want = jax.eval_shape(lambda k: vit.init(cfg, k), jax.random.key(0))
  hf._check_tree(want, params, what, cfg)


# ---------------------------------------------------------------- load / save
def load_vision_tower(path, dtype=None, drop_head: bool = False, strict: bool = True):
  """Imports a SiglipVisionModel / SiglipModel directory's vision tower.

  dtype: compute dtype stored in the returned config (None -> "float32").
  drop_head: skip SigLIP's attention-pooling head (vision_use_head=true, as the released
    checkpoints have) instead of refusing it; `encode` never computes it.
  strict: if False, other tensors outside the tower are skipped (logged) instead of an error.
  Returns (ViTConfig with pool="none", params laid out as `vit.init`'s, float32), where
  `vit.encode(params, cfg, images)` on [0, 1] images [B,H,W,C] equals transformers'
  last_hidden_state on the processor's pixel_values.
  """
  directory, cfg_file, hf_cfg = hf._read_config(path, "load_vision_tower")
  pre_file = directory / PREPROCESSOR_NAME
  preprocessor = hf._read_json(pre_file) if pre_file.is_file() else None
  cfg = vision_config_from_hf(hf_cfg, str(cfg_file), dtype, drop_head, preprocessor, str(pre_file))
  ckpt = hf._Checkpoint(directory, cfg_file, _PREFIX)
  params = hf._params_from_rows(ckpt, _rows(cfg), cfg.n_layer)
  head = sorted(n for n in ckpt.tensors if n.startswith("head."))
  if head and not drop_head:
    raise ValueError(f"{ckpt.where(head[0])}: holds SigLIP's attention-pooling head ({head[0]!r}, ...) "
                     f"although {cfg_file} has vision_use_head=false; pass drop_head=True to skip it")
  skipped = [n for n in ckpt.tensors if n.startswith(_OTHER_TOWER) or n.endswith("position_ids")]
  ckpt.used.update(skipped + head)
  if head:
    log.info("%s: skipped SigLIP's attention-pooling head (%d tensors)", directory, len(head))
  ckpt.check_leftover(strict, "a SigLIP vision tower")
  _check_layout(cfg, params, f"load_vision_tower({directory})")
  return cfg, jax.tree.map(jnp.asarray, params)


def save_vision_tower(config, params, path) -> Path:
  """Writes config.json + model.safetensors (+ preprocessor_config.json with the config's pixel
  normalisation) that `SiglipVisionModel.from_pretrained` / `AutoImageProcessor` load.

  Tensors carry the `vision_model.` prefix, which transformers 4 and 5 both load. The config
  must have pool="none". Returns the directory.
  """
  cfg = vit._as_config(config)
  hf_cfg = vision_config_to_hf(cfg)
  host = hf._to_host(params)
  _check_layout(cfg, host, "save_vision_tower")
  directory = hf._write(path, hf._tensors_from_rows(_rows(cfg), host, cfg.n_layer, _PREFIX), hf_cfg)
  with open(directory / PREPROCESSOR_NAME, "w") as f:
    json.dump(_preprocessor_to_hf(cfg), f, indent=2, sort_keys=True)
    f.write("\n")
  return directory
