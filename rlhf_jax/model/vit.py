"""Vision Transformer (ViT) image encoder and a LLaVA-style projector, as pure functions.

The transformer blocks are the decoder's own `layers.Block` (pre-LN LayerNorm, GELU MLP, biases),
built from a `GPTConfig` derived from the `ViTConfig` and run with a full (bidirectional) mask and
no RoPE; so the blocks' parameters carry the decoder's logical axis names and shard by the same
rules table (`rlhf_jax.parallel.DEFAULT_RULES`) on the same mesh.

Params layout (C = channels, p = patch_size, N = (image_size / p)**2 patches, D = d_model,
F = d_ff or mlp_ratio * D, L = n_layer; logical axis names in parentheses):
  patch_kernel [p*p*C, D]   (None, "embed")       patch embedding (a dense over flattened patches,
                                                  rows in `patchify`'s (p_row, p_col, C) order)
  patch_bias   [D]          ("embed",)
  pos          [N, D]       (None, "embed")       learned position embeddings
  blocks       `layers.Block` params with a leading [L] ("layers",): ln1, attn, ln2, mlp
  ln_f         {"scale","bias" [D]}  ("norm",)
Projector params (`init_projector`; D_model = the decoder's width, hidden width = D_model):
  fc_kernel   [D, D_model]       ("embed", "mlp"),   fc_bias   [D_model] ("mlp",)
  proj_kernel [D_model, D_model] ("mlp", "embed"),   proj_bias [D_model] ("embed",)

Public API:
  ViTConfig, init(config, rng), param_axes(config), patchify(images, patch_size), normalize(images, config),
  encode(params, config, images) -> [B,N,D] (pool="none") or [B,1,D] (pool="mean"),
  init_projector(vit_config, d_model, rng), projector_axes(), project(params, embeds) -> [B,P,D_model].
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.model.config import GPTConfig, from_fields
from rlhf_jax.model.layers import Block, dense, layer_norm

_WHERE = "rlhf_jax/model/vit.py"
Params = dict[str, Any]
POOLS = ("none", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Image encoder settings (frozen, so a jit static argument).

  image_size: square images of image_size x image_size pixels, `channels` channels;
  patch_size must divide image_size. pool: "none" keeps all N patches as image tokens,
  "mean" averages them into one token. d_ff: MLP width (0 -> mlp_ratio * d_model; SigLIP
  so400m's 4304 is no multiple of 1152). pixel_mean / pixel_std: per-channel input normalisation
  (x - mean) / std applied to the [0, 1] images inside `encode` (SigLIP's processor: 0.5 / 0.5,
  `hf_vision.load_vision_tower`); both empty (the default) = no normalisation.
  """
  image_size: int = 32
  patch_size: int = 8
  channels: int = 3
  d_model: int = 64
  n_layer: int = 2
  n_head: int = 4
  mlp_ratio: int = 4
  pool: str = "none"
  ln_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = "float32"
  d_ff: int = 0
  pixel_mean: tuple[float, ...] = ()
  pixel_std: tuple[float, ...] = ()

  def __post_init__(self):
    for name in ("pixel_mean", "pixel_std"):   # JSON (stage.json) gives lists: keep the config hashable
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if min(self.image_size, self.patch_size, self.channels, self.d_model, self.n_layer, self.n_head,
           self.mlp_ratio) < 1:
      raise ValueError(f"{_WHERE}: ViTConfig sizes must be positive, got {self}")
    if self.image_size % self.patch_size:
      raise ValueError(f"{_WHERE}: ViTConfig.patch_size={self.patch_size} must divide "
                       f"image_size={self.image_size}")
    if self.d_model % self.n_head:
      raise ValueError(f"{_WHERE}: ViTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}")
    if self.pool not in POOLS:
      raise ValueError(f"{_WHERE}: ViTConfig.pool must be one of {POOLS}, got {self.pool!r}")
    if self.d_ff < 0:
      raise ValueError(f"{_WHERE}: ViTConfig.d_ff must be >= 0 (0 = mlp_ratio * d_model), got {self.d_ff}")
    if len(self.pixel_mean) != len(self.pixel_std) or len(self.pixel_mean) not in (0, self.channels):
      raise ValueError(f"{_WHERE}: ViTConfig.pixel_mean and pixel_std must both be empty or both have "
                       f"channels={self.channels} entries, got {self.pixel_mean} and {self.pixel_std}")
    if any(v <= 0 for v in self.pixel_std):
      raise ValueError(f"{_WHERE}: ViTConfig.pixel_std must be positive, got {self.pixel_std}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """Image tokens per image after pooling: num_patches (pool="none") or 1 (pool="mean")."""
    return 1 if self.pool == "mean" else self.num_patches

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  def block_config(self) -> GPTConfig:
    """The `GPTConfig` whose `layers.Block` is this encoder's block (GPT-2 style, no dropout)."""
    return GPTConfig(vocab_size=1, max_len=self.num_patches, n_layer=self.n_layer, n_head=self.n_head,
                     d_model=self.d_model, d_ff=self.d_ff or self.mlp_ratio * self.d_model, dropout=0.0,
                     ln_eps=self.ln_eps, init_std=self.init_std, dtype=self.dtype)


def _as_config(config) -> ViTConfig:
  if isinstance(config, ViTConfig):
    return config
  return from_fields(ViTConfig, dict(config), f"{_WHERE}: ViT config")


@functools.lru_cache(maxsize=16)
def _block_graph(cfg: ViTConfig):
  return nnx.split(nnx.eval_shape(lambda: Block(cfg.block_config(), nnx.Rngs(0))))


def init(config, rng) -> Params:
  """Random init: patch kernel N(0, init_std), positions N(0, init_std), blocks as `layers.Block`
  (residual projections scaled by 1/sqrt(2L)), final LayerNorm at scale 1 / bias 0. float32."""
  cfg = _as_config(config)
  k_patch, k_pos, k_blk = jax.random.split(rng, 3)
  bcfg = cfg.block_config()
  make_block = lambda k: nnx.to_pure_dict(nnx.split(Block(bcfg, nnx.Rngs(params=k)))[1])
  d = cfg.d_model
  return {
      "patch_kernel": cfg.init_std * jax.random.normal(k_patch, (cfg.patch_dim, d), jnp.float32),
      "patch_bias": jnp.zeros((d,), jnp.float32),
      "pos": cfg.init_std * jax.random.normal(k_pos, (cfg.num_patches, d), jnp.float32),
      "blocks": jax.vmap(make_block)(jax.random.split(k_blk, cfg.n_layer)),
      "ln_f": {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)},
  }


def param_axes(config) -> Params:
  """Logical axis names mirroring `init` (tuples as leaves), in the decoder's vocabulary."""
  cfg = _as_config(config)
  _, state = _block_graph(cfg)
  get = lambda v: ("layers",) + tuple(v.get_metadata()["logical_axes"])
  blocks = nnx.to_pure_dict(jax.tree.map(get, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  return {"patch_kernel": (None, "embed"), "patch_bias": ("embed",), "pos": (None, "embed"),
          "blocks": blocks, "ln_f": {"scale": ("norm",), "bias": ("norm",)}}


def check_images(images, config, where: str = f"{_WHERE}:encode") -> None:
  """Raises one ValueError for images that are not float [B, image_size, image_size, channels]."""
  cfg = _as_config(config)
  want = (cfg.image_size, cfg.image_size, cfg.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"{where}: images must be [B,{want[0]},{want[1]},{want[2]}] (B, H, W, C), "
                     f"got {tuple(images.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{where}: images must be float in [0, 1], got dtype {images.dtype} "
                     "(convert uint8 with image_world.to_float)")


def patchify(images, patch_size: int):
  """images [B,H,W,C] -> [B, (H/p)*(W/p), p*p*C] patches in row-major patch order (by reshape)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))            # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalize(images, config):
  """images [B,H,W,C] -> (images - pixel_mean) / pixel_std per channel, in images' dtype
  (unchanged when the config has no normalisation)."""
  cfg = _as_config(config)
  if not cfg.pixel_mean:
    return images
  mean = jnp.asarray(cfg.pixel_mean, jnp.float32)
  std = jnp.asarray(cfg.pixel_std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(images.dtype)


def encode(params: Params, config, images):
  """images float [B,H,W,C] in [0, 1] -> image features [B,N,D] (pool="none") or [B,1,D] ("mean"),
  in the compute dtype: input normalisation (if configured), patchify, patch embedding + learned
  positions, pre-LN blocks with full (bidirectional) attention, final LayerNorm, then pooling.
  With pool="none" this is SigLIP's `last_hidden_state` (`hf_vision.load_vision_tower`)."""
  cfg = _as_config(config)
  check_images(images, cfg)
  dt = jnp.dtype(cfg.dtype)
  x = patchify(normalize(images, cfg).astype(dt), cfg.patch_size)
  x = dense(x, params["patch_kernel"]) + params["patch_bias"].astype(dt) + params["pos"].astype(dt)
  x = parallel.constrain(x, ("batch", "length", "embed"))
  b, n = x.shape[:2]
  mask = jnp.ones((b, n, n), bool)
  graphdef = _block_graph(cfg)[0]

  def body(x, bp):
    return nnx.merge(graphdef, bp)(x, mask)[0], None

  x, _ = jax.lax.scan(body, x, params["blocks"])
  x = layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], cfg.ln_eps)
  if cfg.pool == "mean":
    x = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(dt)
  return x


# ---------------------------------------------------------------- projector
def init_projector(config, d_model: int, rng) -> Params:
  """2-layer MLP (LLaVA-1.5) from the encoder width D to the decoder width d_model, float32."""
  cfg = _as_config(config)
  k1, k2 = jax.random.split(rng)
  std = cfg.init_std
  return {"fc_kernel": std * jax.random.normal(k1, (cfg.d_model, d_model), jnp.float32),
          "fc_bias": jnp.zeros((d_model,), jnp.float32),
          "proj_kernel": std * jax.random.normal(k2, (d_model, d_model), jnp.float32),
          "proj_bias": jnp.zeros((d_model,), jnp.float32)}


def projector_axes() -> Params:
  return {"fc_kernel": ("embed", "mlp"), "fc_bias": ("mlp",), "proj_kernel": ("mlp", "embed"),
          "proj_bias": ("embed",)}


def project(params: Params, embeds):
  """embeds [B,P,D] -> [B,P,D_model] in embeds' dtype: gelu(x @ fc + b) @ proj + b."""
  dt = embeds.dtype
  h = dense(embeds, params["fc_kernel"]) + params["fc_bias"].astype(dt)
  h = parallel.constrain(jax.nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
  return dense(h, params["proj_kernel"]) + params["proj_bias"].astype(dt)


def num_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
