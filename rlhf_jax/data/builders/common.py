"""Shared TFDS machinery: record features, the base builder, config naming and the reader.

Every builder here writes ``array_record`` files (random access, no TensorFlow needed) with
TFDS shuffling disabled, so example ``i`` of a split is the ``i``-th kept record in source order.
Each stored example carries an ``id`` (its source location, e.g. ``"<file>:<line>"``) next to the
normalised fields of :mod:`rlhf_jax.data.records`. Messages are stored as a
``Sequence({"role": Text, "content": Text})``, responses as ``Sequence(Text)``, ranks as
``Sequence(int32)``.

Skip counts are logged and saved in the dataset metadata (``info.metadata["stats"]``), keyed by
input group (a source split): ``{"seen", "skipped": {reason: n}, "first_skip", "kept": {split: n},
"files", ...}`` with ``seen == sum(kept) + sum(skipped)`` for one-record-per-line sources.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import records

log = logging.getLogger("rlhf_jax.data.builders")

KINDS = ("demonstration", "comparison", "prompt", "text")
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def features_for(kind: str) -> tfds.features.FeaturesDict:
  """TFDS features of a record kind (see module docstring)."""
  text = tfds.features.Text
  messages = tfds.features.Sequence({"role": text(), "content": text()})
  fields = {
      "demonstration": {"messages": messages},
      "prompt": {"messages": messages},
      "comparison": {
          "messages": messages,
          "responses": tfds.features.Sequence(text()),
          "ranks": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
      },
      "text": {"text": text()},
  }
  if kind not in fields:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  return tfds.features.FeaturesDict({"id": text(), **fields[kind]})


def config_digest(fields: Mapping[str, Any]) -> str:
  """A short stable hash of JSON-able config fields, used to name derived configs."""
  blob = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def manual_root(dl_manager) -> Path | None:
  """The manual directory if one was given (and is non-empty), else None."""
  try:
    return Path(dl_manager.manual_dir)
  except AssertionError:  # TFDS raises this when no manual_dir was configured
    return None


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: one record kind, source-ordered array_record output, stats in metadata.

  Subclasses set ``KIND`` (or override ``kind`` per config) and implement
  ``_split_generators`` (returning ``self._generate_examples(...)`` per split) and
  ``_iter_records(group, paths, tally)``.
  """

  KIND: ClassVar[str]
  DESCRIPTION: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str | None] = None
  CITATION: ClassVar[str | None] = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS derives a checksums-file location from the module path; for modules of an
    # installed package that lookup needs the `importlib_resources` backport (absent
    # here). We ship no checksums file, so report no code path.
    return None

  @property
  def kind(self) -> str:
    """Record kind of this builder's config (one of ``KINDS``)."""
    return self.KIND

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=features_for(self.kind),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(),
      # Keep source order; training pipelines shuffle indices themselves.
        disable_shuffling=True,
    )

  @abc.abstractmethod
  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    """``(id, record)`` pairs of source split ``group`` read from ``paths``; counts in ``tally``."""

  def _generate_examples(self, group: str, paths: Sequence[Path], keep: str | None = None,
                         validation_fraction: float = 0.0, salt: str = ""):
    """Yields ``(id, example)`` for one output split.

    ``keep=None``: every record of ``group`` goes to this split. ``keep="train"`` or
    ``"validation"``: records are hash-split by prompt (``records.assign_split``) and only
    ``keep``'s share is yielded. Stats for ``group`` are stored once the source is exhausted.
    """
    tally, kept = records.Tally(), collections.Counter()
    for rid, rec in self._iter_records(group, paths, tally):
      split = group if keep is None else records.assign_split(
          records.record_key(rec), validation_fraction, salt)
      kept[split] += 1
      if keep is None or split == keep:
        yield rid, {"id": rid, **rec}
    self._store_stats(group, paths, tally, kept)

  def _store_stats(self, group: str, paths: Sequence[Path], tally: records.Tally,
                   kept: Mapping[str, int]) -> None:
    stats = {**tally.as_dict(), "kept": dict(sorted(kept.items())),
             "files": [str(p) for p in paths]}
    self.info.metadata.setdefault("stats", {})[group] = stats
    level = logging.WARNING if tally.num_skipped else logging.INFO
    log.log(level, "%s/%s %s: %s; kept %s", self.name, self.builder_config.name, group,
            tally.summary(), dict(kept))

  @classmethod
  def make_config(cls, name: str | None, manual_dir: str | os.PathLike | None,
                  **overrides) -> tfds.core.BuilderConfig:
    """The config for ``load(f"{builder}/{name}", **overrides)``.

    Named predefined configs are used as they are; ``overrides`` (other field values) give a
    derived config named ``"<name>-<digest>"`` so its build is cached apart.
    """
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    if name is None or name not in configs:
      raise ValueError(f"{cls.name}: unknown config {name!r}; choose one of {sorted(configs)}")
    base = configs[name]
    if not overrides:
      return base
    fields = {f.name for f in dataclasses.fields(base)} - {
        "name", "version", "release_notes", "supported_versions", "description", "tags"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"{cls.name}: unknown config fields {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(base, name=f"{name}-{config_digest(overrides)}", **overrides)


# --------------------------------------------------------------------------- user file configs


def normalise_data_files(data_files: Any, manual_dir: str | os.PathLike | None
                         ) -> dict[str, list[str]]:
  """``path | [paths] | {split: path | [paths]}`` -> ``{split: [absolute existing paths]}``.

  A bare path or list means the ``train`` split. Relative paths are taken from ``manual_dir``
  when given, else from the current directory.
  """
  if isinstance(data_files, (str, os.PathLike)):
    data_files = {"train": [data_files]}
  elif isinstance(data_files, (list, tuple)):
    data_files = {"train": list(data_files)}
  if not isinstance(data_files, Mapping) or not data_files:
    raise ValueError(f"data_files must be a path, a list of paths or a non-empty "
                     f"{{split: paths}} mapping, got {data_files!r}")
  base = Path(manual_dir) if manual_dir is not None else Path.cwd()
  out = {}
  for split, paths in data_files.items():
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
      raise ValueError(f"data_files: split name {split!r} must match {_SPLIT_NAME.pattern}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
      raise ValueError(f"data_files[{split!r}] is empty")
    resolved = []
    for p in paths:
      path = (base / Path(p).expanduser()).resolve()
      if not path.is_file():
        raise ValueError(f"data_files[{split!r}]: file not found: {path}")
      resolved.append(str(path))
    out[split] = resolved
  return out


def file_fingerprint(data_files: Mapping[str, Sequence[str]]) -> dict[str, list]:
  """``{split: [[path, size, mtime_ns], ...]}``: changes when a file is replaced or edited."""
  return {s: [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in ps]
          for s, ps in data_files.items()}


def check_validation_fraction(data_files: Mapping[str, Sequence[str]], fraction: float) -> None:
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
  if fraction > 0 and ("train" not in data_files or "validation" in data_files):
    raise ValueError("validation_fraction > 0 splits the 'train' files into train/validation; "
                     "it needs a 'train' entry and no 'validation' entry in data_files")


def user_file_splits(builder: RecordBuilder, data_files: Mapping[str, Sequence[str]],
                     validation_fraction: float, salt: str) -> dict[str, Any]:
  """Split generators for user files: one per ``data_files`` split, ``train`` hash-split in two
  when ``validation_fraction > 0``."""
  check_validation_fraction(data_files, validation_fraction)
  gens = {}
  for group, paths in data_files.items():
    paths = [Path(p) for p in paths]
    if group == "train" and validation_fraction > 0:
      for part in ("train", "validation"):
        gens[part] = builder._generate_examples(group, paths, part, validation_fraction, salt)
    else:
      gens[group] = builder._generate_examples(group, paths)
  return gens


# ------------------------------------------------------------------------------------ reading


def _decode(feature: tfds.features.FeatureConnector, value: Any) -> Any:
  """Inverse of the TFDS encoding for our feature types: bytes -> str, numpy -> python."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: _decode(feature[k], value[k]) for k in feature.keys()}
  if isinstance(feature, tfds.features.Sequence):
    inner = feature.feature
    if isinstance(inner, tfds.features.FeaturesDict):
      # A sequence of dicts is stored as a dict of equal-length lists.
      keys = list(inner.keys())
      columns = [_decode(tfds.features.Sequence(inner[k]), value[k]) for k in keys]
      return [dict(zip(keys, row)) for row in zip(*columns)]
    return [_decode(inner, v) for v in value]
  if isinstance(feature, tfds.features.Text):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  if isinstance(value, np.generic):
    return value.item()
  return value


class RecordSource:
  """Random-access records of one prepared split: ``len(src)``, ``src[i] -> dict``.

  Field values are python ``str`` / ``int`` / ``list`` / ``dict`` (see the module docstring).
  ``stats`` is the build's skip/keep report. Picklable, so it can feed grain workers.
  """

  def __init__(self, source, features: tfds.features.FeaturesDict, stats: Mapping[str, Any]):
    self._source = source
    self._features = features
    self.stats = dict(stats)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    i = int(index)
    if not -n <= i < n:
      raise IndexError(f"record index {index} out of range for {n} records")
    return _decode(self._features, self._source[i % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"RecordSource({self._source!r}, {len(self)} records)"
