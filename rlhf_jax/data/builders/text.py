"""TFDS builder ``text_corpus``: plain-text (or ``{"text"}`` JSONL) files -> ``{"text"}`` records.

Plain files (UTF-8, optionally gzipped) are cut into ``unit``s by :func:`records.text_units`:
``"paragraph"`` (default; blank-line separated), ``"line"`` or ``"file"``. Files named ``*.jsonl``
or ``*.jsonl.gz`` are read as one record per line from the ``text_key`` field (blank texts are
skipped and counted). Splits and config naming are as for the JSONL builders; the hash split
keys on the unit's text, so identical paragraphs always land in the same split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data.builders import common
from rlhf_jax.data.builders.jsonl import JsonlConfig, make_user_config


@dataclasses.dataclass(eq=False)
class TextConfig(JsonlConfig):
  """``unit``: "paragraph" | "line" | "file"; ``text_key``: field read from JSONL files."""

  unit: str = "paragraph"
  text_key: str = "text"


def _is_jsonl(path: Path) -> bool:
  return path.name.endswith((".jsonl", ".jsonl.gz"))


class TextCorpus(common.RecordBuilder):
  """Plain text -> pretraining text records."""

  KIND = "text"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = "User-provided plain text for language-model pretraining."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: relative data_files paths are taken from manual_dir."

  @classmethod
  def make_config(cls, name, manual_dir, **overrides):
    cfg = make_user_config(TextConfig, name, manual_dir, **overrides)
    if cfg.unit not in records.TEXT_UNITS:
      raise ValueError(f"unit must be one of {records.TEXT_UNITS}, got {cfg.unit!r}")
    return cfg

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not isinstance(cfg, TextConfig):
      raise ValueError("text_corpus needs a TextConfig (use TextCorpus.make_config or "
                       "rlhf_jax.data.builders.load)")
    files = common.normalise_data_files(cfg.data_files, common.manual_root(dl_manager))
    return common.user_file_splits(self, files, cfg.validation_fraction, cfg.split_salt)

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    cfg = self.builder_config
    for i, path in enumerate(paths):
      if _is_jsonl(path):
        parse = partial(records.parse_text_record, key=cfg.text_key)
        for rid, rec in records.parse_jsonl(path, parse, tally):
          yield f"{i}:{path.name}:{rid.rsplit(':', 1)[1]}", rec
        continue
      for line, unit in records.text_units(records.read_text(path), cfg.unit):
        tally.seen += 1
        yield f"{i}:{path.name}:{line}", {"text": unit}
