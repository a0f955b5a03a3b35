"""Train state, optimizer factory, sharded state creation and jitted steps.

The train state is a plain dict pytree:
  {"step": int32 [], "params": ..., "opt_state": ..., "rng": uint32 [2]}
It is created directly sharded (jit with out_shardings), so a large model is
never materialised on one host, and every step is jitted with the state's
shardings declared on both sides (a jitted grad without out_shardings can come
back with a different sharding than the params).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import parallel

State = dict[str, Any]


def lr_schedule(optim) -> optax.Schedule:
  """Linear warmup then cosine / linear / constant decay (InstructGPT anneals to 0 for RM and RL)."""
  total = max(int(optim.total_steps), 1)
  warm = min(int(optim.get("warmup_steps", 0)), total - 1) if total > 1 else 0
  peak, end = float(optim.lr), float(optim.lr) * float(optim.get("end_lr_factor", 0.0))
  kind = optim.get("schedule", "cosine")
  if kind == "constant":
    decay = optax.constant_schedule(peak)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, total - warm)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, total - warm, alpha=end / peak if peak else 0.0)
  else:
    raise ValueError(f"optim.schedule must be constant|linear|cosine, got {kind!r}")
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(params):
  # Decay matrices only (GPT-2 practice): no decay on biases, LayerNorm, or position table.
  def keep(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and name not in ("wpe",) and "bias" not in name and "scale" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping from an `optim` ConfigDict section.

  Keys: lr, total_steps, warmup_steps, schedule, end_lr_factor, b1, b2, eps,
  weight_decay, grad_clip (0 = off).
  """
  chain = []
  if float(optim.get("grad_clip", 0.0)) > 0:
    chain.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  chain.append(optax.adamw(lr_schedule(optim), b1=float(optim.get("b1", 0.9)), b2=float(optim.get("b2", 0.95)),
                           eps=float(optim.get("eps", 1e-8)), weight_decay=float(optim.get("weight_decay", 0.0)),
                           mask=_decay_mask))
  return optax.chain(*chain)


def raw_key(rng) -> jax.Array:
  """A PRNG key as raw uint32 [2] data (typed keys are unwrapped; raw ones pass through)."""
  return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def init_sharded(init_fn: Callable, args: tuple, mesh, shardings_of: Callable[[Any], Any],
                 rules=parallel.DEFAULT_RULES):
  """Runs `init_fn(*args)` as one jit whose outputs are created directly sharded.

  shardings_of: the abstract output (`jax.eval_shape` of init_fn) -> its shardings pytree.
  Tracing happens inside the mesh's sharding context. Returns (state, shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_of(abstract)
  with parallel.sharding_context(mesh, rules):
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
  return state, shardings


def init_rl_state(trained: dict, frozen: dict, axes: dict, mesh, rng, scalars: dict | None = None,
                  rules=parallel.DEFAULT_RULES):
  """An RL state with several models, created directly sharded on `mesh` (one jit with out_shardings):

    {"step": int32 [], "rng": uint32 [2], name: {"params", "opt_state"} for each trained model,
     name: params for each frozen model, name: scalar for each of `scalars`}

  trained: {name: (params, optax optimizer)}; frozen: {name: params} (may be {} for a host scorer).
  axes: {name: param_axes tree} for every trained and frozen model (each model its own table: their
  paths overlap, e.g. "wte"; Adam moments follow their parameters). scalars: {name: value},
  replicated (e.g. PPO's kl_beta). rng: PRNG key (typed or raw uint32[2]). Returns (state, shardings).
  """
  scalars = dict(scalars or {})
  names = list(trained) + list(frozen)
  missing = [k for k in names if k not in axes]
  if missing:
    raise ValueError(f"rlhf_jax/train/state.py:init_rl_state: axes lacks param_axes for {missing} (need {names})")
  optimizers = {k: opt for k, (_, opt) in trained.items()}

  def init_fn(trained_params, frozen_params, scalar_values, rng):
    out = {"step": jnp.zeros((), jnp.int32), "rng": jnp.asarray(rng, jnp.uint32), **frozen_params, **scalar_values}
    for k, p in trained_params.items():
      out[k] = {"params": p, "opt_state": optimizers[k].init(p)}
    return out

  def shardings_of(abstract):
    shardings = {k: parallel.tree_shardings(abstract[k], axes[k], mesh, rules) for k in names}
    for k in ("step", "rng", *scalars):
      shardings[k] = parallel.replicated(mesh)
    return shardings

  args = ({k: p for k, (p, _) in trained.items()}, dict(frozen), scalars, raw_key(rng))
  return init_sharded(init_fn, args, mesh, shardings_of, rules)


def _train_state(params, optimizer, rng) -> State:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng}


def create_state(init_params: Callable[[jax.Array], Any], optimizer, mesh, param_axes, rng,
                 rules=parallel.DEFAULT_RULES):
  """Creates {"step","params","opt_state","rng"} directly sharded on `mesh`.

  init_params: rng -> params (pure). param_axes mirrors params with logical names.
  Returns (state, state_shardings).
  """
  init_rng, step_rng = jax.random.split(raw_key(rng))
  init_fn = lambda init_rng, step_rng: _train_state(init_params(init_rng), optimizer, step_rng)
  shardings_of = functools.partial(parallel.tree_shardings, param_axes=param_axes, mesh=mesh, rules=rules)
  return init_sharded(init_fn, (init_rng, step_rng), mesh, shardings_of, rules)


def state_from_params(params, optimizer, mesh, param_axes, rng, rules=parallel.DEFAULT_RULES):
  """Like create_state, but starting from existing params (e.g. the previous stage's checkpoint)."""
  init_fn = lambda params, rng: _train_state(params, optimizer, rng)
  shardings_of = functools.partial(parallel.tree_shardings, param_axes=param_axes, mesh=mesh, rules=rules)
  return init_sharded(init_fn, (params, raw_key(rng)), mesh, shardings_of, rules)


def apply_gradients(state: State, grads, optimizer) -> State:
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  return {**state, "step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
          "opt_state": opt_state}


def accumulate_gradients(loss_fn, params, batch, microbatches: int, rng=None):
  """Mean loss/grad over `microbatches` equal slices of the batch (lax.scan, constant memory).

  loss_fn(params, batch, rng) -> (loss, metrics). Batch leaves [B, ...] with B % microbatches == 0.
  Returns ((loss, metrics), grads) averaged over microbatches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches <= 1:
    return grad_fn(params, batch, rng)
  split = lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:])
  micro = jax.tree.map(split, batch)
  rngs = None if rng is None else jax.random.split(rng, microbatches)

  def body(carry, xs):
    mb, r = xs
    (loss, metrics), grads = grad_fn(params, mb, r)
    return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

  first = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                         None if rngs is None else rngs[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
  total, _ = jax.lax.scan(body, zeros, (micro, rngs))
  return jax.tree.map(lambda x: x / microbatches, total)


def jit_step(step_fn, state_shardings, mesh, rules=parallel.DEFAULT_RULES, donate: bool = True):
  """jits `step_fn(state, batch) -> (state, metrics)` with explicit shardings.

  The state keeps `state_shardings`; every batch leaf is sharded on its leading
  (batch) axis (shardings are fixed from the first batch's structure); metrics
  come back replicated. The state buffer is donated. Tracing happens inside the
  mesh's sharding context so model activations are pinned too. The returned callable's
  `.lower(state, batch)` gives the jitted step's `Lowered` (for its HLO, as benchmarks.xla_profile reads it).
  """
  cache = {}

  def jitted(batch):
    if "fn" not in cache:
      batch_shardings = jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim, rules), batch)
      cache["fn"] = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                            out_shardings=(state_shardings, parallel.replicated(mesh)),
                            donate_argnums=(0,) if donate else ())
    return cache["fn"]

  def call(state, batch):
    fn = jitted(batch)
    with parallel.sharding_context(mesh, rules):
      return fn(state, batch)

  def lower(state, batch):
    """As `jax.jit(...).lower`: the step's `jax.stages.Lowered` for these arguments (nothing runs or is donated);
    `.compile().as_text()` is the optimised HLO that a profile's op names refer to."""
    fn = jitted(batch)
    with parallel.sharding_context(mesh, rules):
      return fn.lower(state, batch)
  call.lower = lower
  return call
