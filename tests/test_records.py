"""Tests for rlhf_jax.data.records: parsing, validation errors, skip counting, hash splits."""

import collections
import gzip
import json
import re

import numpy as np
import pytest

from rlhf_jax.data import records as R

from data_fixtures import need, write_jsonl as write_lines  # tests/ is on sys.path


def raises_at(where: str, key: str | None, match: str):
  """pytest.raises for a ValueError that names the location, the key and the problem."""
  pattern = re.escape(where) + ": " + (re.escape(f"key '{key}'") + ".*" if key else "") + match
  return pytest.raises(ValueError, match=pattern)


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


# ------------------------------------------------------------------------------------ reading


def test_read_jsonl_locations_gzip_and_blank_lines(tmp_path):
  lines = ['{"a": 1}', "", "   ", '{"a": 2}']
  plain = write_lines(tmp_path / "x.jsonl", lines)
  packed = tmp_path / "x.jsonl.gz"
  packed.write_bytes(gzip.compress(plain.read_bytes()))
  for path in (plain, packed):
    got = list(R.read_jsonl(path))
    # Blank lines are separators: not yielded, but line numbers stay true to the file.
    assert got == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]


def test_read_jsonl_malformed_json_names_file_and_line(tmp_path):
  path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', '{"a": 2', '{"a": 3}'])
  with raises_at(f"{path}:2", None, "malformed JSON"):
    list(R.read_jsonl(path))


def test_read_jsonl_rejects_non_objects_bad_utf8_and_lfs_pointers(tmp_path):
  path = write_lines(tmp_path / "list.jsonl", ['{"a": 1}', "[1, 2]"])
  with raises_at(f"{path}:2", None, "expected a JSON object, got list"):
    list(R.read_jsonl(path))
  raw = tmp_path / "latin1.jsonl"
  raw.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
  with raises_at(f"{raw}:2", None, "not valid UTF-8"):
    list(R.read_jsonl(raw))
  lfs = tmp_path / "test.jsonl.gz"
  lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
  with pytest.raises(ValueError, match="Git LFS pointer"):
    list(R.read_jsonl(lfs))


def test_read_text_names_line_of_bad_byte(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(b"ok\nfine\nbad \xff here\n")
  with raises_at(f"{path}:3", None, "not valid UTF-8"):
    R.read_text(path)


# ----------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("messages, key, match", [
    ([], "messages", "non-empty list"),
    ("hi", "messages", "non-empty list"),
    ([USER, "x"], "messages[1]", "expected an object"),
    ([{"content": "x"}], "messages[0].role", "missing"),
    ([{"role": "human", "content": "x"}], "messages[0].role", "unknown role 'human'"),
    ([USER, {"role": "system", "content": "x"}], "messages[1].role", "only first"),
    ([{"role": "user"}], "messages[0].content", "missing"),
    ([{"role": "user", "content": 3}], "messages[0].content", "expected a string, got int"),
    ([{"role": "user", "content": " \n"}], "messages[0].content", "is empty"),
    ([{"role": "system", "content": "s"}, ASSISTANT], "messages", "no user message"),
])
def test_parse_messages_errors(messages, key, match):
  with raises_at("f.jsonl:7", key, match):
    R.parse_messages(messages, "f.jsonl:7")


def test_parse_messages_keeps_content_verbatim_and_drops_extra_keys():
  msgs = [{"role": "system", "content": " s "}, {"role": "user", "content": "  q\n", "name": "x"}]
  assert R.parse_messages(msgs, "w") == [{"role": "system", "content": " s "},
                                         {"role": "user", "content": "  q\n"}]


# ------------------------------------------------------------------------------ demonstrations


def test_parse_demonstrations_accepted_shapes():
  dialogue = [USER, ASSISTANT, {"role": "user", "content": "more"}, ASSISTANT]
  assert R.parse_demonstrations({"messages": dialogue}, "w") == [{"messages": dialogue}]
  assert R.parse_demonstrations({"prompt": "p", "response": "r", "system": "s"}, "w") == [
      {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                    {"role": "assistant", "content": "r"}]}]
  # Self-Instruct: one record per instance; a blank input leaves the bare instruction.
  seed = {"instruction": "Do X.", "instances": [{"input": "", "output": "a"},
                                                {"input": "data", "output": "b"}]}
  assert R.parse_demonstrations(seed, "w") == [
      {"messages": [{"role": "user", "content": "Do X."}, {"role": "assistant", "content": "a"}]},
      {"messages": [{"role": "user", "content": "Do X.\n\ndata"},
                    {"role": "assistant", "content": "b"}]}]
  alpaca = {"instruction": "Do Y.", "input": "in", "output": "out"}
  assert R.parse_demonstrations(alpaca, "w") == [
      {"messages": [{"role": "user", "content": "Do Y.\n\nin"},
                    {"role": "assistant", "content": "out"}]}]


@pytest.mark.parametrize("obj, key, match", [
    ({"messages": [USER]}, "messages", "must end with the assistant response"),
    ({"messages": [{"role": "system", "content": "s"}, USER, ASSISTANT, ASSISTANT]}, "messages",
     "must follow a user turn"),
    # A prompt-only line has no reply: it gives prompts only (the error names the shape).
    ({"prompt": "p"}, None, "no demonstration fields: this is a 'standard_prompt_only' line"),
    ({"prompt": "p", "response": ""}, "response", "is empty"),
    ({"prompt": "p", "response": ["r"]}, "response", "expected a string, got list"),
    ({"prompt": "p", "messages": [USER], "response": "r"}, "messages", "not both"),
    ({"instruction": "i", "instances": []}, "instances", "non-empty list"),
    ({"instruction": "i", "instances": [{"input": "x", "output": ""}]}, "instances[0].output",
     "is empty"),
    ({"instruction": "i", "instances": [{"input": "x", "output": "y"}, {"input": "x"}]},
     "instances[1].output", "missing"),
    ({"instruction": "i", "instances": [{"input": 3, "output": "y"}]}, "instances[0].input",
     "expected a string, got int"),
    ({"instruction": "i"}, "output", "missing"),
    ({"text": "t"}, None, "no demonstration fields"),
])
def test_parse_demonstrations_errors(obj, key, match):
  with raises_at("d.jsonl:3", key, match):
    R.parse_demonstrations(obj, "d.jsonl:3")


def test_parse_prompts_shapes_and_errors():
  assert R.parse_prompts({"prompt": "p", "response": "ignored"}, "w") == [
      {"messages": [{"role": "user", "content": "p"}]}]
  assert R.parse_prompts({"messages": [USER]}, "w") == [{"messages": [USER]}]
  seed = {"instruction": "Do X.", "instances": [{"input": "in", "output": "o"}]}
  assert R.parse_prompts(seed, "w") == [{"messages": [{"role": "user", "content": "Do X.\n\nin"}]}]
  # A dialogue ending with the assistant gives the prompt before that reply.
  assert R.parse_prompts({"messages": [USER, ASSISTANT]}, "w") == [{"messages": [USER]}]
  with raises_at("p.jsonl:2", "messages", "must end with a user turn"):
    R.parse_prompts({"messages": [USER, ASSISTANT, ASSISTANT]}, "p.jsonl:2")
  with raises_at("p.jsonl:2", None, "unknown line shape"):
    R.parse_prompts({"question": "q"}, "p.jsonl:2")


# --------------------------------------------------------------------------------- comparisons


def test_dense_ranks_matches_brute_force_order():
  rng = np.random.default_rng(0)
  for _ in range(200):
    ranks = rng.integers(0, 6, size=rng.integers(1, 8)).tolist()
    dense = R.dense_ranks(ranks)
    assert sorted(set(dense)) == list(range(len(set(ranks))))
    for i in range(len(ranks)):
      for j in range(len(ranks)):
        assert np.sign(ranks[i] - ranks[j]) == np.sign(dense[i] - dense[j])


def test_parse_comparison_shapes_ties_and_gaps():
  got = R.parse_comparison({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [2, 0, 2]}, "w")
  assert got == {"messages": [{"role": "user", "content": "q"}],
                 "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}
  got = R.parse_comparison({"messages": [USER], "chosen": "good", "rejected": "bad"}, "w")
  assert got == {"messages": [USER], "responses": ["good", "bad"], "ranks": [0, 1]}


@pytest.mark.parametrize("extra, key, match", [
    ({"responses": ["a", "b"], "ranks": [0]}, "ranks", "has 1 ranks for 2 responses"),
    ({"responses": ["a", "b"], "ranks": [0, -1]}, "ranks[1]", "is negative"),
    ({"responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks[1]", "non-negative integer, got 1.5"),
    ({"responses": ["a", "b"], "ranks": [True, 0]}, "ranks[0]", "non-negative integer, got True"),
    ({"responses": ["a", "b"], "ranks": ["0", 1]}, "ranks[0]", "non-negative integer, got '0'"),
    ({"responses": ["a", "b"], "ranks": "01"}, "ranks", "expected a list"),
    ({"responses": ["a", "b"]}, "ranks", "missing"),
    ({"responses": ["a"], "ranks": [0]}, "responses", "at least 2"),
    ({"responses": ["a", 2], "ranks": [0, 1]}, "responses[1]", "expected a string, got int"),
    ({"chosen": "a"}, "rejected", "missing"),
    ({"chosen": "a", "rejected": "b", "ranks": [0, 1]}, "responses", "not both"),
    ({}, "responses", "missing"),
])
def test_parse_comparison_errors(extra, key, match):
  with raises_at("c.jsonl:5", key, match):
    R.parse_comparison({"prompt": "q", **extra}, "c.jsonl:5")


@pytest.mark.parametrize("extra, reason", [
    ({"responses": ["a", "b", "a "], "ranks": [0, 1, 2]}, "duplicate_responses"),
    ({"chosen": "same", "rejected": "same"}, "duplicate_responses"),
    ({"responses": ["a", "b", "c"], "ranks": [1, 1, 1]}, "all_tied"),
    # A blank reply is skipped and counted, not an error (as in HH-RLHF and OASST).
    ({"chosen": "", "rejected": "b"}, "empty_response"),
    ({"chosen": "a", "rejected": " \n"}, "empty_response"),
    ({"responses": ["a", " "], "ranks": [0, 1]}, "empty_response"),
])
def test_parse_comparison_skips(extra, reason):
  with pytest.raises(R.Skip) as info:
    R.parse_comparison({"prompt": "q", **extra}, "w")
  assert info.value.reason == reason


def test_parse_jsonl_counts_skips_and_reports_first_location(tmp_path):
  good = {"prompt": "q", "chosen": "a", "rejected": "b"}
  tied = {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 0]}
  dup = {"prompt": "q", "chosen": "a", "rejected": "a"}
  path = write_lines(tmp_path / "c.jsonl", [good, tied, dup, good, tied])
  tally = R.Tally()
  got = list(R.parse_jsonl(path, R.parse_comparison, tally))
  assert [rid for rid, _ in got] == [f"{path}:1", f"{path}:4"]
  assert tally.seen == 5 and tally.num_skipped == 3
  assert tally.skipped == {"all_tied": 2, "duplicate_responses": 1}
  assert tally.first_skip == {"all_tied": f"{path}:2", "duplicate_responses": f"{path}:3"}
  assert "all_tied=2" in tally.summary()


def test_parse_jsonl_multi_instance_ids(tmp_path):
  seed = {"instruction": "i", "instances": [{"input": "a", "output": "x"},
                                            {"input": "b", "output": "y"}]}
  path = write_lines(tmp_path / "s.jsonl", [seed])
  tally = R.Tally()
  got = list(R.parse_jsonl(path, R.parse_demonstrations, tally))
  assert [rid for rid, _ in got] == [f"{path}:1#0", f"{path}:1#1"] and tally.seen == 1


# -------------------------------------------------------------------------------- line shapes

SYS = {"role": "system", "content": "be brief"}
U2 = {"role": "user", "content": "and then?"}


def msg(role, content):
  return {"role": role, "content": content}


def hh_text(*turns):
  return "".join(f"\n\n{role}: {text}" for role, text in turns)


@pytest.mark.parametrize("obj, shape", [
    ({"text": "t"}, "standard_language_modeling"),
    ({"messages": [USER, ASSISTANT]}, "conversational_language_modeling"),
    ({"prompt": "p"}, "standard_prompt_only"),
    ({"prompt": [USER]}, "conversational_prompt_only"),
    ({"prompt": "p", "completion": "c"}, "standard_prompt_completion"),
    ({"prompt": [USER], "completion": [ASSISTANT]}, "conversational_prompt_completion"),
    ({"prompt": "p", "response": "r"}, "standard_prompt_response"),
    ({"messages": [USER], "response": "r"}, "conversational_prompt_response"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard_preference"),
    ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]}, "conversational_preference"),
    ({"messages": [USER], "chosen": "a", "rejected": "b"}, "conversational_preference"),
    ({"chosen": "x", "rejected": "y"}, "standard_implicit_prompt_preference"),
    ({"chosen": [USER, ASSISTANT], "rejected": [USER]}, "conversational_implicit_prompt_preference"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, "standard_kway"),
    ({"messages": [USER], "responses": ["a", "b"], "ranks": [0, 1]}, "conversational_kway"),
    ({"prompt": [USER], "responses": ["a", "b"], "ranks": [0, 1]}, "conversational_kway"),
    ({"instruction": "i", "instances": []}, "self_instruct"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c", "label": True}, "standard_unpaired_preference"),
    ({"prompt": [USER], "completion": [ASSISTANT], "label": False},
     "conversational_unpaired_preference"),
    ({"prompt": "p", "completions": ["a"], "labels": [True]}, "standard_stepwise_supervision"),
])
def test_detect_shape(obj, shape):
  assert R.detect_shape(obj, "w") == shape
  assert shape in R.SHAPES or shape in R.REFUSED_SHAPES


def test_unknown_shape_names_location_and_lists_accepted_shapes():
  with pytest.raises(ValueError) as info:
    R.detect_shape({"question": "q", "answer": "a"}, "u.jsonl:4")
  text = str(info.value)
  assert text.startswith("u.jsonl:4: unknown line shape (keys ['answer', 'question'])")
  assert all(name in text for name in R.SHAPES)


def test_standard_shapes_for_each_kind():
  q = [msg("user", "The sky is")]
  pref = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
  assert R.parse_line(pref, "w", "comparisons") == [
      {"messages": q, "responses": [" blue.", " green."], "ranks": [0, 1]}]
  assert R.parse_line(pref, "w", "demonstrations") == [{"messages": q + [msg("assistant", " blue.")]}]
  assert R.parse_line(pref, "w", "prompts") == [{"messages": q}]
  pc = {"prompt": "The sky is", "completion": " blue."}
  assert R.parse_line(pc, "w", "demonstrations") == [{"messages": q + [msg("assistant", " blue.")]}]
  assert R.parse_line(pc, "w", "prompts") == [{"messages": q}]
  assert R.parse_line({"prompt": "The sky is"}, "w", "prompts") == [{"messages": q}]
  assert R.parse_line({"text": "The sky is blue."}, "w", "text") == [{"text": "The sky is blue."}]
  with_system = {"prompt": "p", "system": "s", "completion": "c"}
  assert R.parse_line(with_system, "w", "prompts") == [{"messages": [msg("system", "s"),
                                                                     msg("user", "p")]}]


def test_conversational_shapes_for_each_kind():
  prompt = [SYS, USER]
  pref = {"prompt": prompt, "chosen": [msg("assistant", "good")],
          "rejected": [msg("assistant", "bad")]}
  assert R.parse_line(pref, "w", "comparisons") == [
      {"messages": prompt, "responses": ["good", "bad"], "ranks": [0, 1]}]
  assert R.parse_line(pref, "w", "demonstrations") == [{"messages": prompt + [msg("assistant", "good")]}]
  assert R.parse_line(pref, "w", "prompts") == [{"messages": prompt}]
  pc = {"prompt": prompt, "completion": [ASSISTANT]}
  assert R.parse_line(pc, "w", "demonstrations") == [{"messages": prompt + [ASSISTANT]}]
  assert R.parse_line(pc, "w", "prompts") == [{"messages": prompt}]
  assert R.parse_line({"prompt": prompt}, "w", "prompts") == [{"messages": prompt}]
  dialogue = {"messages": prompt + [ASSISTANT]}
  assert R.parse_line(dialogue, "w", "demonstrations") == [dialogue]
  assert R.parse_line(dialogue, "w", "prompts") == [{"messages": prompt}]
  kway = {"prompt": prompt, "responses": ["a", "b", "c"], "ranks": [1, 0, 0]}
  assert R.parse_line(kway, "w", "comparisons") == [
      {"messages": prompt, "responses": ["a", "b", "c"], "ranks": [1, 0, 0]}]
  # The best response; on a tie at the top, the first of them.
  assert R.parse_line(kway, "w", "demonstrations") == [{"messages": prompt + [msg("assistant", "b")]}]


def test_conversational_reply_continues_the_prompt():
  turn = [ASSISTANT, U2]
  pref = {"prompt": [USER], "chosen": turn + [msg("assistant", "x")],
          "rejected": turn + [msg("assistant", "y")]}
  assert R.parse_line(pref, "w", "comparisons")[0]["messages"] == [USER, ASSISTANT, U2]
  # A reply that repeats the prompt first (UltraFeedback's string prompt + full dialogue).
  copy = {"prompt": "hi", "chosen": [USER, msg("assistant", "x")],
          "rejected": [USER, msg("assistant", "y")]}
  assert R.parse_line(copy, "w", "comparisons") == [
      {"messages": [USER], "responses": ["x", "y"], "ranks": [0, 1]}]
  completion = {"prompt": [USER], "completion": turn + [msg("assistant", "z")]}
  assert R.parse_line(completion, "w", "demonstrations") == [
      {"messages": [USER, ASSISTANT, U2, msg("assistant", "z")]}]


@pytest.mark.parametrize("obj, kind, key, match", [
    ({"prompt": [USER], "chosen": [ASSISTANT, U2, ASSISTANT], "rejected": [ASSISTANT]},
     "comparisons", "rejected", "differ from those of 'chosen'"),
    ({"prompt": [USER], "chosen": [U2], "rejected": [ASSISTANT]}, "comparisons", "chosen[0].role",
     "must end with an assistant message"),
    ({"prompt": [USER], "chosen": [ASSISTANT, ASSISTANT], "rejected": [ASSISTANT, ASSISTANT]},
     "comparisons", "chosen", "must end with a user turn"),
    ({"prompt": [USER], "chosen": [SYS, ASSISTANT], "rejected": [SYS, ASSISTANT]}, "comparisons",
     "chosen", "system message is allowed only first"),
    ({"prompt": [USER], "chosen": 3, "rejected": "b"}, "comparisons", "chosen",
     "expected a string or a list"),
    ({"prompt": [USER, ASSISTANT], "chosen": "a", "rejected": "b"}, "comparisons", "prompt",
     "must end with a user turn"),
    ({"prompt": [USER], "system": "s"}, "prompts", "system", "first in the list"),
    ({"prompt": 7}, "prompts", "prompt", "expected a string or a list"),
    ({"prompt": [USER], "completion": [msg("assistant", " ")]}, "demonstrations", "completion",
     "is empty"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "prompts", "prompt[0].role", "unknown role"),
])
def test_conversational_errors(obj, kind, key, match):
  with raises_at("c.jsonl:2", key, match):
    R.parse_line(obj, "c.jsonl:2", kind)


def test_implicit_prompt_conversational_pairs():
  chosen = [SYS, USER, ASSISTANT, U2, msg("assistant", "good")]
  rejected = chosen[:-1] + [msg("assistant", "bad")]
  pair = {"chosen": chosen, "rejected": rejected}
  assert R.parse_line(pair, "w", "comparisons") == [
      {"messages": chosen[:-1], "responses": ["good", "bad"], "ranks": [0, 1]}]
  assert R.parse_line(pair, "w", "demonstrations") == [{"messages": chosen}]
  assert R.parse_line(pair, "w", "prompts") == [{"messages": chosen[:-1]}]
  other = {"chosen": chosen, "rejected": [USER, msg("assistant", "bad")]}
  for kind in ("comparisons", "demonstrations", "prompts"):
    with pytest.raises(R.Skip, match="prompt_mismatch"):
      R.parse_line(other, "w", kind)
  with pytest.raises(R.Skip, match="empty_response"):
    R.parse_line({"chosen": chosen, "rejected": chosen[:-1] + [msg("assistant", "")]}, "w",
                 "comparisons")
  with raises_at("i.jsonl:1", "rejected[1].role", "must end with the assistant reply"):
    R.parse_line({"chosen": [USER, ASSISTANT], "rejected": [USER, U2]}, "i.jsonl:1", "prompts")


def test_implicit_prompt_standard_pairs_are_hh_transcripts():
  prompt = [("Human", "hi"), ("Assistant", "yes?"), ("Human", "tell me")]
  pair = {"chosen": hh_text(*prompt, ("Assistant", "sure")), "rejected": hh_text(*prompt, ("Assistant", ""))}
  messages = [msg("user", "hi"), msg("assistant", "yes?"), msg("user", "tell me")]
  with pytest.raises(R.Skip, match="empty_response"):
    R.parse_line(pair, "w", "comparisons")
  # The blank rejected reply does not matter to a demonstration or a prompt.
  assert R.parse_line(pair, "w", "demonstrations") == [{"messages": messages + [msg("assistant", "sure")]}]
  assert R.parse_line(pair, "w", "prompts") == [{"messages": messages}]
  mismatch = {"chosen": hh_text(("Human", "a"), ("Assistant", "x")),
              "rejected": hh_text(("Human", "b"), ("Assistant", "y"))}
  with pytest.raises(R.Skip, match="prompt_mismatch"):
    R.parse_line(mismatch, "w", "prompts")
  with raises_at("t.jsonl:3", "chosen", "must be HH transcripts"):
    R.parse_line({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "t.jsonl:3",
                 "comparisons")


@pytest.mark.parametrize("obj, shape", [
    ({"prompt": "p", "completion": "c", "label": True}, "standard_unpaired_preference"),
    ({"prompt": [USER], "completion": [ASSISTANT], "label": False},
     "conversational_unpaired_preference"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]},
     "standard_stepwise_supervision"),
])
def test_refused_shapes_name_location_for_every_kind(obj, shape):
  for kind in R.KINDS:
    with raises_at("k.jsonl:8", None, f"shape '{shape}'.*which no stage here uses"):
      R.parse_line(obj, "k.jsonl:8", kind)


@pytest.mark.parametrize("obj, kind, key, match", [
    ({"prompt": [USER]}, "demonstrations", None,
     "no demonstration fields: this is a 'conversational_prompt_only' line"),
    ({"prompt": "p", "completion": "c"}, "comparisons", "responses",
     "missing: this is a 'standard_prompt_completion' line"),
    ({"messages": [USER, ASSISTANT]}, "text", None,
     "no text fields: this is a 'conversational_language_modeling' line.*the text kind reads only"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "text", None, "no text fields"),
    ({"text": "t"}, "prompts", None, "no prompt fields: this is a 'standard_language_modeling'"),
    ({"text": "t"}, "comparisons", "responses", "missing"),
])
def test_kind_a_shape_cannot_give_is_an_error(obj, kind, key, match):
  with raises_at("s.jsonl:6", key, match):
    R.parse_line(obj, "s.jsonl:6", kind)


def test_normalise_kind_and_convert_record():
  assert R.normalise_kind("comparison") == "comparisons"
  with pytest.raises(ValueError, match="unknown record kind 'pairs'"):
    R.normalise_kind("pairs")
  comparison = {"id": "x:1", "task": "{}", "messages": [USER], "responses": ["a", "b"],
                "ranks": [1, 0]}
  assert R.convert_record(comparison, "comparison", "demonstrations") == {
      "id": "x:1", "task": "{}", "messages": [USER, msg("assistant", "b")]}
  assert R.convert_record(comparison, "comparison", "prompt") == {
      "id": "x:1", "task": "{}", "messages": [USER]}
  demo = {"id": "d", "messages": [USER, ASSISTANT]}
  assert R.convert_record(demo, "demonstration", "prompts") == {"id": "d", "messages": [USER]}
  assert R.convert_record(demo, "demonstrations", "demonstrations") == demo
  with pytest.raises(ValueError, match="prompts records cannot be turned into demonstrations"):
    R.convert_record({"messages": [USER]}, "prompt", "demonstrations")
  with pytest.raises(R.Skip, match="empty_response"):
    R.convert_record({**comparison, "responses": ["a", " "]}, "comparison", "demonstrations")


# ------------------------------------------------------------------------------------ HH-RLHF


def hh(*turns):
  return "".join(f"\n\n{role}: {text}" for role, text in turns)


def test_parse_hh_pair_splits_prompt_and_responses():
  prompt = [("Human", "hi"), ("Assistant", "yes?"), ("Human", "tell me")]
  pair = {"chosen": hh(*prompt, ("Assistant", "sure ")), "rejected": hh(*prompt, ("Assistant", "no"))}
  assert R.parse_hh_pair(pair, "w") == {
      "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
                   {"role": "user", "content": "tell me"}],
      "responses": ["sure", "no"], "ranks": [0, 1]}


@pytest.mark.parametrize("chosen, rejected, reason", [
    (hh(("Human", "a"), ("Assistant", "x")), hh(("Human", "b"), ("Assistant", "y")),
     "prompt_mismatch"),
    (hh(("Human", "a"), ("Assistant", "x")), hh(("Human", "a"), ("Assistant", "x")),
     "duplicate_responses"),
    (hh(("Human", "a"), ("Assistant", "x")), hh(("Human", "a")) + "\n\nAssistant: ",
     "empty_response"),
    ("\n\nHuman: only a question", "\n\nHuman: only a question", "malformed_transcript"),
    ("preamble" + hh(("Human", "a"), ("Assistant", "x")),
     "preamble" + hh(("Human", "a"), ("Assistant", "y")), "malformed_transcript"),
    (hh(("Human", "a"), ("Assistant", " "), ("Human", "b"), ("Assistant", "x")),
     hh(("Human", "a"), ("Assistant", " "), ("Human", "b"), ("Assistant", "y")), "empty_turn"),
    (hh(("Human", "a"), ("Assistant", "m"), ("Assistant", "x")),
     hh(("Human", "a"), ("Assistant", "m"), ("Assistant", "y")), "prompt_not_ending_in_user"),
])
def test_parse_hh_pair_skips(chosen, rejected, reason):
  with pytest.raises(R.Skip) as info:
    R.parse_hh_pair({"chosen": chosen, "rejected": rejected}, "w")
  assert info.value.reason == reason


def test_parse_hh_pair_missing_key_is_error():
  with raises_at("hh.jsonl:9", "rejected", "missing"):
    R.parse_hh_pair({"chosen": hh(("Human", "a"), ("Assistant", "x"))}, "hh.jsonl:9")


HH_EXPECTED = {  # lines, kept, skipped by reason (measured on the shared test files)
    "helpful-base": (2354, 2339, {"duplicate_responses": 2, "empty_response": 4,
                                  "prompt_mismatch": 9}),
    "helpful-online": (1137, 1131, {"duplicate_responses": 2, "empty_response": 3,
                                    "empty_turn": 1}),
    "helpful-rejection-sampled": (2749, 2714, {"duplicate_responses": 32, "prompt_mismatch": 3}),
}


@pytest.mark.parametrize("subset", sorted(HH_EXPECTED))
def test_hh_real_counts_reconcile(subset):
  path = need(f"hh_rlhf/{subset}/test.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    file_lines = sum(1 for _ in f)
  tally = R.Tally()
  kept = [rec for _, rec in R.parse_jsonl(path, R.parse_hh_pair, tally)]
  lines, n_kept, skipped = HH_EXPECTED[subset]
  assert file_lines == tally.seen == lines
  assert len(kept) == n_kept and tally.skipped == skipped
  assert tally.seen == len(kept) + tally.num_skipped
  for rec in kept:  # every kept pair satisfies the comparison schema
    assert rec["messages"][-1]["role"] == "user" and rec["ranks"] == [0, 1]
    assert all(m["content"] and m["content"] == m["content"].strip() for m in rec["messages"])
    assert all(rec["responses"]) and rec["responses"][0] != rec["responses"][1]


# -------------------------------------------------------------------------------------- OASST


def oasst_row(mid, parent, role, text, rank=None, deleted=False):
  return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
          "deleted": deleted, "message_tree_id": "t", "lang": "en"}


def small_tree(tmp_path):
  rows = [
      oasst_row("p1", None, "prompter", "root question"),
      oasst_row("a1", "p1", "assistant", "best", 0),
      oasst_row("a2", "p1", "assistant", "worst", 2),
      oasst_row("a3", "p1", "assistant", "middle", 1, deleted=True),
      oasst_row("a4", "p1", "assistant", "unranked"),
      oasst_row("p2", "a1", "prompter", "follow up"),
      oasst_row("a5", "p2", "assistant", "only one", 0),
      oasst_row("p3", "gone", "prompter", "orphan"),
      oasst_row("a6", "p3", "assistant", "x", 0),
      oasst_row("a7", "p3", "assistant", "y", 1),
  ]
  return R.read_oasst(write_lines(tmp_path / "en-validation.jsonl", rows))


def test_oasst_rankings_history_ranks_and_skips(tmp_path):
  messages = small_tree(tmp_path)
  tally = R.Tally()
  got = list(R.oasst_records(messages, "rankings", tally))
  assert got == [("p1", {"messages": [{"role": "user", "content": "root question"}],
                         "responses": ["best", "middle", "worst"], "ranks": [0, 1, 2]})]
  assert tally.seen == 2 and tally.skipped == {"missing_ancestor": 1}
  assert tally.extra["ranked_replies_per_prompt"] == {"1": 1, "2": 1, "3": 1}
  # Dropping deleted messages removes a3: ranks [0, 2] are stored dense as [0, 1].
  tally = R.Tally()
  got = dict(R.oasst_records(messages, "rankings", tally, drop_deleted=True))
  assert got["p1"]["responses"] == ["best", "worst"] and got["p1"]["ranks"] == [0, 1]
  tally = R.Tally()
  assert [rid for rid, _ in R.oasst_records(messages, "rankings", tally, min_replies=3)] == ["p1"]
  assert tally.seen == 1 and not tally.skipped


def test_oasst_sft_takes_rank0_with_full_history(tmp_path):
  messages = small_tree(tmp_path)
  tally = R.Tally()
  got = dict(R.oasst_records(messages, "sft", tally))
  assert got["p1"] == {"messages": [{"role": "user", "content": "root question"},
                                    {"role": "assistant", "content": "best"}]}
  assert got["p2"] == {"messages": [{"role": "user", "content": "root question"},
                                    {"role": "assistant", "content": "best"},
                                    {"role": "user", "content": "follow up"},
                                    {"role": "assistant", "content": "only one"}]}
  assert set(got) == {"p1", "p2"} and tally.skipped == {"missing_ancestor": 1}


@pytest.mark.parametrize("change, key, match", [
    ({"rank": -1}, "rank", "is negative"),
    ({"rank": 1.0}, "rank", "non-negative integer or null"),
    ({"rank": True}, "rank", "non-negative integer or null"),
    ({"role": "user"}, "role", "unknown role 'user'"),
    ({"text": None}, "text", "expected a string"),
    ({"deleted": "no"}, "deleted", "a boolean or null"),
])
def test_oasst_bad_rows_are_errors(tmp_path, change, key, match):
  rows = [oasst_row("p1", None, "prompter", "q"), {**oasst_row("a1", "p1", "assistant", "x"),
                                                     **change}]
  path = write_lines(tmp_path / "o.jsonl", rows)
  with raises_at(f"{path}:2", key, match):
    R.read_oasst(path)


def test_oasst_duplicate_id_is_error(tmp_path):
  path = write_lines(tmp_path / "o.jsonl", [oasst_row("p1", None, "prompter", "q")] * 2)
  with raises_at(f"{path}:2", "message_id", "duplicate"):
    R.read_oasst(path)


def test_oasst_real_counts():
  messages = R.read_oasst(need("oasst1_en_validation/en-validation.jsonl"))
  assert len(messages) == 2022
  tally = R.Tally()
  ranked = [rec for _, rec in R.oasst_records(messages, "rankings", tally)]
  hist = tally.extra["ranked_replies_per_prompt"]
  assert hist == {"0": 360, "1": 1, "2": 137, "3": 267, "4": 13, "5": 1}
  assert sum(n for k, n in hist.items() if int(k) >= 3) == 281
  assert tally.seen == sum(n for k, n in hist.items() if int(k) >= 2) == 418
  # One prompt (line 849) has two identical replies ranked 0 and 2: skipped as contradictory.
  assert tally.skipped == {"duplicate_responses": 1}
  assert collections.Counter(len(r["responses"]) for r in ranked) == {2: 137, 3: 266, 4: 13, 5: 1}
  for rec in ranked:
    assert rec["ranks"] == sorted(rec["ranks"]) and rec["ranks"][0] == 0
    assert [m["role"] for m in rec["messages"]][::2] == ["user"] * ((len(rec["messages"]) + 1) // 2)
  tally3 = R.Tally()
  assert len(list(R.oasst_records(messages, "rankings", tally3, min_replies=3))) == 280
  assert tally3.seen == 281
  sft = list(R.oasst_records(messages, "sft", R.Tally()))
  assert len(sft) == 419 == sum(n for k, n in hist.items() if int(k) >= 1)


# --------------------------------------------------------------------------------- text units


def test_text_units():
  text = "a\nb\n\n\n  \nc\r\n\nd  \n"
  assert R.text_units(text, "paragraph") == [(1, "a\nb"), (6, "c"), (8, "d  ")]
  assert R.text_units(text, "line") == [(1, "a"), (2, "b"), (6, "c"), (8, "d  ")]
  assert R.text_units(text, "file") == [(1, text)]
  assert R.text_units(" \n", "file") == []
  with pytest.raises(ValueError, match="unknown text unit"):
    R.text_units(text, "sentence")


def test_parse_text_record():
  assert R.parse_text_record({"text": "x"}, "w") == {"text": "x"}
  with pytest.raises(R.Skip, match="empty_text"):
    R.parse_text_record({"text": "  "}, "w")
  with raises_at("t.jsonl:4", "text", "missing"):
    R.parse_text_record({"body": "x"}, "t.jsonl:4")


def test_shakespeare_paragraphs_cover_every_nonblank_line():
  text = R.read_text(need("tinyshakespeare/input.txt"))
  paragraphs = R.text_units(text, "paragraph")
  assert len(text) == 1_115_394 and len(paragraphs) == 7222
  lines = [ln for ln in text.split("\n") if ln.strip()]
  assert [ln for _, p in paragraphs for ln in p.split("\n")] == lines
  assert len(R.text_units(text, "line")) == len(lines) == 32777


def test_self_instruct_seed_maps_to_demonstrations_and_prompts():
  path = need("self_instruct_seed/seed_tasks.jsonl")
  raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
  demos = [rec for _, rec in R.parse_jsonl(path, R.parse_demonstrations, R.Tally())]
  prompts = [rec for _, rec in R.parse_jsonl(path, R.parse_prompts, R.Tally())]
  assert len(raw) == len(demos) == len(prompts) == 175
  for obj, demo, prompt in zip(raw, demos, prompts):
    inst = obj["instances"][0]
    assert demo["messages"][-1] == {"role": "assistant", "content": inst["output"]}
    assert demo["messages"][:-1] == prompt["messages"]
    assert prompt["messages"][0]["content"].startswith(obj["instruction"])
    assert (inst["input"] in prompt["messages"][0]["content"]) or not inst["input"].strip()


# ------------------------------------------------------------------------------ hash splitting


def test_assign_split_is_deterministic_salted_and_calibrated():
  keys = [f"prompt number {i}" for i in range(20000)]
  splits = [R.assign_split(k, 0.1) for k in keys]
  assert splits == [R.assign_split(k, 0.1) for k in keys]
  frac = splits.count("validation") / len(keys)
  assert abs(frac - 0.1) < 0.01  # binomial sd is 0.002
  salted = [R.assign_split(k, 0.1, salt="s") for k in keys]
  assert salted != splits and abs(salted.count("validation") / len(keys) - 0.1) < 0.01
  assert {R.assign_split(k, 0.0) for k in keys} == {"train"}
  with pytest.raises(ValueError, match="validation_fraction"):
    R.assign_split("k", 1.0)


def test_record_key_uses_the_prompt():
  prompt = [USER]
  demo = {"messages": prompt + [ASSISTANT]}
  comparison = {"messages": prompt, "responses": ["a", "b"], "ranks": [0, 1]}
  assert R.record_key(demo) == R.record_key(comparison) == R.record_key({"messages": prompt})
  assert R.record_key({"messages": prompt + [ASSISTANT, USER]}) != R.record_key(demo)
  assert R.record_key({"text": "abc"}) == "abc"
