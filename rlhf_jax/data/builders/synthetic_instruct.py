"""TFDS builder ``synthetic_instruct``: the built-in instruction world (`data/synthetic.py`) as
array_record datasets, so synthetic runs read their data exactly like real ones.

Configs (record kinds of :mod:`rlhf_jax.data.records`) and splits:

- ``pretrain``: ``{"text"}`` misaligned web-text-like documents (`synthetic.pretraining_corpus`);
  split ``train`` (``num_pretrain_docs``, default 20k). Documents carry no EOS; the packer adds one.
- ``demonstrations``: ``{"messages", "task"}`` labeller demonstrations: the prompt dialogue with
  the correct, concise answer (REFUSAL for harmful requests) appended as the assistant turn.
  Split ``train`` (`synthetic.demonstrations`, ``num_demonstrations``, default 2k) and ``eval``
  (answers to the held-out prompts of ``synthetic.prompts(..., split="eval")``,
  ``num_eval_demonstrations``, default 500; the same instances as ``prompts/eval`` at equal
  seed and size, and never a ``train`` instance).
- ``prompts``: ``{"messages", "task"}`` prompt dialogues for PPO; splits ``train``
  (``num_train_prompts``, default 2k) and ``eval`` (``num_eval_prompts``, default 500).

``task`` is the `synthetic.Task` dict as a JSON string, so the gold labeler can score responses:
``gold.score(json.loads(rec["task"]), response)``; `comparisons.label_comparisons` does this itself.
Rankings are not a config: they come later from SFT samples and the gold labeler
(:func:`rlhf_jax.data.comparisons.label_comparisons`). Everything is a pure function of ``seed``;
sizes and seed are config fields, e.g. ``load("synthetic_instruct/prompts", "eval", data_dir,
num_eval_prompts=50)`` (overrides give a derived, separately cached config).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.data import records, synthetic
from rlhf_jax.data.builders import common

MODES = {"pretrain": "text", "demonstrations": "demonstration", "prompts": "prompt"}
SPLITS = {"pretrain": ("train",), "demonstrations": ("train", "eval"), "prompts": ("train", "eval")}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """``mode``: one of ``MODES`` (fixed per predefined config); sizes per split; ``seed``."""

  mode: str = "pretrain"
  seed: int = 0
  num_pretrain_docs: int = 20_000
  num_demonstrations: int = 2_000
  num_eval_demonstrations: int = 500
  num_train_prompts: int = 2_000
  num_eval_prompts: int = 500


class SyntheticInstruct(common.RecordBuilder):
  """The synthetic instruction world: pretraining text, demonstrations, PPO prompts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="pretrain", mode="pretrain",
                      description="misaligned web-text-like documents -> text records"),
      SyntheticConfig(name="demonstrations", mode="demonstrations",
                      description="correct concise answers to train/eval prompts -> demonstrations"),
      SyntheticConfig(name="prompts", mode="prompts",
                      description="train/eval prompts (with their task) for PPO rollouts"),
  ]
  DESCRIPTION = "Built-in synthetic instruction-following world (rlhf_jax.data.synthetic)."

  @classmethod
  def make_config(cls, name, manual_dir, **overrides):
    if "mode" in overrides:
      raise ValueError(f"{cls.name}: 'mode' is fixed by the config name; choose one of {sorted(MODES)}")
    for key, value in overrides.items():
      if key.startswith("num_") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{cls.name}: {key} must be a positive integer, got {value!r}")
    if "seed" in overrides and (isinstance(overrides["seed"], bool) or not isinstance(overrides["seed"], int)):
      raise ValueError(f"{cls.name}: seed must be an integer, got {overrides['seed']!r}")
    return super().make_config(name, manual_dir, **overrides)

  @property
  def kind(self) -> str:
    return MODES[self.builder_config.mode]

  def _info(self) -> tfds.core.DatasetInfo:
    base = common.features_for(self.kind)
    fields = {k: base[k] for k in base.keys()}
    if self.kind != "text":
      fields["task"] = tfds.features.Text()  # JSON of synthetic.Task.to_dict()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(fields),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # source order; pipelines shuffle indices themselves
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, []) for split in SPLITS[self.builder_config.mode]}

  def _iter_records(self, group: str, paths: Sequence[Path], tally: records.Tally
                    ) -> Iterator[tuple[str, records.Record]]:
    cfg = self.builder_config
    for i, rec in enumerate(_records(cfg, group)):
      tally.seen += 1
      yield f"{cfg.mode}/{group}:{i}", rec


def _task_json(rec: dict) -> str:
  return json.dumps(rec["task"], sort_keys=True)


def _records(cfg: SyntheticConfig, split: str) -> list[records.Record]:
  """The normalised records of one split (a pure function of the config)."""
  if cfg.mode == "pretrain":
    return [{"text": d} for d in synthetic.pretraining_corpus(cfg.num_pretrain_docs, cfg.seed)]
  if cfg.mode == "demonstrations":
    raw = (synthetic.demonstrations(cfg.num_demonstrations, cfg.seed) if split == "train" else
           [dict(p, response=p["task"]["answer"])
            for p in synthetic.prompts(cfg.num_eval_demonstrations, cfg.seed, split="eval")])
    return [{"messages": r["messages"] + [{"role": "assistant", "content": r["response"]}],
             "task": _task_json(r)} for r in raw]
  n = cfg.num_train_prompts if split == "train" else cfg.num_eval_prompts
  return [{"messages": r["messages"], "task": _task_json(r)} for r in synthetic.prompts(n, cfg.seed, split=split)]
