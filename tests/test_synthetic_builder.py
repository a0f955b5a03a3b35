"""Tests for the `synthetic_instruct` TFDS builder (built small into a tmp dir)."""
import json

import pytest

from rlhf_jax.data import builders as B
from rlhf_jax.data import comparisons, pipeline, synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.data.builders.synthetic_instruct import SyntheticInstruct

SIZES = dict(num_pretrain_docs=40, num_demonstrations=30, num_eval_demonstrations=12,
             num_train_prompts=25, num_eval_prompts=10, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def load(config, split, data_dir, **kw):
  fields = {k: v for k, v in SIZES.items() if k.startswith("num_") or k == "seed"}
  return B.load(f"synthetic_instruct/{config}", split, data_dir, **{**fields, **kw})


def test_registered_with_default_sizes():
  assert B.BUILDERS["synthetic_instruct"] is SyntheticInstruct
  configs = {c.name: c for c in SyntheticInstruct.BUILDER_CONFIGS}
  assert set(configs) == {"pretrain", "demonstrations", "prompts"}
  cfg = configs["prompts"]
  assert (cfg.num_pretrain_docs, cfg.num_demonstrations, cfg.num_train_prompts, cfg.num_eval_prompts) == (
      20_000, 2_000, 2_000, 500)
  kinds = {name: SyntheticInstruct(config=name, data_dir="/nonexistent").kind for name in configs}
  assert kinds == {"pretrain": "text", "demonstrations": "demonstration", "prompts": "prompt"}


def test_pretrain_config_is_the_corpus(data_dir):
  src = load("pretrain", "train", data_dir)
  assert len(src) == SIZES["num_pretrain_docs"] == src.stats["train"]["seen"]
  assert [r["text"] for r in src] == synthetic.pretraining_corpus(SIZES["num_pretrain_docs"], SIZES["seed"])
  assert src[0]["id"] == "pretrain/train:0" and set(src[0]) == {"id", "text"}


def test_demonstrations_append_the_response_as_assistant_turn(data_dir):
  train = load("demonstrations", "train", data_dir)
  evals = load("demonstrations", "eval", data_dir)
  assert (len(train), len(evals)) == (SIZES["num_demonstrations"], SIZES["num_eval_demonstrations"])
  raw = synthetic.demonstrations(SIZES["num_demonstrations"], SIZES["seed"])
  for rec, want in zip(train, raw):
    assert set(rec) == {"id", "messages", "task"}
    assert rec["messages"] == want["messages"] + [{"role": "assistant", "content": want["response"]}]
    assert json.loads(rec["task"]) == want["task"]
  # Eval demonstrations answer held-out instances only, correctly (REFUSAL for harmful ones).
  for rec in evals:
    task = synthetic.Task.from_dict(json.loads(rec["task"]))
    assert synthetic.task_split(task) == "eval"
    assert rec["messages"][-1] == {"role": "assistant", "content": task.answer}


def test_prompts_splits_sizes_and_disjoint_instances(data_dir):
  train = load("prompts", "train", data_dir)
  evals = load("prompts", "eval", data_dir)
  assert (len(train), len(evals)) == (SIZES["num_train_prompts"], SIZES["num_eval_prompts"])
  assert train.stats["eval"]["kept"] == {"eval": SIZES["num_eval_prompts"]}
  for split, src in (("train", train), ("eval", evals)):
    raw = synthetic.prompts(len(src), SIZES["seed"], split=split)
    assert [r["messages"] for r in src] == [r["messages"] for r in raw]
    assert [json.loads(r["task"]) for r in src] == [r["task"] for r in raw]
    assert all(r["messages"][-1]["role"] == "user" for r in src)
  keys = lambda src: {synthetic.Task.from_dict(json.loads(r["task"])).key for r in src}
  assert not keys(train) & keys(evals)


def test_builder_records_feed_the_pipelines(data_dir):
  prompts = load("prompts", "train", data_dir)
  demos = load("demonstrations", "train", data_dir)
  tok = tok_lib.train_bpe([r["text"] for r in load("pretrain", "train", data_dir)], vocab_size=300)
  it = pipeline.prompt_batches(prompts, tok, 5, 64, seed=0, shard_index=0, shard_count=1)
  batch = next(it)
  for row, idx in zip(batch["tokens"], batch["index"]):
    # `index` recovers the record, hence the task the rollout must be scored against.
    assert tok.decode(row).endswith(json.loads(prompts[int(idx)]["task"])["prompt_text"])
  sft = next(pipeline.sft_batches(demos, tok, 4, 64, seed=0, shard_index=0, shard_count=1))
  assert sft["mask"].sum(axis=1).min() >= 2  # at least one answer token + EOS per row
  # The gold labeler reads the builder's JSON task string.
  answers = [[json.loads(r["task"])["answer"], "i do not know."] for r in prompts]
  labelled = comparisons.label_comparisons(list(prompts), answers, rng=None)
  assert len(labelled) == len(prompts) and labelled.stats.num_skipped == 0
  assert all(r["ranks"] == [0, 1] for r in labelled)  # the correct answer (or REFUSAL) first
  assert [r["task"] for r in labelled] == [r["task"] for r in prompts]


def test_config_errors():
  with pytest.raises(ValueError, match="'mode' is fixed"):
    B.get_builder("synthetic_instruct/prompts", "/tmp/unused", mode="pretrain")
  with pytest.raises(ValueError, match="positive integer"):
    B.get_builder("synthetic_instruct/prompts", "/tmp/unused", num_eval_prompts=0)
  with pytest.raises(ValueError, match="unknown config"):
    B.get_builder("synthetic_instruct/rankings", "/tmp/unused")
  with pytest.raises(ValueError, match="unknown config fields"):
    B.get_builder("synthetic_instruct/prompts", "/tmp/unused", num_prompts=3)
