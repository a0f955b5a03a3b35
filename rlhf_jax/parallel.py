"""Device mesh, logical-axis sharding rules, sharded init and multi-host setup.

Design decision: the mesh uses `AxisType.Auto` (GSPMD propagation). Every
jitted step declares explicit `in_shardings`/`out_shardings` for its state and
batch, and the model pins key activations with `constrain`, so nothing relies
on propagation guessing right. (jax.make_mesh defaults to Explicit axes since
jax 0.7; we opt out of that once, here.)

Parameters carry logical axis names ("embed", "mlp", "heads", ...). One table
of rules maps them to mesh axes (data, fsdp, tensor): changing the parallelism
is a config change, not a code change.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # GQA K/V heads; replicated when KV is not divisible by the tensor axis
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: dict | Sequence[int] | None = None, devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh.

  shape: {"data": d, "fsdp": f, "tensor": t} or a 3-sequence; one entry may be -1
  (fill with the remaining devices). None -> all devices on `data`.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    dims = [-1, 1, 1]
  elif isinstance(shape, dict) or hasattr(shape, "keys"):
    unknown = set(shape.keys()) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh config: unknown axis name(s) {sorted(unknown)}; axes are {MESH_AXES}")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(s) for s in shape]
  if dims.count(-1) > 1:
    raise ValueError(f"mesh shape {dims}: at most one axis may be -1")
  if -1 in dims:
    rest = math.prod(d for d in dims if d != -1)
    if n % rest:
      raise ValueError(f"mesh shape {dims}: {n} devices are not divisible by {rest}")
    dims[dims.index(-1)] = n // rest
  if math.prod(dims) != n:
    raise ValueError(f"mesh shape data x fsdp x tensor = {dims} needs {math.prod(dims)} devices, "
                     f"but {n} are available")
  return jax.make_mesh(tuple(dims), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None] | None, rules=DEFAULT_RULES, shape=None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first dimension wins: for
  activations, batch takes fsdp and embed stays replicated). With `shape` and
  `mesh`, a dimension not divisible by its mesh axes is left replicated.
  """
  if axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    names = (target,) if isinstance(target, str) else tuple(target)
    names = tuple(a for a in names if a not in used)
    if mesh is not None:
      names = tuple(a for a in names if mesh.shape[a] > 1)
      if shape is not None and names and shape[i] % math.prod(mesh.shape[a] for a in names):
        names = ()
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


# ------------------------------------------------------ activation constraints
_CONTEXT: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  _CONTEXT.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.pop()


def constrain(x, axes: Sequence[str | None]):
  """with_sharding_constraint by logical names; a no-op outside `sharding_context`."""
  if not _CONTEXT:
    return x
  mesh, rules = _CONTEXT[-1]
  spec = logical_to_spec(axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------- tree shardings
def _path_keys(path) -> tuple[str, ...]:
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      keys.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      keys.append(k.name)
  return tuple(keys)


def tree_shardings(abstract_tree, param_axes, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for any pytree whose leaves mirror parameters (params, Adam moments, grads).

  abstract_tree: pytree of arrays/ShapeDtypeStructs (e.g. jax.eval_shape of a train state).
  param_axes: dict mirroring the params with tuples of logical names. A leaf whose
  path ends with a parameter's path (and has its rank) gets that parameter's sharding;
  anything else (step counters, scalars) is replicated.
  """
  table = {}
  for path, axes in jax.tree_util.tree_flatten_with_path(
      param_axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
    table[_path_keys(path)] = axes

  def one(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      axes = table.get(keys[start:])
      if axes is not None and len(axes) == len(leaf.shape):
        return NamedSharding(mesh, logical_to_spec(axes, rules, leaf.shape, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding for a batch array [B, ...]: batch over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  spec = logical_to_spec(("batch",), rules)
  axes = spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_divisible(batch_size: int, mesh: Mesh, rules=DEFAULT_RULES, what="batch size"):
  dp = data_parallel_size(mesh, rules)
  if batch_size % dp:
    raise ValueError(f"{what} {batch_size} is not divisible by the data-parallel mesh size {dp} "
                     f"(mesh {dict(mesh.shape)}; batch is sharded over data x fsdp)")


def put_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Host-local numpy batch -> global jax arrays sharded on the batch axis.

  In a multi-host job each process passes its own slice (per-host data); the
  global batch is their concatenation in process order.
  """
  def one(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, rules)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    check_batch_divisible(global_shape[0], mesh, rules)
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(one, batch)


class ShardedBatches:
  """Wraps a host-batch iterator to yield global sharded arrays; forwards get/set_state."""

  def __init__(self, host_iterator, mesh: Mesh, rules=DEFAULT_RULES):
    self.it, self.mesh, self.rules = host_iterator, mesh, rules

  def __iter__(self):
    return self

  def __next__(self):
    return put_batch(next(self.it), self.mesh, self.rules)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------- multi-host
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None,
                           cpu_collectives: str | None = None) -> None:
  """Starts JAX's multi-controller runtime when this is a multi-process job.

  With no arguments, reads RLHF_JAX_COORDINATOR / RLHF_JAX_NUM_PROCESSES /
  RLHF_JAX_PROCESS_ID (our launch scripts), else lets JAX auto-detect Cloud TPU,
  Slurm or Open MPI environments. A single-process run is left untouched.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("RLHF_JAX_COORDINATOR")
  if num_processes is None and "RLHF_JAX_NUM_PROCESSES" in env:
    num_processes = int(env["RLHF_JAX_NUM_PROCESSES"])
  if process_id is None and "RLHF_JAX_PROCESS_ID" in env:
    process_id = int(env["RLHF_JAX_PROCESS_ID"])
  cpu_collectives = cpu_collectives or env.get("RLHF_JAX_CPU_COLLECTIVES")
  auto = any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
  if not coordinator_address and not auto:
    return
  if num_processes == 1:
    return
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  logging.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
               coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
