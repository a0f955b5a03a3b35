"""Tests for rlhf_jax.data.builders: array_record builds, random-access reads, stats, errors."""

import gzip
import json
import os
import pickle

import pytest

from rlhf_jax.data import builders as B
from rlhf_jax.data import records as R
from rlhf_jax.data.builders.hh_rlhf import HhRlhf

from data_fixtures import need, write_jsonl  # tests/ is on sys.path


def strip_id(example: dict) -> dict:
  return {k: v for k, v in example.items() if k != "id"}


def assert_python_types(example: dict) -> None:
  """Decoded examples hold only python str / int / list / dict (no bytes, no numpy)."""
  def check(v):
    if isinstance(v, dict):
      assert all(isinstance(k, str) for k in v)
      for x in v.values():
        check(x)
    elif isinstance(v, list):
      for x in v:
        check(x)
    else:
      assert type(v) in (str, int), type(v)
  check(example)


# ------------------------------------------------------------------------------------ HH-RLHF


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
  manual = need("hh_rlhf")
  data_dir = tmp_path_factory.mktemp("tfds")
  return B.load("hh_rlhf/helpful-base", "test", data_dir, manual_dir=manual), data_dir, manual


def test_hh_helpful_base_counts_reconcile_with_file(hh):
  src, _, manual = hh
  path = manual / "helpful-base" / "test.jsonl.gz"
  with gzip.open(path, "rt", encoding="utf-8") as f:
    file_lines = sum(1 for _ in f)
  stats = src.stats["test"]
  assert file_lines == stats["seen"] == 2354
  assert len(src) == stats["kept"]["test"] == 2339
  assert stats["skipped"] == {"duplicate_responses": 2, "empty_response": 4, "prompt_mismatch": 9}
  assert stats["seen"] == len(src) + sum(stats["skipped"].values())
  assert stats["first_skip"]["prompt_mismatch"].endswith("test.jsonl.gz:169")


def test_hh_records_match_parser_in_source_order(hh):
  src, _, manual = hh
  expected = list(R.parse_jsonl(manual / "helpful-base" / "test.jsonl.gz", R.parse_hh_pair,
                                R.Tally()))
  got = list(src)
  assert len(got) == len(expected)
  for example, (where, record) in zip(got, expected):
    assert example["id"] == "helpful-base/test:" + where.rsplit(":", 1)[1]
    assert strip_id(example) == record
  assert_python_types(got[0])
  assert src[-1] == got[-1] and src[len(src) - 1] == got[-1]
  with pytest.raises(IndexError):
    src[len(src)]


def test_hh_reload_is_cached_slicable_and_picklable(hh, monkeypatch):
  src, data_dir, manual = hh
  def fail(*args, **kwargs):
    raise AssertionError("a prepared dataset must not be rebuilt")
  monkeypatch.setattr(HhRlhf, "_split_generators", fail)
  again = B.load("hh_rlhf/helpful-base", "test", data_dir, manual_dir=manual)
  assert len(again) == len(src) and again[5] == src[5] and again.stats == src.stats
  head = B.load("hh_rlhf/helpful-base", "test[:10]", data_dir)
  assert [head[i] for i in range(len(head))] == [src[i] for i in range(10)]
  clone = pickle.loads(pickle.dumps(src))
  assert clone[7] == src[7] and clone.__getitems__([1, 3]) == [src[1], src[3]]


def test_hh_manual_dir_without_subset_files_is_an_error(tmp_path):
  manual = tmp_path / "manual"
  (manual / "helpful-online").mkdir(parents=True)
  (manual / "helpful-online" / "test.jsonl.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="has no harmless-base/train.jsonl.gz"):
    B.load("hh_rlhf/harmless-base", "test", tmp_path / "d", manual_dir=manual)
  with pytest.raises(ValueError, match="does not exist or is empty"):
    B.load("hh_rlhf/harmless-base", "test", tmp_path / "d", manual_dir=tmp_path / "nothing")


def fake_download(monkeypatch, files: dict):
  """Serves ``url -> local file`` in place of the network; records the requested URLs."""
  import tensorflow_datasets as tfds
  requested = []
  def download(self, urls):
    requested.extend(urls.values())
    return {k: files[url] for k, url in urls.items()}
  monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
  return requested


def test_hh_download_path_uses_lfs_media_urls_and_rejects_pointers(tmp_path, monkeypatch):
  pair = {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}
  data = tmp_path / "data.jsonl.gz"
  data.write_bytes(gzip.compress((json.dumps(pair) + "\n").encode()))
  url = "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/harmless-base/{}.jsonl.gz"
  requested = fake_download(monkeypatch, {url.format("train"): data, url.format("test"): data})
  src = B.load("hh_rlhf/harmless-base", "train", tmp_path / "d")
  assert sorted(requested) == [url.format("test"), url.format("train")]
  assert [strip_id(e) for e in src] == [{"messages": [{"role": "user", "content": "q"}],
                                         "responses": ["good", "bad"], "ranks": [0, 1]}]
  pointer = tmp_path / "pointer"
  pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
  fake_download(monkeypatch, {url.format("train"): pointer, url.format("test"): pointer})
  with pytest.raises(ValueError, match="Git LFS pointer"):
    B.load("hh_rlhf/harmless-base", "train", tmp_path / "d2")


def test_source_feeds_grain(hh):
  grain = pytest.importorskip("grain")
  src = hh[0]
  ds = grain.MapDataset.source(src).shuffle(seed=0)
  ids = [ds[i]["id"] for i in range(len(ds))]
  assert len(ids) == len(src) and sorted(ids) == sorted(e["id"] for e in src)


# -------------------------------------------------------------------------------------- OASST


@pytest.fixture(scope="module")
def oasst(tmp_path_factory):
  manual = need("oasst1_en_validation")
  data_dir = tmp_path_factory.mktemp("tfds")
  return data_dir, manual


def test_oasst_rankings_counts_and_parity(oasst):
  data_dir, manual = oasst
  src = B.load("oasst_rankings/rankings", "validation", data_dir, manual_dir=manual)
  stats = src.stats["validation"]
  hist = {int(k): n for k, n in stats["ranked_replies_per_prompt"].items()}
  assert sum(n for k, n in hist.items() if k >= 3) == 281
  assert stats["seen"] == sum(n for k, n in hist.items() if k >= 2) == 418
  assert stats["skipped"] == {"duplicate_responses": 1}
  assert len(src) == stats["kept"]["validation"] == 417
  got = list(src)
  sizes = [len(e["responses"]) for e in got]
  assert {k: sizes.count(k) for k in set(sizes)} == {2: 137, 3: 266, 4: 13, 5: 1}
  expected = list(R.oasst_records(R.read_oasst(manual / "en-validation.jsonl"), "rankings",
                                  R.Tally()))
  assert [(e["id"], strip_id(e)) for e in got] == expected
  assert_python_types(got[0])


def test_oasst_sft_and_overridden_config(oasst):
  data_dir, manual = oasst
  sft = B.load("oasst_rankings/sft", "validation", data_dir, manual_dir=manual)
  assert len(sft) == 419 and set(sft[0]) == {"id", "messages"}
  assert all(e["messages"][-1]["role"] == "assistant" for e in sft)
  dropped = B.load("oasst_rankings/rankings", "validation", data_dir, manual_dir=manual,
                   drop_deleted=True)
  assert len(dropped) == 415
  builder = B.get_builder("oasst_rankings/rankings", data_dir, drop_deleted=True)
  assert builder.builder_config.name.startswith("rankings-") and builder.is_prepared()
  with pytest.raises(ValueError, match="unknown config fields"):
    B.get_builder("oasst_rankings/rankings", data_dir, min_reply=3)


# ------------------------------------------------------------------------------ user JSONL files


def test_jsonl_comparisons_explicit_splits_and_skip_stats(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "q1", "responses": ["a", "b", "c"], "ranks": [3, 0, 3]},
      {"prompt": "q2", "responses": ["a", "b"], "ranks": [1, 1]},           # all_tied
      "",
      {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q3"}],
       "chosen": "x", "rejected": "y"},
  ])
  test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "t", "chosen": "u", "rejected": "u"},
                                               {"prompt": "t2", "chosen": "u", "rejected": "v"}])
  files = {"train": str(train), "test": str(test)}
  src = B.load("jsonl_comparisons/mine", "train", tmp_path / "d", data_files=files)
  assert [strip_id(e) for e in src] == [
      {"messages": [{"role": "user", "content": "q1"}], "responses": ["a", "b", "c"],
       "ranks": [1, 0, 1]},
      {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q3"}],
       "responses": ["x", "y"], "ranks": [0, 1]}]
  assert [e["id"] for e in src] == ["0:train.jsonl:1", "0:train.jsonl:4"]
  assert src.stats["train"]["skipped"] == {"all_tied": 1} and src.stats["train"]["seen"] == 3
  held = B.load("jsonl_comparisons/mine", "test", tmp_path / "d", data_files=files)
  assert len(held) == 1 and held.stats["test"]["skipped"] == {"duplicate_responses": 1}
  with pytest.raises(ValueError, match="no split 'validation'"):
    B.load("jsonl_comparisons/mine", "validation", tmp_path / "d", data_files=files)


def test_jsonl_builders_read_trl_shapes(tmp_path):
  """TRL's conversational preference lines, once refused ("expected a string, got list")."""
  user, good, bad = ({"role": r, "content": c} for r, c in
                     (("user", "q"), ("assistant", "good"), ("assistant", "bad")))
  path = write_jsonl(tmp_path / "prefs.jsonl", [
      {"prompt": [user], "chosen": [good], "rejected": [bad]},
      {"prompt": [user], "chosen": [good], "rejected": [{"role": "assistant", "content": ""}]},
  ])
  comparisons = B.load("jsonl_comparisons", "train", tmp_path / "d", data_files=path)
  assert [strip_id(e) for e in comparisons] == [
      {"messages": [user], "responses": ["good", "bad"], "ranks": [0, 1]}]
  assert comparisons.stats["train"]["skipped"] == {"empty_response": 1}
  demos = B.load("jsonl_demonstrations", "train", tmp_path / "d", data_files=path)
  assert [strip_id(e) for e in demos] == [{"messages": [user, good]}] * 2
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user]}])
  assert [strip_id(e) for e in B.load("jsonl_prompts", "train", tmp_path / "d",
                                      data_files=prompts)] == [{"messages": [user]}]
  with pytest.raises(ValueError, match="prompts.jsonl:1: no demonstration fields: this is a "
                     "'conversational_prompt_only' line"):
    B.load("jsonl_demonstrations", "train", tmp_path / "d", data_files=prompts)


def test_jsonl_bad_line_fails_build_with_location_then_fixed_file_builds(tmp_path):
  path = write_jsonl(tmp_path / "demos.jsonl", [
      {"prompt": "p", "response": "r"},
      {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
  ])
  with pytest.raises(ValueError, match=f"{path}:2: key 'messages\\[1\\].role': unknown role"):
    B.load("jsonl_demonstrations", "train", tmp_path / "d", data_files=path)
  broken = B.get_builder("jsonl_demonstrations", tmp_path / "d", data_files=path)
  assert not broken.is_prepared()
  write_jsonl(path, [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "a"}])
  os.utime(path, ns=(1, 1))  # a different mtime even on coarse filesystem clocks
  fixed = B.get_builder("jsonl_demonstrations", tmp_path / "d", data_files=path)
  assert fixed.builder_config.name != broken.builder_config.name
  assert len(B.load("jsonl_demonstrations", "train", tmp_path / "d", data_files=path)) == 2


def test_self_instruct_hash_split_is_disjoint_and_shared_across_kinds(tmp_path):
  seed = need("self_instruct_seed/seed_tasks.jsonl")
  opts = dict(data_files=str(seed), validation_fraction=0.2, split_salt="v1")
  demos = {s: B.load("jsonl_demonstrations", s, tmp_path, **opts) for s in ("train", "validation")}
  prompts = {s: B.load("jsonl_prompts", s, tmp_path, **opts) for s in ("train", "validation")}
  assert len(demos["train"]) + len(demos["validation"]) == 175
  assert demos["train"].stats["train"]["kept"] == {"train": len(demos["train"]),
                                                   "validation": len(demos["validation"])}
  keys = {s: {R.record_key(strip_id(e)) for e in demos[s]} for s in demos}
  assert not keys["train"] & keys["validation"]
  for split, src in demos.items():  # every record sits where assign_split puts its prompt
    assert all(R.assign_split(R.record_key(e), 0.2, "v1") == split for e in src)
  # The same prompts land in the same split whether read as demonstrations or prompts.
  for split in demos:
    assert [e["messages"][:-1] for e in demos[split]] == [e["messages"] for e in prompts[split]]
    assert [e["id"] for e in demos[split]] == [e["id"] for e in prompts[split]]
  assert 20 <= len(demos["validation"]) <= 50


def test_text_corpus_shakespeare_paragraph_split(tmp_path):
  text_file = need("tinyshakespeare/input.txt")
  opts = dict(data_files=str(text_file), validation_fraction=0.1)
  train = B.load("text_corpus/shakespeare", "train", tmp_path, **opts)
  valid = B.load("text_corpus/shakespeare", "validation", tmp_path, **opts)
  assert train.stats["train"]["seen"] == len(train) + len(valid) == 7222
  assert not {e["text"] for e in train} & {e["text"] for e in valid}
  units = R.text_units(R.read_text(text_file), "paragraph")
  both = sorted(list(train) + list(valid), key=lambda e: int(e["id"].rsplit(":", 1)[1]))
  assert [(int(e["id"].rsplit(":", 1)[1]), e["text"]) for e in both] == units
  assert 600 < len(valid) < 850  # 10% of 7222, binomial sd ~25


def test_text_corpus_jsonl_rows_and_units(tmp_path):
  rows = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two"}])
  src = B.load("text_corpus", "train", tmp_path / "d", data_files=[rows])
  assert [e["text"] for e in src] == ["one", "two"]
  assert src.stats["train"]["skipped"] == {"empty_text": 1} and src.stats["train"]["seen"] == 3
  plain = tmp_path / "a.txt"
  plain.write_text("l1\nl2\n\nl3\n", encoding="utf-8")
  lines = B.load("text_corpus", "train", tmp_path / "d", data_files=plain, unit="line")
  assert [e["text"] for e in lines] == ["l1", "l2", "l3"]
  with pytest.raises(ValueError, match="unit must be one of"):
    B.get_builder("text_corpus", tmp_path / "d", data_files=plain, unit="word")


# --------------------------------------------------------------------------------- load errors


def test_empty_data_dir_is_refused_instead_of_building_into_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ok = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
  for empty in ("", "  ", None):
    with pytest.raises(ValueError, match="data_dir is empty: the TFDS build .* current directory"):
      B.load("jsonl_prompts", "train", empty, data_files=ok)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_load_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'hh'"):
    B.load("hh", "test", tmp_path)
  with pytest.raises(ValueError, match="unknown config None"):
    B.load("hh_rlhf", "test", tmp_path)
  with pytest.raises(ValueError, match="unknown config 'helpful'"):
    B.load("hh_rlhf/helpful", "test", tmp_path)
  with pytest.raises(ValueError, match="data_files is required"):
    B.load("jsonl_prompts", "train", tmp_path)
  with pytest.raises(ValueError, match="file not found"):
    B.load("jsonl_prompts", "train", tmp_path, data_files="missing.jsonl", manual_dir=tmp_path)
  ok = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
  with pytest.raises(ValueError, match="needs a 'train' entry and no 'validation'"):
    B.load("jsonl_prompts", "train", tmp_path, validation_fraction=0.1,
           data_files={"train": ok, "validation": ok})
  with pytest.raises(ValueError, match="split name 'Train'"):
    B.load("jsonl_prompts", "train", tmp_path, data_files={"Train": ok})
  with pytest.raises(ValueError, match="unknown config fields"):
    B.load("jsonl_prompts", "train", tmp_path, data_files=ok, unit="line")
  # Relative paths are taken from manual_dir.
  assert len(B.load("jsonl_prompts", "train", tmp_path / "d", manual_dir=tmp_path,
                    data_files="p.jsonl")) == 1
