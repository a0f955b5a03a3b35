"""Runs a supervised stage (pretraining, SFT, reward model, GPT-1 fine-tuning) through the loop.

An experiment supplies the pieces — initial params (or an init function), their
logical axes, a loss `loss_fn(params, batch, rng) -> (loss, metrics)`, host
batch iterators — and `fit` does the rest the same way for every stage: mesh,
directly-sharded train state, jitted step with declared shardings, evaluation,
and the shared loop with resume.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.data import pipeline
from rlhf_jax.model import gpt, lora
from rlhf_jax.train import loop, state as state_lib, steps


LORA_SEED = 0x10A  # folded into the seed for the adapters' init (the train rng stays the seed's)


def evaluate(eval_step, params, batches: Sequence, mesh, weight_key: str | None = None) -> dict[str, float]:
  """Mean of eval metrics over batches (weighted by metrics[weight_key] when given)."""
  with parallel.sharding_context(mesh):
    ms = jax.device_get([eval_step(params, b) for b in batches])
  if not ms:
    return {}
  w = np.array([float(m[weight_key]) for m in ms]) if weight_key else np.ones(len(ms))
  w = w / max(w.sum(), 1e-12)
  return {k: float(np.sum(w * np.array([float(m[k]) for m in ms]))) for k in ms[0]}


def resolve_steps(config, num_examples: int) -> int:
  """The one place where epochs become steps.

  config.loop.num_steps < 0 means `config.epochs` passes over `num_examples` records at
  `config.batch_size` (at least 1 step). Sets loop.num_steps and ties optim.total_steps to it
  (the LR schedule spans the run). Returns the step count.
  """
  with config.unlocked():
    if int(config.loop.num_steps) < 0:
      epochs = float(config.get("epochs", 1))
      config.loop.num_steps = max(1, int(epochs * int(num_examples)) // int(config.batch_size))
    config.optim.total_steps = int(config.loop.num_steps)
  return int(config.loop.num_steps)


def fit(config, workdir: str, *, loss_fn: Callable, param_axes, host_batches,
        params=None, init_fn: Callable | None = None, eval_batches: Sequence = (),
        eval_weight_key: str | None = None, extra_eval: Callable | None = None, name: str = "train",
        hooks=()):
  """Trains with config sections `mesh`, `optim`, `loop`, `batch_size`, `seed`.

  params: starting params (e.g. the previous stage), or init_fn: rng -> params.
  host_batches: this host's batch iterator (get_state/set_state for exact resume).
  eval_batches: host batches for held-out metrics; extra_eval(params) -> dict adds more.
  With config.loop.num_steps < 0 the run is `config.epochs` passes over the records the
  iterator kept (`host_batches.stats.kept`; see `resolve_steps`).
  LoRA (`config.lora.rank` > 0, `model.lora`): only adapters on `params` are trained; the state's
  params are then the training tree {"base", "lora", "scale"} (`lora.merged` gives the model;
  extra_eval receives it merged).
  Returns (final state, last metrics, mesh).
  """
  if int(config.loop.num_steps) < 0:
    resolve_steps(config, host_batches.stats.kept)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  parallel.check_batch_divisible(int(config.batch_size), mesh)
  optimizer = state_lib.make_optimizer(config.optim)
  rng = jax.random.PRNGKey(int(config.seed))
  loss_fn = lora.loss(loss_fn)
  if lora.from_config(config.get("lora")) is not None:
    if params is None:
      raise ValueError(f"{name}: LoRA (lora.rank={config.lora.rank}) adapts starting params; got only an init_fn")
    params, param_axes, optimizer = lora.setup(config.lora, params, param_axes, optimizer,
                                               jax.random.fold_in(rng, LORA_SEED))
  if params is not None:
    state, shardings = state_lib.state_from_params(params, optimizer, mesh, param_axes, rng)
  else:
    state, shardings = state_lib.create_state(init_fn, optimizer, mesh, param_axes, rng)
  step = state_lib.jit_step(steps.make_train_step(loss_fn, optimizer, int(config.optim.get("microbatches", 1))),
                            shardings, mesh)
  eval_step = jax.jit(steps.make_eval_step(loss_fn))
  eval_sharded = [parallel.put_batch(b, mesh) for b in eval_batches]

  def eval_fn(state):
    out = evaluate(eval_step, state["params"], eval_sharded, mesh, eval_weight_key)
    if extra_eval is not None:
      out.update(extra_eval(lora.merged(state["params"])))
    return out

  has_eval = bool(eval_sharded) or extra_eval is not None
  loop_cfg = loop.LoopConfig.from_config(config.loop, name=name)
  state, last = loop.run(state, step, parallel.ShardedBatches(host_batches, mesh), loop_cfg, workdir,
                         eval_fn=eval_fn if has_eval else None, hooks=hooks)
  return state, last, mesh


def fit_lm(config, workdir: str, model_cfg, train_rows, val_rows, *, params=None, eval_batches: int = 8,
           name: str = "pretrain", hooks=()):
  """Next-token training on packed rows: the one pretraining path (pretraining, LM warm-up, GPT-1).

  train_rows / val_rows: int32 [N, T+1] from `pipeline.pack_documents`. params: a starting point
  (None: `gpt.init`). eval_batches: held-out batches evaluated (the tail is dropped).
  Returns (final state, last metrics, mesh).
  """
  return fit(config, workdir, loss_fn=steps.lm_loss_fn(model_cfg), param_axes=gpt.param_axes(model_cfg),
             params=params, init_fn=None if params is not None else (lambda r: gpt.init(model_cfg, r)),
             name=name, eval_weight_key="num_tokens",
             host_batches=pipeline.lm_batches(train_rows, int(config.batch_size), seed=int(config.seed)),
             eval_batches=pipeline.lm_eval_batches(val_rows, int(config.batch_size))[:int(eval_batches)],
             hooks=hooks)
