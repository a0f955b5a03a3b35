"""GPT model configuration and the size presets of the GPT papers.

`GPTConfig` is a frozen (hashable) dataclass so it can be a static argument of
jitted functions. Experiments keep the model config as a ConfigDict section and
turn it into a `GPTConfig` with `GPTConfig.from_dict`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

REMATS = ("auto", "none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("", "linear", "llama3")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"GPTConfig.{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Decoder-only transformer settings; flat scalars only (hashable, JSON via dataclasses.asdict).

  The defaults are GPT-2: learned positions, LayerNorm with biases, GELU MLP,
  biased projections, one K/V head per query head, tied unembedding. The
  Llama family (Llama 3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) sets
  position="rope", norm="rmsnorm", mlp="swiglu", bias=False and, per model,
  n_kv_head (GQA), qkv_bias (Qwen2), qk_norm (Qwen3), tie_embeddings and the
  RoPE fields below.
  """
  vocab_size: int = 50257
  max_len: int = 1024          # context window (and the learned position table size)
  n_layer: int = 12
  n_head: int = 12
  d_model: int = 768
  head_dim: int = 0            # 0 -> d_model // n_head (GPT-3 13B has d_model 5140, 40 x 128 heads)
  d_ff: int = 0                # 0 -> 4 * d_model
  pre_ln: bool = True          # True: GPT-2/3 (pre-LN + final LN); False: GPT-1 (post-LN)
  dropout: float = 0.1         # embedding, attention-prob and residual dropout
  ln_eps: float = 1e-5         # epsilon of every norm (LayerNorm or RMSNorm)
  init_std: float = 0.02
  dtype: str = "float32"       # compute dtype; params stay float32 (master weights)
  # Per-backend defaults (`resolved_remat` / `resolved_scan_layers`), measured in benchmarks/RESULTS.md:
  # on CPU no remat and unrolled layers (XLA:CPU's scan backward costs ~20%); on GPU/TPU
  # remat="dots" (keeps matmul outputs, recomputes elementwise ops) and lax.scan (compile time
  # independent of depth). Any remat implies lax.scan unless scan_layers says otherwise.
  remat: str = "auto"          # auto | none | full | dots: activation rematerialisation per block
  scan_layers: bool | None = None  # lax.scan over stacked blocks; None = per backend
  # ---- architecture family (defaults: GPT-2)
  family: str = "gpt2"         # gpt2 | llama | mistral | qwen2 | qwen3: the HF class `hf.save` writes
  position: str = "learned"    # learned (table wpe) | rope (rotary, HF rotate_half convention)
  norm: str = "layernorm"      # layernorm | rmsnorm
  mlp: str = "gelu"            # gelu (tanh GELU, 1 up projection) | swiglu (silu(x@gate) * (x@up))
  n_kv_head: int = 0           # 0 -> n_head; fewer K/V heads = GQA (1 = MQA)
  qkv_bias: bool = True        # biases on the q/k/v projections
  bias: bool = True            # biases on the attention output, the MLP and LayerNorm
  qk_norm: bool = False        # Qwen3: RMSNorm over head_dim on q and k before RoPE
  tie_embeddings: bool = True  # unembedding = wte; False adds lm_head [V, D]
  rope_theta: float = 10000.0
  rope_scaling: str = ""       # "" (none) | linear | llama3: rescaling of the RoPE inverse frequencies
  rope_factor: float = 1.0     # linear / llama3 `factor`
  rope_low_freq_factor: float = 1.0    # llama3
  rope_high_freq_factor: float = 4.0   # llama3
  rope_original_max_len: int = 0       # llama3 `original_max_position_embeddings`

  def __post_init__(self):
    if self.n_layer < 1 or self.n_head < 1 or self.d_model < 1 or self.vocab_size < 1:
      raise ValueError(f"GPTConfig: sizes must be positive, got {self}")
    if self.head_dim == 0 and self.d_model % self.n_head:
      raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                       "set head_dim explicitly")
    _check_choice("remat", self.remat, REMATS)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("family", self.family, FAMILIES)
    _check_choice("position", self.position, POSITIONS)
    _check_choice("norm", self.norm, NORMS)
    _check_choice("mlp", self.mlp, MLPS)
    _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    if self.n_kv_head < 0 or self.n_head % self.kv_heads:
      raise ValueError(f"GPTConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                       "(0 = n_head)")
    if self.position == "rope":
      if self.d_head % 2:
        raise ValueError(f"GPTConfig: RoPE needs an even head_dim, got {self.d_head}")
      if self.rope_theta <= 0 or self.rope_factor <= 0:
        raise ValueError(f"GPTConfig: rope_theta={self.rope_theta} and rope_factor={self.rope_factor} "
                         "must be positive")
      if self.rope_scaling == "llama3" and (
          self.rope_original_max_len < 1 or self.rope_high_freq_factor <= self.rope_low_freq_factor):
        raise ValueError("GPTConfig: llama3 rope scaling needs rope_original_max_len >= 1 and "
                         "rope_high_freq_factor > rope_low_freq_factor")

  def resolved_remat(self) -> str:
    """remat with "auto" resolved for the default backend: "none" on CPU, "dots" elsewhere."""
    if self.remat != "auto":
      return self.remat
    return "none" if jax.default_backend() == "cpu" else "dots"

  def resolved_scan_layers(self) -> bool:
    """scan_layers with None resolved for the default backend: unrolled on CPU, scanned elsewhere,
    and scanned whenever remat is on (XLA:CPU's plan for unrolled layers keeps every activation
    whatever the remat policy: benchmarks/memory.py measured no saving, against 74% with scan)."""
    if self.scan_layers is not None:
      return bool(self.scan_layers)
    return jax.default_backend() != "cpu" or self.resolved_remat() != "none"

  @property
  def d_head(self) -> int:
    return self.head_dim or self.d_model // self.n_head

  @property
  def d_mlp(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def kv_heads(self) -> int:
    """Number of K/V heads (n_kv_head, or n_head when 0)."""
    return self.n_kv_head or self.n_head

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def _norm_params(self) -> int:
    return self.d_model * (2 if self.norm == "layernorm" and self.bias else 1)

  def num_params(self) -> int:
    """Parameter count (a tied unembedding counted once), excluding any scalar head."""
    d, h, kv, dh, f = self.d_model, self.n_head, self.kv_heads, self.d_head, self.d_mlp
    attn = d * h * dh + d * 2 * kv * dh + h * dh * d
    attn += (h * dh + 2 * kv * dh) * self.qkv_bias + d * self.bias + 2 * dh * self.qk_norm
    n_up = 2 if self.mlp == "swiglu" else 1
    mlp = n_up * d * f + f * d + (n_up * f + d) * self.bias
    block = attn + mlp + 2 * self._norm_params()
    final_norm = self._norm_params() if self.pre_ln else 0
    return self._embedding_params() + self.n_layer * block + final_norm

  def _embedding_params(self) -> int:
    tables = 1 if self.tie_embeddings else 2
    positions = self.max_len if self.position == "learned" else 0
    return (tables * self.vocab_size + positions) * self.d_model

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N (matmul params incl. the unembedding) + attention (12 L T H Dh).

    N excludes the lookup tables: the position table, and the input table when an
    untied lm_head does the unembedding.
    """
    lookups = self.max_len * self.d_model if self.position == "learned" else 0
    if not self.tie_embeddings:
      lookups += self.vocab_size * self.d_model
    n = self.num_params() - lookups
    return 6.0 * n + 12.0 * self.n_layer * seq_len * self.n_head * self.d_head

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | "GPTConfig") -> "GPTConfig":
    if isinstance(d, GPTConfig):
      return d
    d = dict(d)
    if "preset" in d:
      base = dataclasses.asdict(preset(d.pop("preset")))
      base.update({k: v for k, v in d.items() if v is not None})
      d = base
    return from_fields(cls, d, "model config")


def from_fields(cls, d: Mapping[str, Any], what: str):
  """`cls(**d)` for a dataclass `cls`, with one ValueError naming `what` for keys it does not have."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{what}: unknown key(s) {unknown}; known keys: {sorted(known)}")
  return cls(**d)


# name: (n_layer, d_model, n_head, head_dim, max_len, vocab, pre_ln)
_PRESETS = {
    # GPT-1 (Radford et al. 2018): 12 x 768, post-LN, 512 context, 40,478 BPE tokens.
    "gpt1": (12, 768, 12, 64, 512, 40478, False),
    # GPT-2 (Radford et al. 2019).
    "gpt2": (12, 768, 12, 64, 1024, 50257, True),
    "gpt2-medium": (24, 1024, 16, 64, 1024, 50257, True),
    "gpt2-large": (36, 1280, 20, 64, 1024, 50257, True),
    "gpt2-xl": (48, 1600, 25, 64, 1024, 50257, True),
    # GPT-3 (Brown et al. 2020, Table 2.1); 2048 context.
    "gpt3-small": (12, 768, 12, 64, 2048, 50257, True),
    "gpt3-medium": (24, 1024, 16, 64, 2048, 50257, True),
    "gpt3-large": (24, 1536, 16, 96, 2048, 50257, True),
    # The paper lists 24 heads x 128 for XL (3072 != d_model, 1.5B params); we use 16 x 128, which
    # gives the paper's 1.3B and matches d_model, as public reproductions do.
    "gpt3-xl": (24, 2048, 16, 128, 2048, 50257, True),
    "gpt3-2.7b": (32, 2560, 32, 80, 2048, 50257, True),
    "gpt3-6.7b": (32, 4096, 32, 128, 2048, 50257, True),
    "gpt3-13b": (40, 5140, 40, 128, 2048, 50257, True),
    "gpt3-175b": (96, 12288, 96, 128, 2048, 50257, True),
    # CPU sizes for tests and the embedded default.
    "nano": (2, 64, 4, 16, 128, 512, True),
    "tiny": (2, 128, 4, 32, 128, 512, True),
    "mini": (4, 256, 8, 32, 256, 512, True),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides) -> GPTConfig:
  """Returns the named preset, with field overrides (e.g. vocab_size for a new tokenizer)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {PRESET_NAMES}")
  n_layer, d_model, n_head, head_dim, max_len, vocab, pre_ln = _PRESETS[name]
  cfg = dict(n_layer=n_layer, d_model=d_model, n_head=n_head, head_dim=head_dim,
             max_len=max_len, vocab_size=vocab, pre_ln=pre_ln)
  cfg.update(overrides)
  return GPTConfig(**cfg)
