"""TFDS builder ``gpt1_tasks/<task>``: users' GPT-1 fine-tuning data (JSONL or TSV) as array_record.

``<task>`` is one of ``rlhf_jax.gpt1.transforms.TASKS``; one record per line, schemas:

=================  =================================================================
classification     ``{"text": str, "label": int}``
entailment         ``{"premise": str, "hypothesis": str, "label": int}``
similarity         ``{"a": str, "b": str, "label": int}``
multiple_choice    ``{"context": str, "options": [str, ...] (>= 2), "label": int}``
                   (``label`` indexes ``options``)
=================  =================================================================

Files named ``*.jsonl`` / ``*.jsonl.gz`` are JSON Lines; ``*.tsv`` / ``*.tsv.gz`` are tab-separated
with a header line naming the columns (extra columns are ignored); for multiple choice the
options are the columns whose name starts with ``option`` (in header order; blank cells are
absent options, so rows may have different numbers of options). Texts must be non-blank and
must not contain special-token strings; labels are non-negative integers (``< num_classes``
when that config field is > 0). A bad line stops the build with
``ValueError("<file>:<line>: key '<key>': ...")``.

Splits, hashing and config naming follow the JSONL builders (``data_files``,
``validation_fraction``, ``split_salt``); the hash split keys on a record's input fields, so
identical inputs never land in both ``train`` and ``validation``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.data.builders import common
from rlhf_jax.data.builders.jsonl import JsonlConfig, make_user_config
from rlhf_jax.data.gpt1_schema import FIELDS, TASK_TOKENS, TASKS

_FORBIDDEN = tok_lib.SPECIAL_TOKENS + TASK_TOKENS


@dataclasses.dataclass(eq=False)
class Gpt1TasksConfig(JsonlConfig):
  """``task``: fixed by the config name; ``num_classes``: > 0 bounds the labels."""

  task: str = ""
  num_classes: int = 0


def _text(obj: Mapping, key: str, where: str, label: str | None = None) -> str:
  value = records.text_field(obj, key, where, label=label)
  bad = [t for t in _FORBIDDEN if t in value]
  if bad:
    raise records.field_error(where, label or key, f"contains the special-token string {bad[0]!r}")
  return value


def _label(obj: Mapping, where: str, bound: int, what: str) -> int:
  value = records.get_field(obj, "label", where)
  if isinstance(value, bool) or not isinstance(value, int):
    raise records.field_error(where, "label", f"expected a non-negative integer, got {value!r}")
  if not 0 <= value < bound:
    raise records.field_error(where, "label", f"{value} is out of range [0, {bound}) ({what})")
  return value


def parse_record(task: str, obj: Mapping, where: str, num_classes: int = 0) -> records.Record:
  """One JSON object (or TSV row as a dict) -> a normalised task record; ValueError if malformed."""
  if task not in TASKS:
    raise ValueError(f"gpt1_tasks: unknown task {task!r}; choose one of {TASKS}")
  if task == "multiple_choice":
    options = records.get_field(obj, "options", where)
    if not isinstance(options, list) or len(options) < 2:
      raise records.field_error(where, "options", "expected a list of at least 2 strings")
    opts = [_text({"o": o}, "o", where, label=f"options[{i}]") for i, o in enumerate(options)]
    return {"context": _text(obj, "context", where), "options": opts,
            "label": _label(obj, where, len(opts), f"{len(opts)} options")}
  rec = {k: _text(obj, k, where) for k in FIELDS[task]}
  bound = num_classes if num_classes > 0 else np.iinfo(np.int32).max
  rec["label"] = _label(obj, where, bound, f"num_classes={num_classes}" if num_classes > 0 else "int32")
  return rec


def read_tsv(path: str | Path, task: str) -> Iterator[tuple[str, dict]]:
  """Yields ``("<path>:<line>", row dict)``; the label cell is parsed as an integer, and for
  multiple choice the non-blank ``option*`` cells become ``"options"``."""
  header, cols = None, []
  for n, line in records.read_lines(path):
    cells = line.rstrip("\r\n").split("\t")
    where = f"{path}:{n}"
    if header is None:
      header = [c.strip() for c in cells]
      need = [k for k in FIELDS[task] if k != "options"] + ["label"]
      cols = [c for c in header if c.startswith("option")]
      missing = [k for k in need if k not in header] + (["option*"] if task == "multiple_choice" and not cols
                                                       else [])
      if missing:
        raise records.field_error(where, None, f"TSV header lacks column(s) {missing} for task {task!r}")
      continue
    if len(cells) != len(header):
      raise records.field_error(where, None, f"has {len(cells)} tab-separated cells, the header has {len(header)}")
    row = dict(zip(header, cells))
    try:
      row["label"] = int(row["label"].strip())
    except ValueError:
      raise records.field_error(where, "label", f"expected an integer, got {row['label']!r}") from None
    if task == "multiple_choice":
      row["options"] = [row[c] for c in cols if row[c].strip()]
    yield where, row


def _input_key(rec: Mapping) -> str:
  return json.dumps({k: v for k, v in sorted(rec.items()) if k != "label"}, ensure_ascii=False)


class Gpt1Tasks(common.RecordBuilder):
  """User JSONL/TSV -> GPT-1 task records (classification, entailment, similarity, multiple choice)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = "User-provided GPT-1 fine-tuning tasks (Radford et al. 2018 input schemas)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: relative data_files paths are taken from manual_dir."

  @classmethod
  def make_config(cls, name, manual_dir, **overrides):
    if name not in TASKS:
      raise ValueError(f"{cls.name}: the config name must be a task, one of {TASKS}; got {name!r}")
    if "task" in overrides:
      raise ValueError(f"{cls.name}: 'task' is fixed by the config name")
    num_classes = overrides.get("num_classes", 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
      raise ValueError(f"{cls.name}: num_classes must be a non-negative integer, got {num_classes!r}")
    return make_user_config(Gpt1TasksConfig, name, manual_dir, task=name, **overrides)

  @property
  def kind(self) -> str:
    return self.builder_config.task

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    fields = {k: text() for k in FIELDS[self.kind] if k != "options"}
    if self.kind == "multiple_choice":
      fields["options"] = tfds.features.Sequence(text())
    fields["label"] = tfds.features.Scalar(dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=tfds.features.FeaturesDict({"id": text(), **fields}),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not isinstance(cfg, Gpt1TasksConfig) or cfg.task not in TASKS:
      raise ValueError("gpt1_tasks needs a Gpt1TasksConfig (use rlhf_jax.data.builders.load)")
    files = common.normalise_data_files(cfg.data_files, common.manual_root(dl_manager))
    return common.user_file_splits(self, files, cfg.validation_fraction, cfg.split_salt)

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    cfg = self.builder_config
    labels = collections.Counter()
    for i, path in enumerate(paths):
      name = path.name[:-3] if path.name.endswith(".gz") else path.name
      if name.endswith(".tsv"):
        rows = read_tsv(path, cfg.task)
      elif name.endswith(".jsonl"):
        rows = records.read_jsonl(path)
      else:
        raise ValueError(f"{path}: unknown file type; expected *.jsonl or *.tsv (optionally .gz)")
      for where, obj in rows:
        tally.seen += 1
        rec = parse_record(cfg.task, obj, where, cfg.num_classes)
        labels[rec["label"]] += 1
        yield f"{i}:{path.name}:{where.rsplit(':', 1)[1]}", rec
    tally.extra["labels"] = {str(k): labels[k] for k in sorted(labels)}

  def _generate_examples(self, group, paths, keep=None, validation_fraction=0.0, salt=""):
    # As the base builder, but hash-split on the input fields (the base keys on messages/text).
    tally, kept = records.Tally(), collections.Counter()
    for rid, rec in self._iter_records(group, paths, tally):
      split = group if keep is None else records.assign_split(_input_key(rec), validation_fraction, salt)
      kept[split] += 1
      if keep is None or split == keep:
        yield rid, {"id": rid, **rec}
    self._store_stats(group, paths, tally, kept)
