"""TFDS builders for users' own JSON Lines: ``jsonl_demonstrations``, ``jsonl_comparisons``,
``jsonl_prompts``.

Accepted line shapes are all those of :func:`records.detect_shape` (TRL's standard and
conversational language-modelling, prompt-only, prompt-completion and preference forms, the
implicit-prompt preference form, our K-way ``responses``/``ranks``, ``prompt``/``response``,
Self-Instruct and Alpaca), each read as the builder's record kind by :func:`records.parse_line`
(a preference line gives a demonstration with its chosen reply, or a prompt; a line whose shape
cannot give the kind is an error). A malformed line stops the build with
``ValueError("<file>:<line>: key '<key>': ...")``; skip-worthy comparisons (blank, duplicate or
all-tied responses, implicit-prompt pairs without a shared prompt) are counted. Shapes are read
line by line here; :func:`rlhf_jax.data.sources.load` reads files without TFDS and holds a file
to one shape.

Splits: ``data_files={"train": [...], "test": [...]}`` gives one split per entry. With
``validation_fraction=f > 0`` the ``train`` files are divided by a hash of each record's prompt
(:func:`records.assign_split`, salted by ``split_salt``) into ``train`` and ``validation``, so the two
never share a prompt. The config name is ``"<label>-<digest>"``, the digest covering the resolved
paths, their sizes and mtimes, and the options: editing a file or an option gives a fresh build.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data.builders import common


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
  """``data_files``: {split: [paths]}; see module docstring for the split options."""

  data_files: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  validation_fraction: float = 0.0
  split_salt: str = ""


def make_user_config(config_cls, name: str | None, manual_dir: str | os.PathLike | None,
                     data_files: Any = None, **options) -> tfds.core.BuilderConfig:
  """A content-named config for user files (shared by the JSONL and text builders)."""
  if data_files is None:
    raise ValueError("data_files is required: a path, a list of paths or {split: paths}")
  files = common.normalise_data_files(data_files, manual_dir)
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f"unknown config fields {unknown} for {config_cls.__name__}")
  cfg = config_cls(name="tmp", data_files=files, **options)
  common.check_validation_fraction(files, cfg.validation_fraction)
  digest = common.config_digest({
      "files": common.file_fingerprint(files),
      **{k: getattr(cfg, k) for k in sorted(known - {"name", "data_files", "version",
                                                         "release_notes", "supported_versions",
                                                         "description", "tags"})},
  })
  label = "".join(c if c.isalnum() or c in "_-" else "_" for c in (name or "custom"))
  return dataclasses.replace(cfg, name=f"{label}-{digest}")


class _JsonlBuilder(common.RecordBuilder, skip_registration=True):
  """Reads ``data_files`` line by line through ``PARSE``."""

  PARSE: Callable[[dict, str], Any]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: relative data_files paths are taken from manual_dir."

  @classmethod
  def make_config(cls, name, manual_dir, **overrides):
    return make_user_config(JsonlConfig, name, manual_dir, **overrides)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not isinstance(cfg, JsonlConfig):
      raise ValueError(f"{self.name} needs a JsonlConfig (use {type(self).__name__}"
                       ".make_config or rlhf_jax.data.builders.load)")
    files = common.normalise_data_files(cfg.data_files, common.manual_root(dl_manager))
    return common.user_file_splits(self, files, cfg.validation_fraction, cfg.split_salt)

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    for i, path in enumerate(paths):
      for rid, rec in records.parse_jsonl(path, type(self).PARSE, tally):
        # "<file index>:<file name>:<line>" is unique even for same-named files.
        yield f"{i}:{path.name}:{rid.rsplit(':', 1)[1]}", rec


class JsonlDemonstrations(_JsonlBuilder):
  """User JSONL -> SFT demonstrations."""

  KIND = "demonstration"
  PARSE = staticmethod(records.parse_demonstrations)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = "User-provided demonstrations (prompt dialogue + assistant response)."


class JsonlComparisons(_JsonlBuilder):
  """User JSONL -> K-way ranked comparisons."""

  KIND = "comparison"
  PARSE = staticmethod(records.parse_comparison)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = "User-provided comparisons (prompt dialogue + K ranked responses)."


class JsonlPrompts(_JsonlBuilder):
  """User JSONL -> prompts for PPO rollouts."""

  KIND = "prompt"
  PARSE = staticmethod(records.parse_prompts)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = "User-provided prompts (dialogues ending with a user turn)."
