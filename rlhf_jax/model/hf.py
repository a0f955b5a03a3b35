"""Hugging Face `transformers` checkpoints <-> our params: GPT-2 and the Llama family.

Supported `architectures` (config.json): GPT2LMHeadModel / GPT2Model, and
{Llama, Mistral, Qwen2, Qwen3}ForCausalLM with their *Model bases; language
models load with `load` and save with `save` (the class is picked from
`GPTConfig.family`). Reward models are *ForSequenceClassification with one
label (`load_reward_model` / `save_reward_model`). Weights are read from
`model.safetensors`, a sharded `model.safetensors.index.json`, or the legacy
`pytorch_model.bin` (or its index); float32, float16 and bfloat16 tensors are
converted to float32.

Name mapping (per-layer HF names `{i}` stack on our leading layer axis):
  GPT-2 (prefix `transformer.`; Conv1D weights are [in, out], like our kernels):
    wte / wpe / ln_f                        <-> wte / wpe / ln_f {scale, bias}
    h.{i}.ln_1, ln_2                        <-> blocks.ln1, ln2
    h.{i}.attn.c_attn.weight [D, 3*H*Dh]    <-> attn.q_kernel [D,H,Dh] | attn.kv_kernel [D,2,H,Dh]
    h.{i}.attn.c_attn.bias   [3*H*Dh]       <-> attn.q_bias [H,Dh] | attn.kv_bias [2,H,Dh]
    h.{i}.attn.c_proj        [H*Dh, D]      <-> attn.out_kernel [H,Dh,D], out_bias
    h.{i}.mlp.c_fc / c_proj                 <-> mlp.fc_* / mlp.proj_*
  Llama family (prefix `model.`; torch Linear weights are [out, in]: transposed):
    embed_tokens / norm / lm_head (top level) <-> wte / ln_f.scale / lm_head (untied only)
    layers.{i}.input_layernorm, post_attention_layernorm <-> blocks.ln1, ln2 (scale)
    self_attn.q_proj                         <-> attn.q_kernel [D,H,Dh] (q_bias)
    self_attn.k_proj + v_proj                <-> attn.kv_kernel [D,2,KV,Dh] (kv_bias)
    self_attn.o_proj                         <-> attn.out_kernel [H,Dh,D] (out_bias)
    self_attn.q_norm / k_norm (Qwen3)        <-> attn.q_norm / k_norm (scale)
    mlp.up_proj / gate_proj / down_proj      <-> mlp.fc_kernel / gate_kernel / proj_kernel
  Sequence classification: score.weight [1, D] (top level) <-> head.kernel [D].
RoPE uses the same rotate_half convention on both sides, so q/k need no permutation.

Public API:
  load(path, dtype=None, strict=True) -> (GPTConfig, params)
  save(config, params, path, extra_config=None) -> Path
  load_reward_model(path, dtype=None, strict=True) -> (GPTConfig, rm_params)
  save_reward_model(config, rm_params, path, extra_config=None) -> Path
The config.json <-> GPTConfig mapping (families, rope settings, refusals) is `hf_config.py`'s.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import gpt, heads, hf_config
from rlhf_jax.model.config import GPTConfig

log = logging.getLogger(__name__)

CONFIG_NAME = hf_config.CONFIG_NAME
SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_BASE_PREFIX = {"gpt2": "transformer."}  # every other family: "model."
def _base_prefix(family: str) -> str:
  return _BASE_PREFIX.get(family, "model.")


# Non-persistent buffers that old checkpoints still contain: GPT-2's causal mask and masked
# fill value (the original OpenAI release), Llama's rotary inverse frequencies.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_LM_HEAD = "lm_head.weight"
_SCORE = "score.weight"
_SCORE_BIAS = "score.bias"

# ---------------------------------------------------------------- name table
@dataclasses.dataclass(frozen=True)
class _Row:
  """HF tensors <-> our params, possibly many-to-many (GPT-2's fused c_attn, Llama's k + v).

  hf: names relative to the base prefix (`{i}` = per layer; lm_head / score are top level);
  ours: param paths (per-layer ones start with "blocks" and exclude the layer axis in shapes).
  to_ours(*hf arrays) -> tuple of our arrays; to_hf(*our arrays) -> tuple of HF arrays.
  """
  hf: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  ours: tuple[tuple[str, ...], ...]
  to_ours: Callable[..., tuple]
  to_hf: Callable[..., tuple]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf[0]


def _reshape(hf: str, hf_shape, ours, our_shape) -> _Row:
  """Same orientation, reshape only (GPT-2 Conv1D weights, biases, norms, embeddings)."""
  return _Row((hf,), (tuple(hf_shape),), (ours,), lambda x: (x.reshape(our_shape),),
              lambda y: (y.reshape(hf_shape),))


def _linear(hf: str, ours, in_shape, out_shape) -> _Row:
  """torch Linear weight [out, in] <-> our kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return _Row((hf,), ((n_out, n_in),), (ours,), lambda x: (x.T.reshape(*in_shape, *out_shape),),
              lambda y: (y.reshape(n_in, n_out).T,))


def _split_last(hf: str, hf_shape, parts) -> _Row:
  """One HF tensor whose last axis concatenates several of ours (GPT-2 c_attn = q | k | v)."""
  lead = tuple(hf_shape[:-1])
  sizes = [math.prod(shape[len(lead):]) for _, shape in parts]
  cuts = np.cumsum(sizes)[:-1]

  def to_ours(x):
    return tuple(piece.reshape(shape) for piece, (_, shape) in zip(np.split(x, cuts, axis=-1), parts))

  def to_hf(*ys):
    return (np.concatenate([y.reshape(*lead, -1) for y in ys], axis=-1),)
  return _Row((hf,), (tuple(hf_shape),), tuple(p for p, _ in parts), to_ours, to_hf)


def _kv_rows(pre: str, d: int, kv: int, dh: int, with_bias: bool) -> list[_Row]:
  """k_proj + v_proj (weights [KV*Dh, D], biases [KV*Dh]) <-> kv_kernel [D,2,KV,Dh] (kv_bias [2,KV,Dh])."""
  names = (pre + "k_proj.weight", pre + "v_proj.weight")
  rows = [_Row(names, ((kv * dh, d),) * 2, (("blocks", "attn", "kv_kernel"),),
               lambda k, v: (np.stack([k.T.reshape(d, kv, dh), v.T.reshape(d, kv, dh)], axis=1),),
               lambda y: (y[:, 0].reshape(d, kv * dh).T, y[:, 1].reshape(d, kv * dh).T))]
  if with_bias:
    names = (pre + "k_proj.bias", pre + "v_proj.bias")
    rows.append(_Row(names, ((kv * dh,),) * 2, (("blocks", "attn", "kv_bias"),),
                     lambda k, v: (np.stack([k.reshape(kv, dh), v.reshape(kv, dh)]),),
                     lambda y: (y[0].reshape(-1), y[1].reshape(-1))))
  return rows


def _gpt2_rows(cfg: GPTConfig) -> list[_Row]:
  d, h, dh, f = cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_mlp
  blk = lambda *p: ("blocks",) + p
  rows = [
      _reshape("wte.weight", (cfg.vocab_size, d), ("wte",), (cfg.vocab_size, d)),
      _reshape("wpe.weight", (cfg.max_len, d), ("wpe",), (cfg.max_len, d)),
      _reshape("ln_f.weight", (d,), ("ln_f", "scale"), (d,)),
      _reshape("ln_f.bias", (d,), ("ln_f", "bias"), (d,)),
  ]
  pre = "h.{i}."
  rows += [
      _reshape(pre + "ln_1.weight", (d,), blk("ln1", "scale"), (d,)),
      _reshape(pre + "ln_1.bias", (d,), blk("ln1", "bias"), (d,)),
      _split_last(pre + "attn.c_attn.weight", (d, 3 * h * dh),
                  [(blk("attn", "q_kernel"), (d, h, dh)), (blk("attn", "kv_kernel"), (d, 2, h, dh))]),
      _split_last(pre + "attn.c_attn.bias", (3 * h * dh,),
                  [(blk("attn", "q_bias"), (h, dh)), (blk("attn", "kv_bias"), (2, h, dh))]),
      _reshape(pre + "attn.c_proj.weight", (h * dh, d), blk("attn", "out_kernel"), (h, dh, d)),
      _reshape(pre + "attn.c_proj.bias", (d,), blk("attn", "out_bias"), (d,)),
      _reshape(pre + "ln_2.weight", (d,), blk("ln2", "scale"), (d,)),
      _reshape(pre + "ln_2.bias", (d,), blk("ln2", "bias"), (d,)),
      _reshape(pre + "mlp.c_fc.weight", (d, f), blk("mlp", "fc_kernel"), (d, f)),
      _reshape(pre + "mlp.c_fc.bias", (f,), blk("mlp", "fc_bias"), (f,)),
      _reshape(pre + "mlp.c_proj.weight", (f, d), blk("mlp", "proj_kernel"), (f, d)),
      _reshape(pre + "mlp.c_proj.bias", (d,), blk("mlp", "proj_bias"), (d,)),
  ]
  return rows


def _llama_rows(cfg: GPTConfig) -> list[_Row]:
  d, h, kv, dh, f = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.d_head, cfg.d_mlp
  blk = lambda *p: ("blocks",) + p
  rows = [_reshape("embed_tokens.weight", (cfg.vocab_size, d), ("wte",), (cfg.vocab_size, d)),
          _reshape("norm.weight", (d,), ("ln_f", "scale"), (d,))]
  pre = "layers.{i}."
  att = pre + "self_attn."
  rows += [_reshape(pre + "input_layernorm.weight", (d,), blk("ln1", "scale"), (d,)),
           _reshape(pre + "post_attention_layernorm.weight", (d,), blk("ln2", "scale"), (d,)),
           _linear(att + "q_proj.weight", blk("attn", "q_kernel"), (d,), (h, dh))]
  rows += _kv_rows(att, d, kv, dh, cfg.qkv_bias)
  if cfg.qkv_bias:
    rows.append(_reshape(att + "q_proj.bias", (h * dh,), blk("attn", "q_bias"), (h, dh)))
  rows.append(_linear(att + "o_proj.weight", blk("attn", "out_kernel"), (h, dh), (d,)))
  if cfg.bias:
    rows.append(_reshape(att + "o_proj.bias", (d,), blk("attn", "out_bias"), (d,)))
  if cfg.qk_norm:
    rows += [_reshape(att + "q_norm.weight", (dh,), blk("attn", "q_norm", "scale"), (dh,)),
             _reshape(att + "k_norm.weight", (dh,), blk("attn", "k_norm", "scale"), (dh,))]
  for hf_name, ours, n_in, n_out in (("up_proj", "fc", d, f), ("gate_proj", "gate", d, f),
                                     ("down_proj", "proj", f, d)):
    rows.append(_linear(f"{pre}mlp.{hf_name}.weight", blk("mlp", ours + "_kernel"), (n_in,), (n_out,)))
    if cfg.bias:
      rows.append(_reshape(f"{pre}mlp.{hf_name}.bias", (n_out,), blk("mlp", ours + "_bias"), (n_out,)))
  return rows


def _table(cfg: GPTConfig, lm_head: bool = True) -> list[_Row]:
  """The rows for cfg's family; `lm_head` adds the untied unembedding (top-level `lm_head.weight`)."""
  rows = _gpt2_rows(cfg) if cfg.family == "gpt2" else _llama_rows(cfg)
  if lm_head and not cfg.tie_embeddings:
    rows.append(_reshape(_LM_HEAD, (cfg.vocab_size, cfg.d_model), ("lm_head",), (cfg.vocab_size, cfg.d_model)))
  return rows


def _top_level(name: str) -> bool:
  return name in (_LM_HEAD, _SCORE, _SCORE_BIAS)


def _expected_shapes(cfg: GPTConfig, lm: bool) -> dict:
  want = jax.eval_shape(lambda k: gpt.init(cfg, k), jax.random.key(0))
  return want if lm else heads.trunk(want)


def _check_layout(cfg: GPTConfig, params: Mapping, what: str, lm: bool = True) -> None:
  """Tree structure and shapes of `params` must equal `gpt.init`'s for `cfg` (without lm_head: lm=False)."""
  _check_tree(_expected_shapes(cfg, lm), params, what, cfg)


def _check_tree(want, params: Mapping, what: str, cfg) -> None:
  """Tree structure and shapes of `params` must equal those of `want` (a shape tree for `cfg`)."""
  want_flat = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)}
  got_flat = {jax.tree_util.keystr(p): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(set(want_flat) - set(got_flat)), sorted(set(got_flat) - set(want_flat))
  if missing or extra:
    raise ValueError(f"{what}: params do not match the layout for {cfg}: "
                     f"missing {missing}, unexpected {extra}")
  for k, shape in want_flat.items():
    if got_flat[k] != tuple(shape):
      raise ValueError(f"{what}: param {k} has shape {got_flat[k]}, expected {tuple(shape)}")


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
      missing = [name for name in files if not (directory / name).is_file()]
      if missing:
        raise FileNotFoundError(f"{directory}: weight shard(s) {missing} listed in {directory / index} "
                                "are missing")
    else:
      continue
    tensors, origin = {}, {}
    for name in files:
      for k, v in reader(directory / name).items():
        tensors[k], origin[k] = v, name
    return tensors, origin
  raise FileNotFoundError(f"{directory}: no weights found; expected one of "
                          f"{SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME}, {BIN_INDEX}")


def _read_config(path, what: str) -> tuple[Path, Path, dict]:
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"{what}: {directory} is not a directory")
  cfg_file = directory / CONFIG_NAME
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
  return directory, cfg_file, _read_json(cfg_file)


class _Checkpoint:
  """The checkpoint's tensors by name relative to `prefix` (names without it kept as they are)."""

  def __init__(self, directory: Path, cfg_file: Path, prefix: str):
    raw, origin = _read_weights(directory)
    self.directory, self.cfg_file = directory, cfg_file
    self.tensors: dict[str, np.ndarray] = {}
    self.origin: dict[str, str] = {}
    for k, v in raw.items():
      name = k[len(prefix):] if k.startswith(prefix) else k
      if name in self.tensors:
        raise ValueError(f"{directory}: tensor {name!r} appears both with and without {prefix!r}")
      self.tensors[name], self.origin[name] = v, origin[k]
    self.used: set[str] = set()

  def where(self, name: str) -> str:
    return str(self.directory / self.origin[name])

  def take(self, name: str, shape) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
    x = self.tensors[name]
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"{self.where(name)}: tensor {name!r} has shape {tuple(x.shape)}, expected "
                       f"{tuple(shape)} from {self.cfg_file}")
    self.used.add(name)
    return np.asarray(x, np.float32)

  def check_leftover(self, strict: bool, what: str) -> None:
    leftover = sorted(n for n in self.tensors if n not in self.used and not n.endswith(_BUFFER_SUFFIXES))
    if not leftover:
      return
    if strict:
      raise ValueError(f"{self.directory}: {len(leftover)} tensor(s) are not part of {what}: "
                       f"{leftover[:8]}{' ...' if len(leftover) > 8 else ''} (pass strict=False to skip them)")
    log.warning("%s: skipped %d tensor(s) outside %s: %s", self.directory, len(leftover), what, leftover)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _params_from(ckpt: _Checkpoint, cfg: GPTConfig, lm: bool) -> dict:
  """Our params (numpy float32) for every row of cfg's table (lm: with an untied lm_head)."""
  return _params_from_rows(ckpt, _table(cfg, lm_head=lm), cfg.n_layer)


def _params_from_rows(ckpt: _Checkpoint, rows, n_layer: int) -> dict:
  """Our params (numpy float32) for every row; per-layer rows stack n_layer layers on a leading axis."""
  params: dict[str, Any] = {}
  for row in rows:
    layers = range(n_layer) if row.per_layer else [None]
    outs = []
    for i in layers:
      names = [n.format(i=i) for n in row.hf] if i is not None else list(row.hf)
      outs.append(row.to_ours(*(ckpt.take(n, s) for n, s in zip(names, row.hf_shapes))))
    for j, path in enumerate(row.ours):
      _set(params, path, np.stack([o[j] for o in outs]) if row.per_layer else outs[0][j])
  return params


def _check_tied_head(ckpt: _Checkpoint, cfg: GPTConfig, wte_name: str) -> None:
  """A tied model's checkpoint may still hold lm_head.weight: it must equal the token table."""
  head = ckpt.tensors.get(_LM_HEAD)
  if head is None or not cfg.tie_embeddings:
    return
  ckpt.used.add(_LM_HEAD)
  wte = ckpt.tensors[wte_name]
  if head.shape != wte.shape or not np.array_equal(head, wte):
    raise ValueError(f"{ckpt.where(_LM_HEAD)}: lm_head.weight differs from {wte_name} although "
                     f"tie_word_embeddings is true in {ckpt.cfg_file}; untied output embeddings need "
                     "tie_word_embeddings=false")


def _wte_name(family: str) -> str:
  return "wte.weight" if family == "gpt2" else "embed_tokens.weight"


def load(path, dtype=None, strict: bool = True):
  """Imports a transformers language-model checkpoint directory (GPT-2 or the Llama family).

  path: directory with config.json and model.safetensors / pytorch_model.bin (or
    their sharded index). Names may carry the base prefix (`transformer.` / `model.`,
    as *LMHeadModel / *ForCausalLM save them) or not (*Model bases). A tied model's
    `lm_head.weight` is accepted when it equals the token table.
  dtype: compute dtype stored in the returned config (None -> "float32").
  strict: if False, tensors that are not part of the language model (e.g. a
    classification `score.weight`) are skipped and their count logged; if True
    they are an error.
  Returns (GPTConfig, params) with float32 jax arrays laid out as `gpt.init`'s.
  """
  directory, cfg_file, hf = _read_config(path, "load")
  cfg = hf_config.config_from_hf(hf, source=str(cfg_file), dtype=dtype)
  ckpt = _Checkpoint(directory, cfg_file, _base_prefix(cfg.family))
  params = _params_from(ckpt, cfg, lm=True)
  _check_tied_head(ckpt, cfg, _wte_name(cfg.family))
  ckpt.check_leftover(strict, f"a {cfg.family} language model")
  _check_layout(cfg, params, f"load({directory})")
  return cfg, jax.tree.map(jnp.asarray, params)


def load_reward_model(path, dtype=None, strict: bool = True):
  """Imports a *ForSequenceClassification checkpoint with one label as a scalar model.

  Returns (GPTConfig, {"gpt": trunk params (no lm_head), "head": {"kernel" [D], "bias" []}}),
  float32. HF's score layer has no bias, so the head bias is 0 (or `score.bias` if present).
  The reward is then read by `heads.rewards` at the last real token of the attention mask,
  which equals HF's last non-pad token when the pads are exactly the masked positions.
  """
  directory, cfg_file, hf = _read_config(path, "load_reward_model")
  cfg = hf_config.config_from_hf(hf, source=str(cfg_file), dtype=dtype)
  _, kind = hf_config.architecture(hf, str(cfg_file))
  if kind not in ("cls", None):
    raise ValueError(f"{cfg_file}: architectures={hf.get('architectures')!r} is not a sequence "
                     f"classification model (expected {hf_config.cls_class(cfg.family)})")
  n_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
  if n_labels != 1:
    raise ValueError(f"{cfg_file}: a reward model has one label, this checkpoint has {n_labels}")
  ckpt = _Checkpoint(directory, cfg_file, _base_prefix(cfg.family))
  trunk = _params_from(ckpt, cfg, lm=False)
  kernel = ckpt.take(_SCORE, (1, cfg.d_model))[0]
  bias = ckpt.take(_SCORE_BIAS, (1,))[0] if _SCORE_BIAS in ckpt.tensors else np.float32(0.0)
  ckpt.check_leftover(strict, f"a {cfg.family} reward model")
  _check_layout(cfg, trunk, f"load_reward_model({directory})", lm=False)
  rm = {"gpt": trunk, "head": {"kernel": kernel, "bias": np.asarray(bias, np.float32).reshape(())}}
  return cfg, jax.tree.map(jnp.asarray, rm)


# ------------------------------------------------------------------- writing
def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


def _hf_tensors(cfg: GPTConfig, host: Mapping, lm: bool) -> dict[str, np.ndarray]:
  """Our (host float32) params -> HF tensors with full names (base prefix added)."""
  return _tensors_from_rows(_table(cfg, lm_head=lm), host, cfg.n_layer, _base_prefix(cfg.family))


def _tensors_from_rows(rows, host: Mapping, n_layer: int, prefix: str) -> dict[str, np.ndarray]:
  """Host float32 params -> HF tensors named prefix + row name (top-level names unprefixed)."""
  out = {}
  for row in rows:
    values = [_get(host, p) for p in row.ours]
    for i in range(n_layer) if row.per_layer else [None]:
      arrays = row.to_hf(*(v[i] for v in values)) if i is not None else row.to_hf(*values)
      for name, shape, arr in zip(row.hf, row.hf_shapes, arrays):
        name = name.format(i=i) if i is not None else name
        full = name if _top_level(name) else prefix + name
        out[full] = np.ascontiguousarray(arr.reshape(shape), np.float32)
  return out


def _write(directory, tensors: dict, hf_config: dict) -> Path:
  from safetensors.numpy import save_file  # noqa: PLC0415

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / SAFE_NAME), metadata={"format": "pt"})
  with open(directory / CONFIG_NAME, "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
  return directory


def save(config, params, path, extra_config: Mapping[str, Any] | None = None) -> Path:
  """Writes config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads.

  The class follows config.family: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
  Qwen2ForCausalLM or Qwen3ForCausalLM.
  params: our GPT params (any float dtype; written as float32).
  extra_config: keys merged into config.json, e.g. {"bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0} (the tokenizer's ids; unset by default).
  Raises ValueError for configs that class cannot express (e.g. post-LN, or GPT-2 with
  head_dim*n_head != d_model) or params that do not match the config.
  Returns the directory.
  """
  cfg = GPTConfig.from_dict(config)
  hf = hf_config.config_to_hf(cfg)
  hf.update(extra_config or {})
  host = _to_host(params)
  _check_layout(cfg, host, "save")
  return _write(path, _hf_tensors(cfg, host, lm=True), hf)


def _fold_head_bias(cfg: GPTConfig, trunk: dict, kernel: np.ndarray, bias: float) -> dict:
  """Moves a scalar head bias b into ln_f's bias: score(h + b w / |w|^2) = w.h + b."""
  if bias == 0.0:
    return trunk
  if not (cfg.pre_ln and "bias" in trunk.get("ln_f", {})):
    raise ValueError(f"save_reward_model: the head bias is {bias:.6g}, but HF's score layer has no bias and "
                     f"this model's final norm ({cfg.norm}, bias={cfg.bias}) has none to fold it into; "
                     "subtract the bias from the rewards (heads.shift_bias(params, -bias)) before exporting")
  w = kernel.astype(np.float64)
  shift = (bias * w / np.dot(w, w)).astype(np.float32)
  return {**trunk, "ln_f": {**trunk["ln_f"], "bias": trunk["ln_f"]["bias"] + shift}}


def save_reward_model(config, rm_params, path, extra_config: Mapping[str, Any] | None = None) -> Path:
  """Writes a *ForSequenceClassification (num_labels=1) directory from a scalar model.

  rm_params: {"gpt": trunk, "head": {"kernel" [D], "bias" []}} (`heads.py`); an lm_head in
    the trunk is ignored. `score.weight` [1,D] is the head kernel. HF's score has no bias:
    a non-zero head bias is folded into ln_f's bias when the norm has one (GPT-2), else
    ValueError. (The K-wise ranking loss never moves the bias, so it is 0 after RM training
    unless `heads.shift_bias` was applied.)
  extra_config: keys merged into config.json; include "pad_token_id": HF reads the score at
    the last token != pad_token_id (it refuses batches > 1 without one), while `heads.rewards`
    reads the last real token of the attention mask. They agree when the pads are exactly
    the masked positions.
  Returns the directory.
  """
  cfg = GPTConfig.from_dict(config)
  hf = hf_config.config_to_hf(cfg)
  hf.update(architectures=[hf_config.cls_class(cfg.family)], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  hf.update(extra_config or {})
  if hf.get("pad_token_id") is None:
    log.warning("save_reward_model(%s): no pad_token_id in extra_config; transformers cannot score "
                "batches larger than 1 without it", path)
  host = _to_host(rm_params)
  trunk = heads.trunk(host["gpt"])
  _check_layout(cfg, trunk, "save_reward_model", lm=False)
  kernel = host["head"]["kernel"].reshape(cfg.d_model)
  trunk = _fold_head_bias(cfg, trunk, kernel, float(host["head"]["bias"]))
  tensors = _hf_tensors(cfg, trunk, lm=False)
  tensors[_SCORE] = np.ascontiguousarray(kernel[None, :])
  return _write(path, tensors, hf)
