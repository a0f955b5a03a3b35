"""Tests for rlhf_jax.data.sources.load: every line shape and kind, refusals, splits, caches."""

import gzip
import json
from pathlib import Path

import pytest

from rlhf_jax.data import records as R
from rlhf_jax.data import sources

from data_fixtures import DATA, need, write_jsonl  # tests/ is on sys.path


def strip_id(recs: list) -> list:
  return [{k: v for k, v in r.items() if k != "id"} for r in recs]


def msg(role: str, content: str) -> dict:
  return {"role": role, "content": content}


def load_all(path, kind, **kw):
  """Every record (no held-out share) and the report."""
  train, held, report = sources.load(path, kind, eval_fraction=0.0, **kw)
  assert held == []
  return train, report


USER = msg("user", "What color is the sky?")
GOOD, BAD = msg("assistant", "Blue."), msg("assistant", "Green.")
Q = [msg("user", "The sky is")]

# shape -> (one line, {kind: the records it gives})
CASES = {
    "standard_language_modeling": (
        {"text": "The sky is blue."}, {"text": [{"text": "The sky is blue."}]}),
    "conversational_language_modeling": (
        {"messages": [USER, GOOD]},
        {"demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "standard_prompt_only": ({"prompt": "The sky is"}, {"prompts": [{"messages": Q}]}),
    "conversational_prompt_only": ({"prompt": [USER]}, {"prompts": [{"messages": [USER]}]}),
    "standard_prompt_completion": (
        {"prompt": "The sky is", "completion": " blue."},
        {"demonstrations": [{"messages": Q + [msg("assistant", " blue.")]}],
         "prompts": [{"messages": Q}]}),
    "conversational_prompt_completion": (
        {"prompt": [USER], "completion": [GOOD]},
        {"demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "standard_prompt_response": (
        {"prompt": "The sky is", "response": " blue."},
        {"demonstrations": [{"messages": Q + [msg("assistant", " blue.")]}],
         "prompts": [{"messages": Q}]}),
    "standard_preference": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"comparisons": [{"messages": Q, "responses": [" blue.", " green."], "ranks": [0, 1]}],
         "demonstrations": [{"messages": Q + [msg("assistant", " blue.")]}],
         "prompts": [{"messages": Q}]}),
    "conversational_preference": (
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"comparisons": [{"messages": [USER], "responses": ["Blue.", "Green."], "ranks": [0, 1]}],
         "demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "standard_implicit_prompt_preference": (
        {"chosen": "\n\nHuman: What color is the sky?\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: Green."},
        {"comparisons": [{"messages": [USER], "responses": ["Blue.", "Green."], "ranks": [0, 1]}],
         "demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "conversational_implicit_prompt_preference": (
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
        {"comparisons": [{"messages": [USER], "responses": ["Blue.", "Green."], "ranks": [0, 1]}],
         "demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "standard_kway": (
        {"prompt": "The sky is", "responses": [" red.", " blue.", " green."], "ranks": [2, 0, 2]},
        {"comparisons": [{"messages": Q, "responses": [" red.", " blue.", " green."],
                          "ranks": [1, 0, 1]}],
         "demonstrations": [{"messages": Q + [msg("assistant", " blue.")]}],
         "prompts": [{"messages": Q}]}),
    "conversational_kway": (
        {"messages": [USER], "responses": ["Green.", "Blue."], "ranks": [1, 0]},
        {"comparisons": [{"messages": [USER], "responses": ["Green.", "Blue."], "ranks": [1, 0]}],
         "demonstrations": [{"messages": [USER, GOOD]}], "prompts": [{"messages": [USER]}]}),
    "self_instruct": (
        {"instruction": "Name a color.", "instances": [{"input": "", "output": "Blue."}]},
        {"demonstrations": [{"messages": [msg("user", "Name a color."), GOOD]}],
         "prompts": [{"messages": [msg("user", "Name a color.")]}]}),
    "alpaca": (
        {"instruction": "Name a color.", "input": "sky", "output": "Blue."},
        {"demonstrations": [{"messages": [msg("user", "Name a color.\n\nsky"), GOOD]}],
         "prompts": [{"messages": [msg("user", "Name a color.\n\nsky")]}]}),
}


@pytest.mark.parametrize("shape", sorted(CASES))
def test_every_shape_gives_each_kind_it_supports(tmp_path, shape):
  line, expected = CASES[shape]
  path = write_jsonl(tmp_path / f"{shape}.jsonl", ["", line])
  assert set(expected) == set(R.SHAPES[shape][1])
  for kind, want in expected.items():
    got, report = load_all(path, kind)
    assert strip_id(got) == want, kind
    assert [r["id"] for r in got] == [f"{shape}.jsonl:2"]
    assert report["shape"] == shape and report["type"] == "jsonl" and report["kind"] == kind
    assert (report["seen"], report["kept"], report["skipped"]) == (1, 1, {})
  for kind in set(R.KINDS) - set(expected):
    with pytest.raises(ValueError, match=f"{path}:2: "):
      sources.load(path, kind)


def test_gzip_and_report_is_json(tmp_path):
  line, expected = CASES["conversational_preference"]
  path = tmp_path / "prefs.jsonl.gz"
  path.write_bytes(gzip.compress((json.dumps(line) + "\n").encode()))
  got, report = load_all(path, "comparisons")
  assert strip_id(got) == expected["comparisons"]
  assert json.loads(json.dumps(report)) == report
  assert set(report) >= {"spec", "kind", "source", "type", "shape", "seen", "kept", "skipped",
                         "first_skip", "split", "eval_source"}


# ---------------------------------------------------------------------------------- refusals


def test_unpaired_preference_is_refused_naming_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / "kto.jsonl", [
      {"prompt": "The sky is", "completion": " blue.", "label": True}])
  for kind in ("comparisons", "demonstrations", "prompts"):
    with pytest.raises(ValueError, match=f"{path}:1: shape 'standard_unpaired_preference'.*"
                       "no stage here uses"):
      sources.load(path, kind)


def test_prompt_only_lines_asked_as_demonstrations_name_file_and_shape(tmp_path):
  path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [USER]}])
  with pytest.raises(ValueError, match=f"{path}:1: no demonstration fields: this is a "
                     "'conversational_prompt_only' line .* gives prompts"):
    sources.load(path, "demonstrations")


def test_unknown_shape_names_file_line_and_accepted_shapes(tmp_path):
  path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"question": "q", "answer": "a"}])
  with pytest.raises(ValueError) as info:
    sources.load(path, "text")
  assert str(info.value).startswith(f"{path}:2: unknown line shape")
  assert "standard_preference" in str(info.value) and "conversational_kway" in str(info.value)


def test_one_shape_per_file(tmp_path):
  path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "completion": "c"},
                                                {"prompt": "p", "chosen": "a", "rejected": "b"}])
  with pytest.raises(ValueError, match=f"{path}:2: a 'standard_preference' line in a file of "
                     f"'standard_prompt_completion' lines \\(the first at {path}:1\\)"):
    sources.load(path, "prompts")


def test_text_kind_reads_only_text_lines_and_txt_files(tmp_path):
  dialogues = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, GOOD]}])
  with pytest.raises(ValueError, match="chat.jsonl:1: no text fields"):
    sources.load(dialogues, "text")
  plain = tmp_path / "book.txt"
  plain.write_text("one\ntwo\n\n\nthree\n", encoding="utf-8")
  got, report = load_all(plain, "text")
  assert strip_id(got) == [{"text": "one\ntwo"}, {"text": "three"}]
  assert [r["id"] for r in got] == ["book.txt:1", "book.txt:5"]
  assert report["shape"] == "plain_text (paragraph)" and report["type"] == "text"
  lines, _ = load_all(plain, "text", options={"unit": "line"})
  assert [r["text"] for r in lines] == ["one", "two", "three"]
  with pytest.raises(ValueError, match="book.txt: a plain-text file gives text records only"):
    sources.load(plain, "prompts")


def test_bad_specs(tmp_path):
  with pytest.raises(ValueError, match="data file not found: .*missing.jsonl"):
    sources.load(str(tmp_path / "missing.jsonl"), "prompts")
  with pytest.raises(ValueError, match="unknown data spec 'nonsense'"):
    sources.load("nonsense", "prompts")
  with pytest.raises(ValueError, match="is a directory"):
    sources.load(str(tmp_path), "prompts")
  odd = tmp_path / "data.csv"
  odd.write_text("a,b\n")
  with pytest.raises(ValueError, match="unknown file type"):
    sources.load(odd, "prompts")
  with pytest.raises(ValueError, match="give the file path itself"):
    sources.load("jsonl_demonstrations", "demonstrations", cache_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown record kind 'pairs'"):
    sources.load("synthetic", "pairs")
  ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p"}])
  with pytest.raises(ValueError, match="split='test' applies to builder sources only"):
    sources.load(ok, "prompts", split="test")
  with pytest.raises(ValueError, match="options \\['unit'\\] do not apply to a JSONL file"):
    sources.load(ok, "prompts", options={"unit": "line"})
  empty = write_jsonl(tmp_path / "empty.jsonl", [""])
  with pytest.raises(ValueError, match="no records"):
    sources.load(empty, "prompts")


# ----------------------------------------------------------------------------- skip counting


def test_implicit_pairs_count_prompt_mismatch_and_empty_chosen(tmp_path):
  hh = lambda q, a: f"\n\nHuman: {q}\n\nAssistant: {a}"
  path = write_jsonl(tmp_path / "hh.jsonl", [
      {"chosen": hh("q1", "good"), "rejected": hh("q1", "bad")},
      {"chosen": hh("q2", "good"), "rejected": hh("other", "bad")},       # prompt_mismatch
      {"chosen": hh("q3", ""), "rejected": hh("q3", "bad")},              # empty chosen
      {"chosen": hh("q4", "good"), "rejected": hh("q4", "bad")},
  ])
  got, report = load_all(path, "comparisons")
  assert [r["messages"][0]["content"] for r in got] == ["q1", "q4"]
  assert report["seen"] == 4 and report["kept"] == 2
  assert report["skipped"] == {"empty_response": 1, "prompt_mismatch": 1}
  assert report["first_skip"] == {"empty_response": f"{path}:3", "prompt_mismatch": f"{path}:2"}
  # As demonstrations only the chosen reply matters: the empty one is skipped, counted likewise.
  demos, report = load_all(path, "demonstrations")
  assert len(demos) == 2 and report["skipped"] == {"empty_response": 1, "prompt_mismatch": 1}
  prompts, report = load_all(path, "prompts")
  assert len(prompts) == 3 and report["skipped"] == {"prompt_mismatch": 1}

  convo = write_jsonl(tmp_path / "convo.jsonl", [
      {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
      {"chosen": [USER, GOOD], "rejected": [msg("user", "something else"), BAD]},
  ])
  got, report = load_all(convo, "comparisons")
  assert len(got) == 1 and report["skipped"] == {"prompt_mismatch": 1}
  assert report["first_skip"]["prompt_mismatch"] == f"{convo}:2"


def test_empty_reply_in_explicit_preference_is_skipped_not_an_error(tmp_path):
  path = write_jsonl(tmp_path / "prefs.jsonl", [
      {"prompt": [USER], "chosen": [msg("assistant", " ")], "rejected": [BAD]},
      {"prompt": "q", "chosen": "a", "rejected": ""},
      {"prompt": "q", "chosen": "a", "rejected": "b"},
  ])
  with pytest.raises(ValueError, match=f"{path}:2: a 'standard_preference' line"):
    sources.load(path, "comparisons")  # one shape per file, checked before anything is skipped
  path = write_jsonl(tmp_path / "prefs.jsonl", [
      {"prompt": "q", "chosen": " ", "rejected": "b"},
      {"prompt": "q", "chosen": "a", "rejected": ""},
      {"prompt": "q", "chosen": "a", "rejected": "b"},
  ])
  got, report = load_all(path, "comparisons")
  assert [r["id"] for r in got] == ["prefs.jsonl:3"]
  assert report["skipped"] == {"empty_response": 2}
  assert report["first_skip"] == {"empty_response": f"{path}:1"}


# ------------------------------------------------------------------------------------ splits


def many_prompts(tmp_path, n=400):
  rows = [{"prompt": f"question {i % (n // 2)}", "chosen": f"good {i}", "rejected": f"bad {i}"}
          for i in range(n)]  # every prompt twice
  return write_jsonl(tmp_path / "many.jsonl", rows)


def test_hash_split_is_disjoint_by_prompt_deterministic_and_shared_across_kinds(tmp_path):
  path = many_prompts(tmp_path)
  train, held, report = sources.load(path, "comparisons", eval_fraction=0.2)
  keys = lambda recs: {R.record_key(r) for r in recs}
  assert len(train) + len(held) == 400 and 40 <= len(held) <= 120
  assert not keys(train) & keys(held)
  assert report["split"] == {"method": "hash", "eval_fraction": 0.2, "salt": "0",
                             "train": len(train), "eval": len(held), "shared_prompts": 0,
                             "limit": 0, "limited": {"train": 0, "eval": 0}}
  again = sources.load(path, "comparisons", eval_fraction=0.2)
  assert (again[0], again[1]) == (train, held)
  # The same prompts are held out whatever the kind, so SFT, RM and PPO agree.
  for kind in ("demonstrations", "prompts"):
    k_train, k_held, _ = sources.load(path, kind, eval_fraction=0.2)
    assert [r["id"] for r in k_train] == [r["id"] for r in train]
    assert [r["id"] for r in k_held] == [r["id"] for r in held]
  salted = sources.load(path, "comparisons", eval_fraction=0.2, seed=1)
  assert {r["id"] for r in salted[1]} != {r["id"] for r in held}
  with pytest.raises(ValueError, match="eval_fraction must be in \\[0, 1\\)"):
    sources.load(path, "comparisons", eval_fraction=1.0)


def test_eval_spec_is_honoured_and_overlap_reported(tmp_path):
  path = many_prompts(tmp_path)
  held_file = write_jsonl(tmp_path / "held.jsonl", [
      {"prompt": [msg("user", "question 3")], "completion": [GOOD]},
      {"prompt": [msg("user", "brand new")], "completion": [BAD]}])
  train, held, report = sources.load(path, "demonstrations", eval_spec=str(held_file))
  assert len(train) == 400
  assert strip_id(held) == [{"messages": [msg("user", "question 3"), GOOD]},
                            {"messages": [msg("user", "brand new"), BAD]}]
  assert report["split"]["method"] == "eval_spec" and report["split"]["shared_prompts"] == 1
  assert report["eval_source"]["shape"] == "conversational_prompt_completion"
  assert report["eval_source"]["source"] == str(held_file)


def test_limit_caps_each_side(tmp_path):
  path = many_prompts(tmp_path)
  train, held, report = sources.load(path, "prompts", eval_fraction=0.2, limit=10)
  full_train, full_held, _ = sources.load(path, "prompts", eval_fraction=0.2)
  assert train == full_train[:10] and held == full_held[:10]
  assert report["split"]["limited"] == {"train": len(full_train) - 10, "eval": len(full_held) - 10}
  with pytest.raises(ValueError, match="limit must be a non-negative integer"):
    sources.load(path, "prompts", limit=-1)


def test_all_records_held_out_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p"}])
  salt = next(str(s) for s in range(1000) if R.assign_split(
      R.record_key({"messages": [msg("user", "p")]}), 0.5, str(s)) == "validation")
  with pytest.raises(ValueError, match="no prompts records left for training"):
    sources.load(path, "prompts", eval_fraction=0.5, seed=int(salt))


# ------------------------------------------------------------------------------- synthetic


def test_synthetic_world_demonstrations_prompts_and_no_comparisons():
  train, held, report = sources.load("synthetic", "demonstrations", options={"n": 40, "eval_n": 8})
  assert (len(train), len(held)) == (40, 8) and report["split"]["method"] == "synthetic"
  assert all(r["messages"][-1]["role"] == "assistant" and "task" in r for r in train + held)
  tasks = lambda recs: {json.dumps(r["task"], sort_keys=True) for r in recs}
  assert not tasks(train) & tasks(held)  # the world's own instance-disjoint eval split
  prompts, p_held, _ = sources.load("synthetic", "prompts", limit=5)
  assert len(prompts) == len(p_held) == 5 and prompts[0]["messages"][-1]["role"] == "user"
  with pytest.raises(ValueError, match="'synthetic' has no comparisons.*gold labeler"):
    sources.load("synthetic", "comparisons")
  with pytest.raises(ValueError, match="unknown synthetic options \\['size'\\]"):
    sources.load("synthetic", "prompts", options={"size": 3})


# -------------------------------------------------------------------------- builders, caches


def test_builds_land_in_cache_dir_never_in_cwd(tmp_path, monkeypatch):
  cwd, cache = tmp_path / "cwd", tmp_path / "cache"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  opts = {"num_train_prompts": 12, "num_eval_prompts": 4}
  train, held, report = sources.load("synthetic_instruct/prompts", "prompts", cache_dir=cache,
                                     options=opts)
  assert (len(train), len(held)) == (12, 4)
  assert report["split"]["method"] == "builder" and report["builder"]["held_out_split"] == "eval"
  assert report["builder"]["data_dir"] == str(cache.resolve())
  assert report["builder"]["manual_dir"] is None
  assert report["eval_source"]["source"] == "synthetic_instruct/prompts:eval"
  assert (cache / "synthetic_instruct").is_dir()
  # Without cache_dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets; never the current directory.
  env = tmp_path / "env"
  monkeypatch.setenv("TFDS_DATA_DIR", str(env))
  assert sources.data_dir() == env.resolve() and sources.data_dir("") == env.resolve()
  sources.load("synthetic_instruct/prompts", "prompts", options=opts)
  assert (env / "synthetic_instruct").is_dir()
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert sources.data_dir() == Path.home() / "tensorflow_datasets"
  assert list(cwd.iterdir()) == []


def test_builder_raw_files_missing_say_where_to_put_them(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "SHARED_DATA", tmp_path / "nowhere")
  with pytest.raises(ValueError, match="hh_rlhf needs its raw files, looked for in "
                     ".*nowhere/hh_rlhf.*train.jsonl.gz.*or pass manual_dir="):
    sources.load("hh_rlhf/helpful-base", "comparisons", cache_dir=tmp_path / "c")
  with pytest.raises(ValueError, match="manual_dir .*absent for oasst_rankings is not a directory"):
    sources.load("oasst_rankings/rankings", "comparisons", cache_dir=tmp_path / "c",
                 manual_dir=tmp_path / "absent")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_hh_builder_name_counts_and_hash_split(cache):
  need("hh_rlhf/helpful-base/test.jsonl.gz")
  with pytest.raises(ValueError, match="no split 'train'; available: \\['test'\\]; name one, "
                     "e.g. 'hh_rlhf/helpful-base:test'"):
    sources.load("hh_rlhf/helpful-base", "comparisons", cache_dir=cache)
  train, held, report = sources.load("hh_rlhf/helpful-base:test", "comparisons", cache_dir=cache)
  assert report["seen"] == 2354 and report["kept"] == len(train) + len(held) == 2339
  assert report["skipped"] == {"duplicate_responses": 2, "empty_response": 4, "prompt_mismatch": 9}
  assert report["first_skip"]["prompt_mismatch"].endswith("test.jsonl.gz:169")
  assert report["split"]["method"] == "hash" and report["split"]["shared_prompts"] == 0
  assert Path(report["builder"]["manual_dir"]).resolve() == (DATA / "hh_rlhf").resolve()
  # split= names the builder split too; the same file read as a JSONL path agrees.
  same = sources.load("hh_rlhf/helpful-base", "comparisons", split="test", cache_dir=cache)
  assert strip_id(same[0]) == strip_id(train)
  path_train, _, path_report = sources.load(str(DATA / "hh_rlhf/helpful-base/test.jsonl.gz"),
                                            "comparisons")
  assert path_report["shape"] == "standard_implicit_prompt_preference"
  assert strip_id(path_train) == strip_id(train) and path_report["skipped"] == report["skipped"]


def test_oasst_builder_name_as_each_kind(cache):
  need("oasst1_en_validation/en-validation.jsonl")
  comparisons, held, report = sources.load("oasst_rankings/rankings:validation", "comparisons",
                                           cache_dir=cache, eval_fraction=0.1)
  assert len(comparisons) + len(held) == 417 and report["skipped"] == {"duplicate_responses": 1}
  assert report["shape"] == "oasst_rankings_comparisons"
  demos, d_held, _ = sources.load("oasst_rankings/rankings:validation", "demonstrations",
                                  cache_dir=cache, eval_fraction=0.1)
  assert [r["id"] for r in demos] == [r["id"] for r in comparisons]
  for demo, comp in zip(demos, comparisons):
    assert demo["messages"] == comp["messages"] + [
        {"role": "assistant", "content": comp["responses"][comp["ranks"].index(0)]}]
  prompts, _, _ = sources.load("oasst_rankings/sft:validation", "prompts", cache_dir=cache)
  assert all(p["messages"][-1]["role"] == "user" for p in prompts)
  with pytest.raises(ValueError, match="demonstrations records cannot be turned into comparisons"):
    sources.load("oasst_rankings/sft:validation", "comparisons", cache_dir=cache)
  # A builder as the eval spec: its validation split, all of it.
  seeds = need("self_instruct_seed/seed_tasks.jsonl")
  train, held, report = sources.load(str(seeds), "prompts", cache_dir=cache,
                                     eval_spec="oasst_rankings/sft")
  assert len(train) == 175 and len(held) == 419 and report["split"]["method"] == "eval_spec"
  assert report["eval_source"]["source"] == "oasst_rankings/sft:validation"


def test_shared_self_instruct_and_shakespeare_files():
  seeds = need("self_instruct_seed/seed_tasks.jsonl")
  demos, _, report = sources.load(str(seeds), "demonstrations", eval_fraction=0.0)
  assert len(demos) == 175 and report["shape"] == "self_instruct"
  text = need("tinyshakespeare/input.txt")
  train, held, report = sources.load(str(text), "text", eval_fraction=0.1)
  assert report["kept"] == len(train) + len(held) == 7222
  assert not {r["text"] for r in train} & {r["text"] for r in held}
