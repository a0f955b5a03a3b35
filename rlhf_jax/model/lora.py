"""LoRA adapters (Hu et al., 2021) on the GPT kernels, as pure functions over param pytrees.

A targeted kernel W (a leading layer axis [L], then its input axes I..., then its output axes
O...) is used as  W' = W + scale * A @ B,  scale = alpha / r, with
  A [L, I..., r]  float32 ~ U(-1/sqrt(prod I), 1/sqrt(prod I))   (PEFT's kaiming-uniform init)
  B [L, r, O...]  float32 = 0                                    (the adapted model starts as the base)
The targets (gpt.py's layout) and their input | output axes:
  attn.q_kernel   [L,D,H,Dh]     D | H,Dh        attn.kv_kernel [L,D,2,KV,Dh]  D | 2,KV,Dh
  attn.out_kernel [L,H,Dh,D]     H,Dh | D        mlp.fc_kernel, mlp.gate_kernel [L,D,F]  D | F
  mlp.proj_kernel [L,F,D]        F | D
A and B keep the kernel's axes (not flattened), so they shard on the mesh like the kernel: A has
the kernel's layer and input axis names and None for the rank, B None and the output axis names
(`adapter_axes`). Embeddings, norms and biases are not adapted.

Adapters pytree: mirrors the params down to each targeted kernel, whose place holds
{"a": A, "b": B}; e.g. {"blocks": {"attn": {"q_kernel": {"a", "b"}, ...}, "mlp": {...}}} for a
language model, {"gpt": {"blocks": ...}, "head": ...} for a scalar model. The top-level entries
named in `full` (default: a scalar model's "head", new for a reward model and re-purposed for a
value function) are trained in full: their trained copy is an array subtree of the adapters, and
`merge` puts it in place of the base's.

Training tree (what a LoRA stage's train state holds as its params):
  {"base": params (frozen), "lora": adapters (trained), "scale": float32 [] (alpha / r, frozen)}
The scale travels with the tree so that a checkpoint is self-describing: `merged(tree)` needs no
config, and `checkpoint.load_params` merges, so the next stage, `export` and `chat` read the merged
weights. `loss(loss_fn)` merges inside the trace with stop_gradient on the base and the scale (no
base gradients are computed); `optimizer(inner)` runs `inner` on the adapters only (optax
multi_transform, set_to_zero elsewhere: no Adam moments for the base). In RL the frozen reference
is the policy's base (adapters off): `frozen_or_base`.

Config section (`config()`, the stages' `config.lora`): rank (0 = off: full fine-tuning), alpha,
targets. `setup` is the one place a stage turns it on (supervised.fit and train.rl use it).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

_WHERE = "rlhf_jax/model/lora.py"

# kernel name -> number of input axes after the leading layer axis (the rest are output axes)
KERNELS = {"q_kernel": 1, "kv_kernel": 1, "out_kernel": 2, "fc_kernel": 1, "gate_kernel": 1, "proj_kernel": 1}
DEFAULT_TARGETS = tuple(KERNELS)
FULL = ("head",)
TREE_KEYS = frozenset({"base", "lora", "scale"})

Params = dict[str, Any]


def config(rank: int = 0, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS) -> mlc.ConfigDict:
  """The stages' `lora` section: rank 0 = off (full fine-tuning); scale = alpha / rank."""
  return mlc.ConfigDict(dict(rank=int(rank), alpha=float(alpha), targets=tuple(targets)))


@dataclasses.dataclass(frozen=True)
class Spec:
  rank: int
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def as_dict(self) -> dict:
    return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets)}


def from_config(section) -> Spec | None:
  """Spec from a `lora` section (or None / a section with rank 0: LoRA off -> None).

  targets: kernel names, as a sequence and/or comma-separated strings (`--config.lora.targets=
  q_kernel,out_kernel`). Raises ValueError on a negative rank or an unknown target."""
  if section is None or int(section.get("rank", 0)) == 0:
    return None
  rank = int(section["rank"])
  if rank < 0:
    raise ValueError(f"{_WHERE}: lora.rank must be >= 0 (0 = off), got {rank}")
  targets = section.get("targets", DEFAULT_TARGETS)
  items = [targets] if isinstance(targets, str) else list(targets)   # the CLI gives ("q_kernel,out_kernel",)
  targets = tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())
  unknown = [t for t in targets if t not in KERNELS]
  if unknown or not targets:
    raise ValueError(f"{_WHERE}: lora.targets {list(targets)}: unknown {unknown}; choose from {list(KERNELS)}")
  return Spec(rank, float(section.get("alpha", 16.0)), targets)


def stage_info(section) -> dict:
  """{"lora": spec dict} for stage.json when LoRA is on, else {}."""
  spec = from_config(section)
  return {} if spec is None else {"lora": spec.as_dict()}


# ------------------------------------------------------------------ adapters


def _is_adapter(node) -> bool:
  return isinstance(node, dict) and set(node) == {"a", "b"}


def init(params: Params, rank: int, rng, targets: Sequence[str] = DEFAULT_TARGETS,
         full: Sequence[str] = FULL) -> Params:
  """Adapters for every kernel of `params` named in `targets` (any nesting, e.g. {"gpt": trunk}).

  params: float params in gpt.py's layout (each target with its leading [L] axis). rank: r >= 1.
  rng: PRNG key (typed or raw uint32 [2]). full: top-level keys trained in full (copied).
  Returns {..path..: {"a": float32 [L,I...,r], "b": float32 [L,r,O...]}} (+ the full copies).
  Raises ValueError when no target is found.
  """
  if int(rank) < 1:
    raise ValueError(f"{_WHERE}:init: rank must be >= 1, got {rank}")
  targets, shapes = tuple(targets), []

  def walk(node, path):  # the adapters' structure, with the index of each kernel's shapes as leaves
    out = {}
    for k, v in node.items():
      if isinstance(v, dict):
        sub = walk(v, path + (k,))
        if sub:
          out[k] = sub
      elif k in targets:
        n_in = KERNELS[k]
        lead, ins, outs = v.shape[:1], v.shape[1:1 + n_in], v.shape[1 + n_in:]
        shapes.append((lead + ins + (int(rank),), lead + (int(rank),) + outs))
        out[k] = len(shapes) - 1
    return out

  structure = walk(params, ())
  if not structure:
    raise ValueError(f"{_WHERE}:init: none of the targets {list(targets)} is in the params")
  drawn = _draw(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng, tuple(shapes))
  adapters = jax.tree.map(lambda i: drawn[i], structure)
  for k in full:
    if k in params:
      adapters[k] = jax.tree.map(lambda x: jnp.array(x, copy=True), params[k])
  return adapters


@functools.partial(jax.jit, static_argnums=1)
def _draw(rng, shapes):
  """Every kernel's (A, B) in one small program: shapes = ((A shape, B shape), ...); the A's are
  consecutive slices of one uniform draw, each scaled to its kernel's bound."""
  sizes = [math.prod(a) for a, _ in shapes]
  u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = [], 0
  for (a_shape, b_shape), n in zip(shapes, sizes):
    bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
    out.append({"a": u[start:start + n].reshape(a_shape) * bound, "b": jnp.zeros(b_shape, jnp.float32)})
    start += n
  return out


def adapter_axes(param_axes: Params, adapters: Params) -> Params:
  """Logical axis names mirroring `adapters`: A = (layers, *input axes, None), B = (layers, None,
  *output axes) of its kernel; a fully trained entry keeps its parameter's axes."""
  out = {}
  for k, v in adapters.items():
    if _is_adapter(v):
      ax, n_in = tuple(param_axes[k]), v["a"].ndim - 2
      out[k] = {"a": ax[:1 + n_in] + (None,), "b": ax[:1] + (None,) + ax[1 + n_in:]}
    elif isinstance(v, dict):
      out[k] = adapter_axes(param_axes[k], v)
    else:
      out[k] = param_axes[k]
  return out


def delta(adapter: dict, scale) -> jax.Array:
  """scale * A @ B over the rank: float32 [L, I..., O...] (the kernel's shape)."""
  a, b = adapter["a"], adapter["b"]
  letters = "abcdefghijkmnopqstuvwxyz"        # no l (layers) or r (rank)
  n_in, n_out = a.ndim - 2, b.ndim - 2
  ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
  d = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return scale * d


def merge(params: Params, adapters: Params, scale) -> Params:
  """params with every adapted kernel W replaced by W + scale * A @ B (in W's dtype) and every fully
  trained entry replaced by its trained copy. scale: float or float32 []. Pure; any nesting."""
  out = dict(params)
  for k, v in adapters.items():
    if _is_adapter(v):
      w = params[k]
      out[k] = (w.astype(jnp.float32) + delta(v, scale)).astype(w.dtype)
    elif isinstance(v, dict) and isinstance(params.get(k), dict):
      out[k] = merge(params[k], v, scale)
    else:
      out[k] = v
  return out


# ------------------------------------------------------------------ training tree


def is_lora(tree) -> bool:
  """True for a training tree {"base", "lora", "scale"}."""
  return isinstance(tree, dict) and set(tree) == TREE_KEYS


def attach(params: Params, param_axes: Params, spec: Spec, rng) -> tuple[Params, Params]:
  """(training tree {"base": params, "lora": fresh adapters, "scale": float32 []}, its axes)."""
  adapters = init(params, spec.rank, rng, spec.targets)
  tree = {"base": params, "lora": adapters, "scale": jnp.asarray(spec.scale, jnp.float32)}
  axes = {"base": param_axes, "lora": adapter_axes(param_axes, adapters), "scale": ()}
  return tree, axes


def merged(tree):
  """The model params of a training tree (adapters merged); anything else is returned unchanged."""
  return merge(tree["base"], tree["lora"], tree["scale"]) if is_lora(tree) else tree


def base(tree):
  """The frozen base of a training tree: the model with the adapters off."""
  if not is_lora(tree):
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{_WHERE}:base: not a LoRA training tree {{'base', 'lora', 'scale'}} (got {keys})")
  return tree["base"]


def loss(loss_fn: Callable) -> Callable:
  """Wraps loss_fn(params, *args) -> ... so that it also takes a training tree: merged inside the
  trace, base and scale behind stop_gradient (their gradients are zero, never computed). Other
  params pass through unchanged."""
  def wrapped(params, *args, **kwargs):
    if is_lora(params):
      frozen = jax.lax.stop_gradient({"base": params["base"], "scale": params["scale"]})
      params = merge(frozen["base"], params["lora"], frozen["scale"])
    return loss_fn(params, *args, **kwargs)
  return wrapped


def optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on the adapters of a training tree; zero updates (and no state) for base and scale."""
  labels = {"base": "frozen", "lora": "train", "scale": "frozen"}
  return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


def setup(section, params: Params, param_axes: Params, opt: optax.GradientTransformation, rng):
  """The one switch: (params, param_axes, optimizer) for training with the `lora` section.

  LoRA off (None / rank 0): returned unchanged. On: (training tree, its axes, `optimizer(opt)`);
  the loss must be wrapped with `loss` (the training steps do it for every model).
  """
  spec = from_config(section)
  if spec is None:
    return params, param_axes, opt
  tree, axes = attach(params, param_axes, spec, rng)
  return tree, axes, optimizer(opt)


def frozen_or_base(state: dict, name: str, owner: str):
  """An RL state's frozen model `name` (e.g. "ref"), or, when the state holds none, the base of the
  trained model `owner` (e.g. "policy"): with LoRA the reference is the policy with its adapters
  off, the same arrays, not a second copy."""
  if name in state:
    return state[name]
  return base(state[owner]["params"])
