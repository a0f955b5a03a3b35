"""TFDS dataset builders for RLHF data, written as array_record and read as random-access sources.

Builders (``name`` / configs):

- ``hh_rlhf/<subset>``: Anthropic HH-RLHF pairs -> comparisons; subsets ``helpful-base``,
  ``helpful-online``, ``helpful-rejection-sampled``, ``harmless-base``.
- ``oasst_rankings/rankings`` and ``oasst_rankings/sft``: oasst1 trees -> K-way comparisons or
  rank-0 demonstrations.
- ``jsonl_demonstrations``, ``jsonl_comparisons``, ``jsonl_prompts``, ``text_corpus``: user files
  given as ``data_files=...`` (optional ``/<label>`` after the name names the cached build).
- ``gpt1_tasks/<task>``: GPT-1 fine-tuning tasks (classification, entailment, similarity,
  multiple_choice) from user JSONL/TSV ``data_files``.

Usage::

    src = load("hh_rlhf/helpful-base", "test", data_dir, manual_dir=".../hh_rlhf")
    len(src), src[0]["responses"], src.stats["test"]["skipped"]

No TensorFlow is needed: TFDS builds and reads ``array_record`` files with numpy only.
``data_dir`` must be given (an empty one is refused: TFDS would build into the current directory).
Stages read data through :func:`rlhf_jax.data.sources.load`, which picks the cache directory,
the raw-file folder and the held-out split, and reads user files of any TRL shape directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.data.builders.common import RecordBuilder, RecordSource
from rlhf_jax.data.builders.gpt1_tasks import Gpt1Tasks
from rlhf_jax.data.builders.hh_rlhf import HhRlhf
from rlhf_jax.data.builders.jsonl import JsonlComparisons, JsonlDemonstrations, JsonlPrompts
from rlhf_jax.data.builders.oasst_rankings import OasstRankings
from rlhf_jax.data.builders.synthetic_instruct import SyntheticInstruct
from rlhf_jax.data.builders.text import TextCorpus

BUILDERS: dict[str, type[RecordBuilder]] = {
    cls.name: cls
    for cls in (HhRlhf, OasstRankings, JsonlDemonstrations, JsonlComparisons, JsonlPrompts,
                TextCorpus, SyntheticInstruct, Gpt1Tasks)
}

__all__ = ["BUILDERS", "RecordSource", "check_data_dir", "get_builder", "load", "open_split",
           "prepare"]


def check_data_dir(data_dir: str | os.PathLike | None) -> str:
  """``data_dir`` as a string; an empty one is refused (TFDS would build into the current
  directory)."""
  if data_dir is None or not os.fspath(data_dir).strip():
    raise ValueError(
        "data_dir is empty: the TFDS build (and its downloads/) would be written into the "
        "current directory. Pass a cache directory (a stage uses <workdir>/data), or read "
        "through rlhf_jax.data.sources.load, which defaults to $TFDS_DATA_DIR or "
        "~/tensorflow_datasets")
  return os.fspath(data_dir)


def get_builder(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
                **config) -> RecordBuilder:
  """The array_record builder for ``"<builder>[/<config or label>]"`` and config fields.

  ``config`` holds config fields: overrides of a predefined config (e.g. ``drop_deleted=True``),
  or for user-file builders ``data_files`` plus options. Raises ``ValueError`` for unknown names
  and for an empty ``data_dir``.
  """
  data_dir = check_data_dir(data_dir)
  base, _, sub = name.partition("/")
  if base not in BUILDERS:
    raise ValueError(f"unknown dataset {base!r}; choose one of {sorted(BUILDERS)}")
  cls = BUILDERS[base]
  cfg = cls.make_config(sub or None, manual_dir, **config)
  # Predefined configs go by name: TFDS re-creates builders from their init kwargs when
  # unpickling, and rejects a copied config object that shares a predefined name.
  predefined = any(cfg is c for c in cls.BUILDER_CONFIGS)
  return cls(config=cfg.name if predefined else cfg, data_dir=data_dir,
             file_format="array_record")


def prepare(builder: RecordBuilder, manual_dir: str | os.PathLike | None = None) -> RecordBuilder:
  """Builds ``builder`` into its data_dir unless already built (then it is a no-op)."""
  if builder.is_prepared():
    return builder
  if manual_dir is not None:
    path = Path(manual_dir)
    if not path.is_dir() or not any(path.iterdir()):
      raise ValueError(f"manual_dir {path} does not exist or is empty")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
  return builder


def load(name: str, split: str, data_dir: str | os.PathLike,
         manual_dir: str | os.PathLike | None = None, **config) -> RecordSource:
  """Builds once (cached under ``data_dir``) and returns split ``split`` as a random-access source.

  ``split`` may use TFDS slicing (``"train[:10%]"``). ``source.stats`` holds the build report
  (``seen``/``kept``/``skipped`` per source split).
  """
  builder = prepare(get_builder(name, data_dir, manual_dir, **config), manual_dir)
  if "[" not in split and split not in builder.info.splits:
    raise ValueError(f"{name}: no split {split!r}; available: {sorted(builder.info.splits)}")
  return open_split(builder, split)


def open_split(builder: RecordBuilder, split: str) -> RecordSource:
  """Split ``split`` of a prepared builder as a random-access source (with the build stats)."""
  return RecordSource(builder.as_data_source(split=split), builder.info.features,
                      builder.info.metadata.get("stats", {}))
