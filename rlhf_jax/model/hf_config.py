"""config.json <-> GPTConfig for the Hugging Face families we compute: GPT-2 and the Llama family.

`config_from_hf` reads a transformers config dict (GPT2Config, LlamaConfig, MistralConfig,
Qwen2Config, Qwen3Config; rope settings in transformers 5's `rope_parameters` or the older
`rope_theta` + `rope_scaling`) and refuses what our decoder does not compute, naming the file and
the key. `config_to_hf` writes the config.json of the family's causal-LM class. The weights' name
mapping and file IO are `hf.py`'s.

Public API:
  config_from_hf(hf_config, source="config.json", dtype=None) -> GPTConfig
  config_to_hf(config) -> dict (the *ForCausalLM / GPT2LMHeadModel config.json)
  architecture(hf_config, source) -> (family, kind)
  lm_class(family), cls_class(family) -> str;  SUPPORTED_ARCHITECTURES
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax.numpy as jnp

from rlhf_jax.model.config import GPTConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

_CLASS_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_LM_SUFFIX = {"gpt2": "LMHeadModel"}      # every other family: "ForCausalLM"


def lm_class(family: str) -> str:
  return _CLASS_PREFIX[family] + _LM_SUFFIX.get(family, "ForCausalLM")


def cls_class(family: str) -> str:
  return _CLASS_PREFIX[family] + "ForSequenceClassification"


# architecture name -> (family, kind); kind: lm | base | cls
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {}
for _f in _CLASS_PREFIX:
  SUPPORTED_ARCHITECTURES[lm_class(_f)] = (_f, "lm")
  SUPPORTED_ARCHITECTURES[_CLASS_PREFIX[_f] + "Model"] = (_f, "base")
  SUPPORTED_ARCHITECTURES[cls_class(_f)] = (_f, "cls")

# All three are the tanh-approximated GELU our MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# transformers' config-class defaults for fields a config.json may omit.
_LLAMA_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128, max_position_embeddings=32768),
}
_ROPE_TYPES = ("default", "linear", "llama3")


def architecture(hf: Mapping[str, Any], source: str) -> tuple[str, str | None]:
  """(family, kind or None) from `architectures` (checked against model_type) or model_type alone."""
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  supported = sorted(SUPPORTED_ARCHITECTURES)
  if archs:
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"{source}: architectures={list(archs)!r} is not supported; supported "
                       f"architectures: {supported}")
    family, kind = SUPPORTED_ARCHITECTURES[arch]
    if model_type is not None and model_type != family:
      raise ValueError(f"{source}: model_type is {model_type!r}, but architectures={list(archs)!r} is a "
                       f"{family!r} model")
    return family, kind
  if model_type not in _CLASS_PREFIX:
    raise ValueError(f"{source}: model_type is {model_type!r} and there is no `architectures` entry; "
                     f"supported model types: {sorted(_CLASS_PREFIX)} (architectures: {supported})")
  return model_type, None


def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_NAME, dtype=None) -> GPTConfig:
  """Maps a transformers config.json dict to a GPTConfig; `source` names the file in errors.

  dtype: compute dtype of the returned config (None -> float32); params are float32 regardless.
  Raises ValueError for an unsupported architecture or a variant our model does not compute
  (other activations, rope types such as yarn / dynamic, partial rotary, ...).
  """
  family, _ = architecture(hf, source)
  dtype = jnp.dtype(dtype).name if dtype is not None else "float32"
  fields = _gpt2_fields(hf, source) if family == "gpt2" else _llama_fields(hf, family, source)
  try:
    return GPTConfig(family=family, dtype=dtype, **fields)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: cannot build a GPTConfig: {e}") from e


def _gpt2_fields(hf: Mapping[str, Any], source: str) -> dict:
  act = hf.get("activation_function", "gelu_new")
  if act not in _TANH_GELUS:
    raise ValueError(f"{source}: activation_function={act!r} is not supported; this GPT computes "
                     f"the tanh GELU ({' / '.join(_TANH_GELUS)})")
  if not hf.get("scale_attn_weights", True):
    raise ValueError(f"{source}: scale_attn_weights=false (unscaled attention) is not supported")
  if hf.get("scale_attn_by_inverse_layer_idx", False):
    raise ValueError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
  if hf.get("add_cross_attention", False):
    raise ValueError(f"{source}: add_cross_attention=true (encoder-decoder GPT-2) is not supported")
  # reorder_and_upcast_attn only changes where the 1/sqrt(Dh) is applied and the
  # precision; our attention already forms scores and softmax in float32.
  n_embd, n_head = int(hf.get("n_embd", 768)), int(hf.get("n_head", 12))
  if n_embd % n_head:
    raise ValueError(f"{source}: n_embd={n_embd} is not divisible by n_head={n_head}")
  n_inner = hf.get("n_inner")
  return dict(
      vocab_size=int(hf.get("vocab_size", 50257)),
      max_len=int(hf.get("n_positions", 1024)),
      n_layer=int(hf.get("n_layer", 12)),
      n_head=n_head,
      d_model=n_embd,
      d_ff=int(n_inner) if n_inner is not None else 0,
      pre_ln=True,
      # One rate for all three sites; GPT-2 checkpoints use the same value for each.
      dropout=float(hf.get("resid_pdrop", 0.1)),
      ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      init_std=float(hf.get("initializer_range", 0.02)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
  )


def _llama_fields(hf: Mapping[str, Any], family: str, source: str) -> dict:
  get = lambda k: hf.get(k, _LLAMA_DEFAULTS[family].get(k))
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: hidden_act={act!r} is not supported; the SwiGLU MLP computes silu")
  d, n_head = int(get("hidden_size")), int(get("num_attention_heads"))
  n_kv = int(get("num_key_value_heads") or n_head)
  head_dim = int(get("head_dim") or d // n_head)
  biases = _llama_biases(hf, family, source)
  return dict(
      vocab_size=int(get("vocab_size")),
      max_len=_context_window(hf, family, source, int(get("max_position_embeddings"))),
      n_layer=int(get("num_hidden_layers")),
      n_head=n_head,
      n_kv_head=0 if n_kv == n_head else n_kv,
      d_model=d,
      head_dim=0 if d % n_head == 0 and head_dim == d // n_head else head_dim,
      d_ff=int(get("intermediate_size")),
      pre_ln=True,
      # Llama-family models only have attention dropout; our one rate also covers the
      # embedding and residual sites (0 in every released checkpoint).
      dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
      ln_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.02)),
      position="rope", norm="rmsnorm", mlp="swiglu",
      qk_norm=family == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **biases,
      **_rope_fields(hf, source),
  )


def _llama_biases(hf: Mapping[str, Any], family: str, source: str) -> dict:
  """qkv_bias / bias per family: Qwen2 always has q/k/v biases only; Llama / Qwen3 use
  attention_bias for q, k, v and o (and Llama's mlp_bias must agree); Mistral has none."""
  if family == "qwen2":
    return dict(qkv_bias=True, bias=False)
  if family == "mistral":
    return dict(qkv_bias=False, bias=False)
  attn = bool(hf.get("attention_bias", False))
  mlp = bool(hf.get("mlp_bias", False))
  if family == "llama" and mlp != attn:
    raise ValueError(f"{source}: attention_bias={attn} with mlp_bias={mlp} is not supported (this model "
                     "has one `bias` switch for the attention output and the MLP)")
  return dict(qkv_bias=attn, bias=attn)


def _context_window(hf: Mapping[str, Any], family: str, source: str, max_len: int) -> int:
  """max_position_embeddings, capped at a sliding window smaller than it (Mistral; Qwen with
  use_sliding_window): below the window, full causal attention is exactly sliding attention."""
  if family == "mistral":
    window = hf.get("sliding_window", _LLAMA_DEFAULTS["mistral"]["sliding_window"])
  elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
    window = hf.get("sliding_window", 4096)
  else:
    window = None
  if window and int(window) < max_len:
    log.warning("%s: sliding_window=%d < max_position_embeddings=%d; capping max_len at %d, where full "
                "attention equals sliding-window attention", source, int(window), max_len, int(window))
    return int(window)
  return max_len


def _rope_fields(hf: Mapping[str, Any], source: str) -> dict:
  """GPTConfig rope_* fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
  params = hf.get("rope_parameters")
  if not params:
    params = dict(hf.get("rope_scaling") or {})
  params = dict(params)
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial is not None and float(partial) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (full-dimension RoPE only)")
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported rope types: "
                     f"{list(_ROPE_TYPES)}")
  out = dict(rope_theta=theta)
  if rope_type == "linear":
    out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
  elif rope_type == "llama3":
    original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_len=int(original))
  return out


# Fields a family's HF class fixes (None: anything; checked by config_to_hf).
_FIXED = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", qkv_bias=True, bias=True, qk_norm=False),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False),
    "mistral": dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False, qk_norm=False),
    "qwen2": dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=True, bias=False, qk_norm=False),
    "qwen3": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
}


def _check_exportable(cfg: GPTConfig) -> None:
  cls = lm_class(cfg.family)
  if not cfg.pre_ln:
    raise ValueError(f"save: a post-LN (GPT-1, pre_ln=False) model cannot be exported as {cls}, which is "
                     "pre-LN with a final norm")
  wrong = {k: getattr(cfg, k) for k, v in _FIXED[cfg.family].items() if getattr(cfg, k) != v}
  if wrong:
    raise ValueError(f"save: family={cfg.family!r} ({cls}) needs {_FIXED[cfg.family]}, but the config has "
                     f"{wrong}; set `family` to the architecture these settings describe")
  if cfg.family in ("llama", "qwen3") and cfg.qkv_bias != cfg.bias:
    raise ValueError(f"save: {cls} has one attention_bias for q/k/v and the output; got qkv_bias="
                     f"{cfg.qkv_bias}, bias={cfg.bias}")
  if cfg.family == "gpt2":
    if cfg.d_head * cfg.n_head != cfg.d_model:
      raise ValueError(f"save: head_dim*n_head = {cfg.d_head}*{cfg.n_head} != d_model={cfg.d_model}; "
                       "transformers GPT-2 requires head_dim = n_embd / n_head")
    if cfg.kv_heads != cfg.n_head:
      raise ValueError(f"save: GPT-2 has no grouped-query attention (n_kv_head={cfg.n_kv_head})")


def config_to_hf(config) -> dict[str, Any]:
  """GPTConfig -> the config.json dict of its family's LM class (float32).

  Raises ValueError for configs that class cannot express (see `_FIXED`).
  """
  cfg = GPTConfig.from_dict(config)
  _check_exportable(cfg)
  hf = _gpt2_hf(cfg) if cfg.family == "gpt2" else _llama_hf(cfg)
  hf.update({"architectures": [lm_class(cfg.family)], "model_type": cfg.family, "dtype": "float32",
             "torch_dtype": "float32", "tie_word_embeddings": cfg.tie_embeddings,
             "initializer_range": cfg.init_std})
  return hf


def _gpt2_hf(cfg: GPTConfig) -> dict[str, Any]:
  # 50256 is GPT-2 BPE's <|endoftext|>; for other vocabularies leave the ids unset
  # rather than inherit an out-of-range default.
  eot = 50256 if cfg.vocab_size == 50257 else None
  return {
      "vocab_size": cfg.vocab_size,
      "n_positions": cfg.max_len,
      "n_embd": cfg.d_model,
      "n_layer": cfg.n_layer,
      "n_head": cfg.n_head,
      "n_inner": cfg.d_mlp,
      "activation_function": "gelu_new",
      "resid_pdrop": cfg.dropout,
      "embd_pdrop": cfg.dropout,
      "attn_pdrop": cfg.dropout,
      "layer_norm_epsilon": cfg.ln_eps,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "add_cross_attention": False,
      "bos_token_id": eot,
      "eos_token_id": eot,
  }


def _rope_hf(cfg: GPTConfig) -> tuple[dict, dict | None]:
  """(rope_parameters, legacy rope_scaling or None)."""
  scaling = None
  if cfg.rope_scaling == "linear":
    scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
  elif cfg.rope_scaling == "llama3":
    scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
  params = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
  return params, scaling


def _llama_hf(cfg: GPTConfig) -> dict[str, Any]:
  rope_parameters, rope_scaling = _rope_hf(cfg)
  hf = {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_mlp,
      "num_hidden_layers": cfg.n_layer,
      "num_attention_heads": cfg.n_head,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.d_head,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.ln_eps,
      "attention_dropout": cfg.dropout,
      "rope_parameters": rope_parameters,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "use_cache": True,
      "bos_token_id": None,
      "eos_token_id": None,
      "pad_token_id": None,
  }
  if cfg.family == "llama":
    hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
  elif cfg.family == "mistral":
    hf.update(sliding_window=None)
  else:  # qwen2, qwen3: full attention in every layer
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
              layer_types=["full_attention"] * cfg.n_layer)
    if cfg.family == "qwen3":
      hf.update(attention_bias=cfg.bias)
  return hf
