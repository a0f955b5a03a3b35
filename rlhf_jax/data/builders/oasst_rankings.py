"""TFDS builder ``oasst_rankings``: OpenAssistant oasst1 trees -> K-way rankings or SFT demos.

The input is oasst1's flat message table (one JSON message per line). Trees are rebuilt by
``parent_id``. Config ``rankings``: every prompter turn with >= ``min_replies`` ranked assistant
replies gives a comparison (dialogue history up to and including that turn, the ranked replies
sorted by rank, dense ranks). Config ``sft``: every prompter turn with >= 1 ranked reply gives a
demonstration ending with its best (rank 0) reply. Ids are the prompter ``message_id``.

Deleted messages are kept by default (``drop_deleted=False``): their rankings are what the
labellers produced, and this reproduces the counts of the source's SOURCE.md. Skips and the
ranked-replies-per-prompt histogram are in ``info.metadata["stats"][split]``.

Source: ``manual_dir`` holding ``<lang>-train.jsonl`` and/or ``<lang>-validation.jsonl`` (optionally
``.gz``), e.g. from ``load_dataset("OpenAssistant/oasst1")`` rows written as JSON lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data.builders import common

SPLITS = ("train", "validation")


@dataclasses.dataclass(eq=False)
class OasstConfig(tfds.core.BuilderConfig):
  """``mode``: "rankings" | "sft"; ``lang``: file prefix; see module docstring for the rest."""

  mode: str = "rankings"
  lang: str = "en"
  min_replies: int = 2
  drop_deleted: bool = False


class OasstRankings(common.RecordBuilder):
  """oasst1 human rankings: K-way comparisons (``rankings``) or rank-0 demonstrations (``sft``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      OasstConfig(name="rankings", mode="rankings",
                  description="K >= 2 ranked sibling replies per prompter turn -> comparisons"),
      OasstConfig(name="sft", mode="sft",
                  description="rank-0 reply with full history per prompter turn -> demonstrations"),
  ]
  DESCRIPTION = "OpenAssistant oasst1 ranked sibling replies (K-way comparisons or SFT demos)."

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put <lang>-train.jsonl and/or <lang>-validation.jsonl (oasst1 message rows, one JSON "
      "object per line; .jsonl.gz also accepted) in manual_dir."
  )
  HOMEPAGE = "https://huggingface.co/datasets/OpenAssistant/oasst1"
  CITATION = ("Köpf et al. 2023, OpenAssistant Conversations - Democratizing Large Language "
              "Model Alignment, arXiv:2304.07327")

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual = common.manual_root(dl_manager)
    if manual is None:
      raise ValueError(f"{self.name} needs manual_dir: {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    files = {}
    for split in SPLITS:
      found = [p for p in (manual / f"{cfg.lang}-{split}.jsonl",
                           manual / f"{cfg.lang}-{split}.jsonl.gz") if p.is_file()]
      if found:
        files[split] = found[0]
    if not files:
      raise ValueError(f"manual_dir {manual} has no {cfg.lang}-train.jsonl or "
                       f"{cfg.lang}-validation.jsonl")
    return {split: self._generate_examples(split, [path]) for split, path in files.items()}

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    cfg = self.builder_config
    messages = [m for p in paths for m in records.read_oasst(p)]
    yield from records.oasst_records(messages, cfg.mode, tally, min_replies=cfg.min_replies,
                                     drop_deleted=cfg.drop_deleted)

  @property
  def kind(self) -> str:
    return "comparison" if self.builder_config.mode == "rankings" else "demonstration"
