"""Orbax checkpointing of a train state together with the data iterator's state.

Each checkpoint step holds three items:
  state: the sharded train-state pytree (restored straight into its shardings),
  data:  every process's input-iterator state (JSON, gathered to the primary host, which writes
         it), so a resumed run sees the exact next batch on every host,
  meta:  parameter shapes (JSON), checked before restoring so a checkpoint of
         another model shape fails with one clear error instead of deep in orbax.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.model import lora


def _shapes(tree) -> dict[str, list[int]]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = list(np.shape(leaf))
  return out


def _gather_data_states(data_state: Any) -> dict:
  """{"per_process": [state of process 0, ..., P-1]} (a collective when P > 1)."""
  if jax.process_count() == 1:
    return {"per_process": [data_state]}
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return {"per_process": [json.loads(bytes(blobs[i, :sizes[i]]).decode()) for i in range(len(sizes))]}


def _local_data_state(saved: Any, where: str) -> Any:
  """This process's iterator state from a saved `_gather_data_states` record."""
  if not isinstance(saved, dict) or "per_process" not in saved:
    return saved                      # written before per-process states were saved
  states, n = saved["per_process"], jax.process_count()
  if len(states) != n:
    # Another host count shards the data differently: an exact resume is impossible.
    logging.warning("%s was written by %d processes, this run has %d: every process resumes the data "
                    "iterator of process 0", where, len(states), n)
    return states[0]
  return states[jax.process_index()]


class Checkpointer:
  """Save/restore of (state, data_state) under `directory`, async where available."""

  def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Any = None, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(_gather_data_states(data_state)),
                              meta=ocp.args.JsonSave({"shapes": _shapes(state)}))
    self.manager.save(int(step), args=args, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, data_state) into the shardings of `abstract_state`.

    abstract_state: pytree of jax.ShapeDtypeStruct with .sharding (or concrete arrays).
    Raises ValueError naming the directory if the checkpoint is unreadable or of another shape.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint found in {self.directory}")
    where = f"checkpoint {self.directory}/{step}"
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - re-raised with the path
      raise ValueError(f"{where} is corrupt or unreadable (metadata): {type(e).__name__}: {e}") from e
    want = _shapes(abstract_state)
    have = meta.get("shapes", {}) if isinstance(meta, dict) else {}
    # Report a parameter (not its Adam moment) when both differ.
    for key, shape in sorted(want.items(), key=lambda kv: "['params']" not in kv[0]):
      if key not in have:
        raise ValueError(f"{where} does not match this model: it has no entry {key} "
                         f"(it was written by a different model or stage)")
      if list(have[key]) != list(shape):
        raise ValueError(f"{where} does not match this model: {key} has shape {have[key]} in the "
                         f"checkpoint but {shape} in the model")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{where} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    logging.info("restored %s", where)
    return out["state"], _local_data_state(out["data"], where)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def saved_steps(directory: str) -> list[int]:
  """The steps of the checkpoints saved under `directory`, ascending ([] when there are none)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def load_params(directory: str, abstract_params=None, step: int | None = None):
  """Reads only the params of a stage's checkpoint (e.g. SFT params to initialise the RM).

  A LoRA stage's params (the training tree {"base", "lora", "scale"}) come back merged: the model.
  abstract_params: optional pytree of ShapeDtypeStructs (with shardings) to restore into.
  """
  ckpt = Checkpointer(directory, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint found in {os.path.abspath(directory)}")
    item = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    # A supervised stage's state has "params"; an RL state keeps the trained policy under "policy".
    params = lora.merged(item["params"] if "params" in item else item["policy"]["params"])
    if abstract_params is not None:
      want, have = _shapes(abstract_params), _shapes(params)
      if want != have:
        diff = next(k for k in want if have.get(k) != want[k])
        raise ValueError(f"checkpoint {directory}/{step}: params {diff} has shape {have.get(diff)}, "
                         f"expected {want[diff]}")
      params = jax.tree.map(lambda x, a: jax.device_put(x, getattr(a, "sharding", None)), params,
                            abstract_params)
    return params
  finally:
    ckpt.close()
