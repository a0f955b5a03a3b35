"""TFDS builder ``hh_rlhf``: Anthropic HH-RLHF preference pairs as K=2 comparisons.

Each ``{"chosen", "rejected"}`` transcript pair becomes ``{"messages": prompt dialogue,
"responses": [chosen reply, rejected reply], "ranks": [0, 1]}`` (see
:func:`rlhf_jax.data.records.parse_hh_pair` for the skip rules; skips are counted in
``info.metadata["stats"]``). One config per subset; splits are whichever of ``train`` / ``test``
exist.

Sources: with ``manual_dir`` (files ``<manual_dir>/<subset>/{train,test}.jsonl.gz``, or
uncompressed ``.jsonl``) nothing is downloaded. Without it, the files are fetched from the
anthropics/hh-rlhf repository through ``media.githubusercontent.com``: the repository stores them in
Git LFS, and ``raw.githubusercontent.com`` would serve only the LFS pointer (which the reader
detects and rejects with a clear error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.data import records
from rlhf_jax.data.builders import common

SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
SPLITS = ("train", "test")
URL_TEMPLATE = "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/{subset}/{split}.jsonl.gz"


@dataclasses.dataclass(eq=False)
class HhRlhfConfig(tfds.core.BuilderConfig):
  """``subset``: folder of the hh-rlhf repository; ``url_template``: ``{subset}``/``{split}``."""

  subset: str = "helpful-base"
  url_template: str = URL_TEMPLATE


class HhRlhf(common.RecordBuilder):
  """Anthropic HH-RLHF pairwise preferences -> comparisons (K=2)."""

  KIND = "comparison"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [HhRlhfConfig(name=s, subset=s, description=f"HH-RLHF {s}") for s in SUBSETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. Put <subset>/train.jsonl.gz and/or <subset>/test.jsonl.gz from "
      "https://github.com/anthropics/hh-rlhf in manual_dir (Git LFS files: use `git lfs pull`)."
  )
  DESCRIPTION = "Anthropic HH-RLHF human preference pairs (chosen vs rejected assistant reply)."
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  CITATION = ("Bai et al. 2022, Training a Helpful and Harmless Assistant with Reinforcement "
              "Learning from Human Feedback, arXiv:2204.05862")

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual = common.manual_root(dl_manager)
    if manual is not None:
      files = {}
      for split in SPLITS:
        found = [p for p in (manual / cfg.subset / f"{split}.jsonl.gz",
                             manual / cfg.subset / f"{split}.jsonl") if p.is_file()]
        if found:
          files[split] = found[0]
      if not files:
        raise ValueError(f"manual_dir {manual} has no {cfg.subset}/train.jsonl.gz or "
                         f"{cfg.subset}/test.jsonl.gz")
    else:
      urls = {s: cfg.url_template.format(subset=cfg.subset, split=s) for s in SPLITS}
      files = {s: Path(p) for s, p in dl_manager.download(urls).items()}
    return {split: self._generate_examples(split, [path]) for split, path in files.items()}

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    for path in paths:
      for rid, rec in records.parse_jsonl(path, records.parse_hh_pair, tally):
        # "<subset>/<split>:<line>": stable across machines and download caches.
        yield f"{self.builder_config.subset}/{group}:{rid.rsplit(':', 1)[1]}", rec
