"""Finished stages reused across workdirs: a content-addressed store of stage directories.

The main job's presets, and any sweep over later stages, run the same early stages again (the two
pretraining stages are identical in `default` and `perfect_demos`). `chain.run_stage` looks a stage
up here before training it: a hit copies the stored stage directory into the workdir, so the result
is the one a fresh run would produce, bit for bit (the stages are deterministic; two from-scratch
main jobs give identical metrics and per-prompt scores).

A stage's key hashes everything its outcome depends on:
- the experiment file's text and the stage config (resolved, as JSON), where a path to another
  stage of the same workdir (`init_from`, `rm_from`, ...) is replaced by that stage's own key, so a
  stage is keyed on the content of what it reads, not on where that lives;
- each other file or directory the config names: path, size and modification time of every file;
- the source of `rlhf_jax/` and `experiments/` (any code change is a miss);
- the numerics: the versions of jax, jaxlib, flax, optax, orbax, numpy, tokenizers, transformers, ...;
  backend, device kind and count, x64 and matmul precision, XLA_FLAGS, the decoding programs' compiler
  options (`rlhf_jax/decode_kernels.py`), the CPU cores this process may use (XLA:CPU's reductions split
  by thread count).
A stage reading a stage that has no key (run before the cache existed, or with it off) is not cached,
nor is any stage of a multi-process run.

Layout: `<cache>/<key>/stage/` (the stage directory, with the workdir's path in its top-level JSON
files written as a placeholder) and `<cache>/<key>/result.json` (its `results/<name>.json` entry).
Entries are written to a temporary directory and renamed into place, so a crash leaves no partial entry.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata

_WORKDIR = "{STAGE_CACHE_WORKDIR}"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CODE = {}


def cache_dir() -> str | None:
  """The store this process uses: $RLHF_JAX_STAGE_CACHE (set by `python -m rlhf_jax.main --stage_cache`),
  None when unset, empty or 'none'."""
  path = os.environ.get("RLHF_JAX_STAGE_CACHE", "")
  return None if path in ("", "none") else path


def _code_fingerprint() -> str:
  """sha256 of every .py file under rlhf_jax/ and experiments/ (path and bytes), once per process."""
  if "sha" not in _CODE:
    h = hashlib.sha256()
    for sub in ("rlhf_jax", "experiments"):
      for path in sorted(glob.glob(os.path.join(_REPO, sub, "**", "*.py"), recursive=True)):
        h.update(os.path.relpath(path, _REPO).encode())
        with open(path, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
    _CODE["sha"] = h.hexdigest()
  return _CODE["sha"]


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers", "transformers",
             "safetensors", "ml-collections")


def _version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return ""


def _environment() -> dict:
  import jax
  from rlhf_jax import decode_kernels
  devices = jax.devices()
  return {"packages": {p: _version(p) for p in _PACKAGES}, "backend": jax.default_backend(),
          "x64": bool(jax.config.jax_enable_x64), "matmul_precision": str(jax.config.jax_default_matmul_precision),
          "devices": len(devices), "device_kind": devices[0].device_kind, "processes": jax.process_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "cores": len(os.sched_getaffinity(0)),
          "machine": platform.machine(), "decode_compiler_options": dict(decode_kernels.options())}


def _path_stamp(path: str) -> list:
  """[relative path, size, mtime_ns] of a file, or of every file under a directory."""
  if os.path.isfile(path):
    st = os.stat(path)
    return [["", st.st_size, st.st_mtime_ns]]
  out = []
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      st = os.stat(full)
      out.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
  return out


def stage_key(name: str, experiment_file: str, stage_cfg, workdir: str) -> str | None:
  """The stage's key (hex sha256), or None when it reads a stage of `workdir` that has no key, or in a
  multi-process run (each process would copy the same directories)."""
  import jax
  if jax.process_count() > 1:
    return None
  work = os.path.abspath(workdir)
  reads, inputs = {}, {}

  def visit(value):
    if isinstance(value, dict):
      return {k: visit(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
      return [visit(v) for v in value]
    if isinstance(value, str) and value and os.path.exists(value):
      full = os.path.abspath(value)
      if full.startswith(work + os.sep):
        other = os.path.relpath(full, work).split(os.sep)[0]
        key = read_key(workdir, other)
        if key is None:
          raise LookupError(other)
        reads[other] = key
        return f"stage:{key}/" + os.path.relpath(full, os.path.join(work, other))
      inputs[full] = _path_stamp(full)
    return value

  try:
    config = visit(stage_cfg.to_dict() if hasattr(stage_cfg, "to_dict") else dict(stage_cfg))
  except LookupError:
    return None
  with open(experiment_file, "rb") as f:
    experiment = hashlib.sha256(f.read()).hexdigest()
  blob = json.dumps({"experiment": experiment, "config": config, "reads": reads, "inputs": inputs,
                     "code": _code_fingerprint(), "env": _environment()}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def read_key(workdir: str, name: str) -> str | None:
  """The key recorded in `<workdir>/results/<name>.json` (None: not finished, or no key)."""
  path = os.path.join(workdir, "results", f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("cache_key")


def _replace(text: str, old: list[str], new: str) -> str:
  """JSON text with each path in `old` (a whole string, or a prefix followed by '/') written as `new`."""
  esc = lambda p: json.dumps(p)[1:-1]
  for o in old:
    text = text.replace(f'"{esc(o)}"', f'"{esc(new)}"').replace(esc(o + "/"), esc(new + "/"))
  return text


def _rewrite_json(directory: str, old: list[str], new: str) -> None:
  """`_replace` in the top-level *.json files of `directory` (stage.json names the stages it read)."""
  for path in glob.glob(os.path.join(directory, "*.json")):
    with open(path) as f:
      text = f.read()
    replaced = _replace(text, old, new)
    if replaced != text:
      with open(path, "w") as f:
        f.write(replaced)


def _workdir_forms(workdir: str) -> list[str]:
  """The spellings of workdir a config may use, longest first (absolute, then as given)."""
  return sorted({os.path.abspath(workdir), os.path.normpath(workdir)}, key=len, reverse=True)


def _swap(value, old: list[str], new: str):
  return json.loads(_replace(json.dumps(value, default=float), old, new))


def fetch(cache: str, key: str, name: str, workdir: str) -> dict | None:
  """Copies a stored stage into `<workdir>/<name>` and returns its result entry, or None (no entry)."""
  entry = os.path.join(cache, key)
  if not os.path.exists(os.path.join(entry, "result.json")):
    return None
  target = os.path.join(workdir, name)
  if os.path.exists(target):
    shutil.rmtree(target)   # an unfinished run of this very stage (no results json): superseded
  shutil.copytree(os.path.join(entry, "stage"), target, symlinks=True)
  _rewrite_json(target, [_WORKDIR], os.path.normpath(workdir))
  with open(os.path.join(entry, "result.json")) as f:
    return _swap(json.load(f), [_WORKDIR], os.path.normpath(workdir))


def store(cache: str, key: str, name: str, workdir: str, result: dict) -> None:
  """Stores `<workdir>/<name>` and its result entry under `key` (a no-op when already stored)."""
  entry = os.path.join(cache, key)
  if os.path.exists(entry):
    return
  os.makedirs(cache, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=cache)
  try:
    shutil.copytree(os.path.join(workdir, name), os.path.join(tmp, "stage"), symlinks=True)
    forms = _workdir_forms(workdir)
    _rewrite_json(os.path.join(tmp, "stage"), forms, _WORKDIR)
    with open(os.path.join(tmp, "result.json"), "w") as f:
      json.dump(_swap(result, forms, _WORKDIR), f, indent=2, default=float)
    os.rename(tmp, entry)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(entry):
      raise
