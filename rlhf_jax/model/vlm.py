"""Vision-language model: ViT encoder -> projector -> GPT decoder reading the image as a prefix.

Pure functions over params {"vit": vit params, "projector": projector params, "gpt": gpt params}.
One image per example; it becomes P = vit_config.num_tokens image tokens (embeddings of width
D_model) that the decoder reads before the text (`gpt.forward(..., prefix_embeds=...)`).

Sequence layout, decided here: [image tokens | left padding | text tokens]
  * The image block always sits in columns [0, P), so no per-row scatter is needed, and every row
    has at least P real positions (no fully masked row).
  * The text is left-padded exactly as in `sampling.py` (prompt_mask 0...0 1...1, last column real).
  * The full mask is concat(ones [B,P], text_mask); `gpt.positions_from_mask` of it gives the image
    positions 0..P-1 and the text positions P, P+1, ... from its first real token, so a padded row
    has the positions, the attention (pads masked) and hence the logits of the unpadded row.
  * Decoding on the KV cache: the prefill (`sampling._prefill` with `prefix_embeds`) writes the
    P + Tp columns into slots [0, P+Tp) (image slots marked real in the cache mask), then
    `sampling._decode_step` continues at slot P+Tp+i,
    position (P + real text length) + i. Attention is causal over the whole sequence, the image
    block included (LLaVA's choice), so the cache holds the same K/V as the uncached forward.

Public API:
  VLMConfig(vit, gpt); init(config, rng); param_axes(config)
  image_tokens(params, config, images) -> [B,P,D_model]
  full_mask(config, text_mask) -> int32 [B,P+T]
  logits(params, config, images, tokens, mask=None) -> float32 [B,T,V] at the text positions
  generate(params, config, images, prompt_tokens, prompt_mask, rng, *, max_new_tokens, ...) -> dict
    (the `sampling.generate` result, with `sampling`'s decode step and sampling rules)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import decode_kernels, sampling
from rlhf_jax.model import gpt, vit
from rlhf_jax.model.config import GPTConfig

_WHERE = "rlhf_jax/model/vlm.py"
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """The encoder's and the decoder's configs (hashable; a jit static argument)."""
  vit: vit.ViTConfig
  gpt: GPTConfig

  def __post_init__(self):
    if not isinstance(self.vit, vit.ViTConfig) or not isinstance(self.gpt, GPTConfig):
      raise ValueError(f"{_WHERE}: VLMConfig needs a vit.ViTConfig and a GPTConfig, got "
                       f"{type(self.vit).__name__} and {type(self.gpt).__name__}")
    if self.vit.num_tokens >= self.gpt.max_len:
      raise ValueError(f"{_WHERE}: {self.vit.num_tokens} image tokens leave no room in the decoder's "
                       f"context window max_len={self.gpt.max_len}")

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_tokens


def init(config: VLMConfig, rng) -> Params:
  k_vit, k_proj, k_gpt = jax.random.split(rng, 3)
  return {"vit": vit.init(config.vit, k_vit),
          "projector": vit.init_projector(config.vit, config.gpt.d_model, k_proj),
          "gpt": gpt.init(config.gpt, k_gpt)}


def param_axes(config: VLMConfig) -> Params:
  """Logical axis names mirroring `init` (for `parallel.tree_shardings`)."""
  return {"vit": vit.param_axes(config.vit), "projector": vit.projector_axes(),
          "gpt": gpt.param_axes(config.gpt)}


def image_tokens(params: Params, config: VLMConfig, images):
  """images float [B,H,W,C] in [0, 1] -> image tokens [B,P,D_model] (encode, then project), cast to
  the decoder's compute dtype."""
  feats = vit.encode(params["vit"], config.vit, images)
  return vit.project(params["projector"], feats).astype(config.gpt.compute_dtype)


def full_mask(config: VLMConfig, text_mask):
  """text_mask [B,T] (left-padded, 1 = real) -> int32 [B,P+T] mask of [image | text]."""
  return gpt.prefix_mask(text_mask, config.num_image_tokens)


def _check_text(config: VLMConfig, images, tokens, mask, fn: str) -> None:
  if tokens.ndim != 2 or (mask is not None and tuple(mask.shape) != tuple(tokens.shape)):
    raise ValueError(f"{_WHERE}:{fn}: tokens {tuple(tokens.shape)} and mask "
                     f"{None if mask is None else tuple(mask.shape)} must both be [B,T]")
  if images.shape[0] != tokens.shape[0]:
    raise ValueError(f"{_WHERE}:{fn}: {images.shape[0]} images for {tokens.shape[0]} token rows "
                     "(one image per row)")
  total = config.num_image_tokens + tokens.shape[1]
  if total > config.gpt.max_len:
    raise ValueError(f"{_WHERE}:{fn}: {config.num_image_tokens} image tokens + {tokens.shape[1]} text "
                     f"tokens exceed the decoder's max_len={config.gpt.max_len}")


def logits(params: Params, config: VLMConfig, images, tokens, mask=None, dropout_rng=None):
  """Next-token logits float32 [B,T,V] at the text positions of [image | text] (uncached).

  images float [B,H,W,C]; tokens int [B,T], mask [B,T] (left padding, 1 = real; None = all real).
  logits[:, t] predicts tokens[:, t+1]; a left-padded row gives the unpadded row's logits."""
  _check_text(config, images, tokens, mask, "logits")
  if mask is None:
    mask = jnp.ones(tokens.shape, jnp.int32)
  return gpt.logits(params["gpt"], config.gpt, tokens, mask, dropout_rng, image_tokens(params, config, images))


# ----------------------------------------------------------------- cached decoding
@functools.partial(decode_kernels.jit, rows=lambda params, config, images, tokens, *a, **k: tokens.shape[0],
                   static_argnames=("config", "max_new_tokens", "spec"))
def _generate_jit(params, config, images, prompt_tokens, prompt_mask, rng, temperature, eos_id, pad_id, *,
                  max_new_tokens, spec):
  """`sampling`'s generation program with the image tokens as the decoder's prefix."""
  return sampling._generate_jit(params["gpt"], config.gpt, prompt_tokens, prompt_mask, rng, temperature, eos_id,
                                pad_id, max_new_tokens=max_new_tokens, spec=spec,
                                prefix_embeds=image_tokens(params, config, images))


def generate(params: Params, config: VLMConfig, images, prompt_tokens, prompt_mask, rng, *,
             max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None,
             pad_id: int, greedy: bool = False) -> dict:
  """`sampling.generate` for image + text prompts, one jitted program on the KV cache.

  images float [B,H,W,C] in [0, 1] (one per row); prompt_tokens int [B,Tp], prompt_mask [B,Tp]
  LEFT-padded as in `sampling.generate`. The other arguments and the returned dict (tokens,
  logprobs, mask, lengths, ended; [B,N]) are `sampling.generate`'s."""
  cfg = config.gpt
  sampling._check_prompt(cfg, prompt_tokens, prompt_mask, max_new_tokens, "vlm.generate")
  _check_text(config, images, prompt_tokens, prompt_mask, "generate")
  if config.num_image_tokens + prompt_tokens.shape[1] + max_new_tokens - 1 > cfg.max_len:
    raise ValueError(f"{_WHERE}:generate: {config.num_image_tokens} image tokens + prompt length "
                     f"{prompt_tokens.shape[1]} + max_new_tokens {max_new_tokens} - 1 exceed max_len={cfg.max_len}")
  vit.check_images(images, config.vit, f"{_WHERE}:generate")
  sampling._check_temperature(temperature, "vlm.generate")
  spec = sampling._make_spec(cfg, top_k, top_p, greedy, "vlm.generate")
  eos, pad = sampling._token_ids(cfg, eos_id, pad_id, "vlm.generate")
  return _generate_jit(params, config, images, prompt_tokens, prompt_mask, rng,
                       jnp.asarray(temperature, jnp.float32), eos, pad, max_new_tokens=int(max_new_tokens),
                       spec=spec)
