"""Hugging Face `transformers` GPT-2 checkpoints <-> our GPT params.

A transformers GPT-2 directory holds `config.json` plus the weights as
`model.safetensors` (or a sharded `model.safetensors.index.json`) or, in older
checkpoints, `pytorch_model.bin` (or its sharded index). GPT-2 uses Conv1D
layers whose weights are stored [in, out], the same orientation as our
kernels, so every tensor maps to ours by a reshape alone:

  c_attn.weight [D, 3*H*Dh]  <-> attn.qkv_kernel [D, 3, H, Dh]  (q | k | v, heads major)
  c_attn.bias   [3*H*Dh]     <-> attn.qkv_bias   [3, H, Dh]
  c_proj.weight [H*Dh, D]    <-> attn.out_kernel [H, Dh, D]
  mlp.c_fc / mlp.c_proj      <-> mlp.fc_* / mlp.proj_*         (unchanged)
  ln_1 / ln_2 / ln_f weight  <-> ln1 / ln2 / ln_f scale

Per-layer tensors `h.{i}.*` are stacked on our leading layer axis. The
unembedding is tied to `wte` on both sides.

Public API:
  load_gpt2(path, dtype=None, strict=True) -> (GPTConfig, params)
  save_gpt2(config, params, path, extra_config=None) -> Path
  config_from_hf(hf_config, source="config.json", dtype=None) -> GPTConfig
  config_to_hf(config) -> dict
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import gpt
from rlhf_jax.model.config import GPTConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# All three are the tanh-approximated GELU our MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_PREFIX = "transformer."
# Non-persistent attention buffers (causal mask, masked fill value) that old
# checkpoints such as the original OpenAI release still contain.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# ---------------------------------------------------------------- name table
def _table(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """(hf name without prefix, our path, hf shape, our shape); `{i}` marks per-layer names.

  Per-layer "our shape" excludes the leading layer axis.
  """
  d, h, dh, f = cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_mlp
  rows = [
      ("wte.weight", ("wte",), (cfg.vocab_size, d), (cfg.vocab_size, d)),
      ("wpe.weight", ("wpe",), (cfg.max_len, d), (cfg.max_len, d)),
      ("ln_f.weight", ("ln_f", "scale"), (d,), (d,)),
      ("ln_f.bias", ("ln_f", "bias"), (d,), (d,)),
  ]
  block = [
      ("ln_1.weight", ("ln1", "scale"), (d,), (d,)),
      ("ln_1.bias", ("ln1", "bias"), (d,), (d,)),
      ("attn.c_attn.weight", ("attn", "qkv_kernel"), (d, 3 * h * dh), (d, 3, h, dh)),
      ("attn.c_attn.bias", ("attn", "qkv_bias"), (3 * h * dh,), (3, h, dh)),
      ("attn.c_proj.weight", ("attn", "out_kernel"), (h * dh, d), (h, dh, d)),
      ("attn.c_proj.bias", ("attn", "out_bias"), (d,), (d,)),
      ("ln_2.weight", ("ln2", "scale"), (d,), (d,)),
      ("ln_2.bias", ("ln2", "bias"), (d,), (d,)),
      ("mlp.c_fc.weight", ("mlp", "fc_kernel"), (d, f), (d, f)),
      ("mlp.c_fc.bias", ("mlp", "fc_bias"), (f,), (f,)),
      ("mlp.c_proj.weight", ("mlp", "proj_kernel"), (f, d), (f, d)),
      ("mlp.c_proj.bias", ("mlp", "proj_bias"), (d,), (d,)),
  ]
  rows += [("h.{i}." + n, ("blocks",) + p, hs, os) for n, p, hs, os in block]
  return rows


def _check_layout(cfg: GPTConfig, params: Mapping, what: str) -> None:
  """Tree structure and shapes of `params` must equal `gpt.init`'s for `cfg`."""
  want = jax.eval_shape(lambda k: gpt.init(cfg, k), jax.random.key(0))
  want_flat = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)}
  got_flat = {jax.tree_util.keystr(p): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(set(want_flat) - set(got_flat)), sorted(set(got_flat) - set(want_flat))
  if missing or extra:
    raise ValueError(f"{what}: params do not match the GPT layout for {cfg}: "
                     f"missing {missing}, unexpected {extra}")
  for k, shape in want_flat.items():
    if got_flat[k] != tuple(shape):
      raise ValueError(f"{what}: param {k} has shape {got_flat[k]}, expected {tuple(shape)}")


# -------------------------------------------------------------------- config
def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_NAME, dtype=None) -> GPTConfig:
  """Maps a transformers GPT2Config dict to a GPTConfig; `source` names the file in errors.

  dtype: compute dtype of the returned config (None -> float32); params are float32 regardless.
  Raises ValueError for another architecture or a GPT-2 variant our model does not compute.
  """
  model_type = hf.get("model_type")
  if model_type != "gpt2":
    raise ValueError(f"{source}: model_type is {model_type!r}; only 'gpt2' checkpoints can be "
                     "imported into this GPT")
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
  try:
    return GPTConfig(
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
        dtype=jnp.dtype(dtype).name if dtype is not None else "float32",
    )
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: cannot build a GPTConfig: {e}") from e


def config_to_hf(config) -> dict[str, Any]:
  """GPTConfig -> a transformers GPT2Config dict (GPT2LMHeadModel, tied embeddings, float32)."""
  cfg = GPTConfig.from_dict(config)
  if not cfg.pre_ln:
    raise ValueError("save_gpt2: a post-LN (GPT-1, pre_ln=False) model cannot be exported as GPT-2, "
                     "which is pre-LN with a final LayerNorm")
  if cfg.d_head * cfg.n_head != cfg.d_model:
    raise ValueError(f"save_gpt2: head_dim*n_head = {cfg.d_head}*{cfg.n_head} != d_model={cfg.d_model}; "
                     "transformers GPT-2 requires head_dim = n_embd / n_head")
  # 50256 is GPT-2 BPE's <|endoftext|>; for other vocabularies leave the ids unset
  # rather than inherit an out-of-range default.
  eot = 50256 if cfg.vocab_size == 50257 else None
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
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
      "initializer_range": cfg.init_std,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "add_cross_attention": False,
      "tie_word_embeddings": True,
      "bos_token_id": eot,
      "eos_token_id": eot,
      "dtype": "float32",
  }


# ------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON: {e}") from e


def _safetensors_file(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # noqa: PLC0415

  with safe_open(str(path), framework="numpy") as f:
    keys = list(f.keys())
    bf16 = {k for k in keys if f.get_slice(k).get_dtype() == "BF16"}
    out = {k: f.get_tensor(k) for k in keys if k not in bf16}
  if bf16:
    # numpy has no bfloat16: read those tensors through jax (ml_dtypes) instead.
    with safe_open(str(path), framework="flax") as f:
      out.update({k: np.asarray(f.get_tensor(k), np.float32) for k in bf16})
  return out


def _torch_file(path: Path) -> dict[str, np.ndarray]:
  import torch  # noqa: PLC0415  (only legacy .bin checkpoints need torch)

  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
  return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def _read_weights(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of the checkpoint as numpy, and the file name each came from."""
  for single, index, reader in ((SAFE_NAME, SAFE_INDEX, _safetensors_file),
                                (BIN_NAME, BIN_INDEX, _torch_file)):
    if (directory / single).is_file():
      files = [single]
    elif (directory / index).is_file():
      weight_map = _read_json(directory / index).get("weight_map")
      if not isinstance(weight_map, Mapping):
        raise ValueError(f"{directory / index}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
    else:
      continue
    tensors, origin = {}, {}
    for name in files:
      if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory}: weight shard {name!r} listed in the index is missing")
      for k, v in reader(directory / name).items():
        tensors[k], origin[k] = v, name
    return tensors, origin
  raise FileNotFoundError(f"{directory}: no weights found; expected one of "
                          f"{SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME}, {BIN_INDEX}")


def load_gpt2(path, dtype=None, strict: bool = True):
  """Imports a transformers GPT-2 checkpoint directory.

  path: directory with config.json and model.safetensors / pytorch_model.bin (or
    their sharded index). Names may carry the `transformer.` prefix
    (GPT2LMHeadModel) or not (GPT2Model); a tied `lm_head.weight` is accepted.
  dtype: compute dtype stored in the returned config (None -> "float32").
  strict: if False, tensors that are not part of the language model (e.g. a
    classification `score.weight`) are skipped and their count logged;
    if True they are an error.
  Returns (GPTConfig, params) with float32 jax arrays laid out as `gpt.init`'s.
  """
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"load_gpt2: {directory} is not a directory")
  cfg_file = directory / CONFIG_NAME
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
  hf = _read_json(cfg_file)
  cfg = config_from_hf(hf, source=str(cfg_file), dtype=dtype)

  raw, origin = _read_weights(directory)
  tensors = {}
  for k, v in raw.items():
    name = k[len(_PREFIX):] if k.startswith(_PREFIX) else k
    if name in tensors:
      raise ValueError(f"{directory}: tensor {name!r} appears both with and without {_PREFIX!r}")
    tensors[name] = v
    origin[name] = origin[k]
  where = lambda n: f"{directory / origin[n]}"

  used = set()

  def take(name, hf_shape, our_shape):
    if name not in tensors:
      raise ValueError(f"{directory}: tensor {name!r} is missing from the checkpoint")
    x = tensors[name]
    if tuple(x.shape) != hf_shape:
      raise ValueError(f"{where(name)}: tensor {name!r} has shape {tuple(x.shape)}, expected "
                       f"{hf_shape} from {cfg_file}")
    used.add(name)
    return np.asarray(x, np.float32).reshape(our_shape)

  params: dict[str, Any] = {}
  for name, ours, hf_shape, our_shape in _table(cfg):
    if "{i}" in name:
      value = np.stack([take(name.format(i=i), hf_shape, our_shape) for i in range(cfg.n_layer)])
    else:
      value = take(name, hf_shape, our_shape)
    node = params
    for p in ours[:-1]:
      node = node.setdefault(p, {})
    node[ours[-1]] = value

  # Our unembedding is tied to wte, so a separate head must equal it.
  head = tensors.get("lm_head.weight")
  if head is not None:
    used.add("lm_head.weight")
    if head.shape != tensors["wte.weight"].shape or not np.array_equal(head, tensors["wte.weight"]):
      raise ValueError(f"{where('lm_head.weight')}: lm_head.weight differs from wte.weight; "
                       "untied output embeddings are not supported")
  elif hf.get("tie_word_embeddings", True) is False:
    raise ValueError(f"{cfg_file}: tie_word_embeddings=false but the checkpoint has no lm_head.weight")

  leftover = sorted(n for n in tensors if n not in used and not n.endswith(_BUFFER_SUFFIXES))
  if leftover:
    if strict:
      raise ValueError(f"{directory}: {len(leftover)} tensor(s) are not part of a GPT-2 language "
                       f"model: {leftover[:8]}{' ...' if len(leftover) > 8 else ''} "
                       "(pass strict=False to skip them)")
    log.warning("load_gpt2(%s): skipped %d tensor(s) outside the language model: %s",
                directory, len(leftover), leftover)
  _check_layout(cfg, params, f"load_gpt2({directory})")
  return cfg, jax.tree.map(jnp.asarray, params)


# ------------------------------------------------------------------- writing
def save_gpt2(config, params, path, extra_config: Mapping[str, Any] | None = None) -> Path:
  """Writes config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained` loads.

  params: our GPT params (any float dtype; written as float32).
  extra_config: keys merged into config.json (e.g. {"eos_token_id": 0}).
  Raises ValueError for configs transformers' GPT-2 cannot express (post-LN,
  head_dim*n_head != d_model) or params that do not match the config.
  Returns the directory.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  cfg = GPTConfig.from_dict(config)
  hf = config_to_hf(cfg)
  hf.update(extra_config or {})
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  _check_layout(cfg, host, "save_gpt2")

  tensors = {}
  for name, ours, hf_shape, _ in _table(cfg):
    value = host
    for p in ours:
      value = value[p]
    if "{i}" in name:
      for i in range(cfg.n_layer):
        tensors[_PREFIX + name.format(i=i)] = np.ascontiguousarray(value[i].reshape(hf_shape))
    else:
      tensors[_PREFIX + name] = np.ascontiguousarray(value.reshape(hf_shape))

  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / SAFE_NAME), metadata={"format": "pt"})
  with open(directory / CONFIG_NAME, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write("\n")
  return directory
