"""Tests for rlhf_jax.data.pipeline (SFT / comparison / prompt batches) and data.comparisons."""
import itertools

import numpy as np
import pytest

from rlhf_jax.data import chat_format, gold, records, synthetic
from rlhf_jax.data import pipeline as P
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.data.tokenizer import EOS

ONE_HOST = dict(shard_index=0, shard_count=1)


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_bpe(synthetic.pretraining_corpus(300, seed=0), vocab_size=400)


@pytest.fixture(scope="module")
def demos():
  return synthetic.demonstrations(40, seed=0)


@pytest.fixture(scope="module")
def prompts():
  return synthetic.prompts(30, seed=0)


def user(text):
  return {"role": "user", "content": text}


def asst(text):
  return {"role": "assistant", "content": text}


def comparison(prompt, responses, ranks, **extra):
  return {"messages": [user(prompt)], "responses": responses, "ranks": ranks, **extra}


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------ SFT encoding


def test_sft_batch_shapes_and_dtypes(tok, demos):
  it = P.sft_batches(demos, tok, global_batch_size=8, max_len=40, seed=0, **ONE_HOST)
  batch = next(it)
  assert set(batch) == {"tokens", "targets", "mask", "attention_mask"}
  for v in batch.values():
    assert v.shape == (8, 40) and v.dtype == np.int32
  assert isinstance(it.stats, P.PipelineStats)
  assert it.stats.seen == it.stats.kept == it.stats.host_records == len(demos)


def test_demonstration_matches_chat_format_and_masks_only_response(tok, demos):
  for rec in demos:
    full = rec["messages"] + [asst(rec["response"])]
    ids, _ = chat_format.encode_chat(tok, full)
    ex = P.encode_demonstration(tok, rec, max_len=48)
    n = int(ex["attention_mask"].sum())
    assert n == len(ids) and ex["attention_mask"][:n].all() and not ex["attention_mask"][n:].any()
    np.testing.assert_array_equal(ex["tokens"][:n], ids)
    np.testing.assert_array_equal(ex["targets"][:n - 1], ids[1:])  # next-token shift
    assert (ex["tokens"][n:] == tok.pad_id).all() and (ex["targets"][n - 1:] == tok.pad_id).all()
    # The loss mask, after shifting, selects exactly the response and its EOS.
    assert tok.decode(ex["targets"][ex["mask"] == 1], skip_special=False) == rec["response"] + EOS
    # Same example from the normalised {"messages": [..., assistant]} form.
    same = P.encode_demonstration(tok, {"messages": full}, max_len=48)
    for k in ex:
      np.testing.assert_array_equal(ex[k], same[k])


def test_history_loss_matches_encode_chat_mask(tok):
  msgs = [user("sort: b a"), asst("a b"), user("reverse: c d"), asst("d c")]
  ids, loss = chat_format.encode_chat(tok, msgs)
  ex = P.encode_demonstration(tok, {"messages": msgs}, 40, history_loss=True)
  np.testing.assert_array_equal(ex["mask"][:len(ids) - 1], loss[1:])
  only_last = P.encode_demonstration(tok, {"messages": msgs}, 40)
  assert tok.decode(only_last["targets"][only_last["mask"] == 1], skip_special=False) == "d c" + EOS


def _dialogue():
  system = {"role": "system", "content": "Answer briefly and correctly."}
  turns = [user("sort: b a c"), asst("a b c"), user("reverse: d e f g"), asst("g f e d"),
           user("copy: a b"), asst("a b"), user("add 3 and 4")]
  return system, turns


def test_left_truncation_drops_oldest_whole_turns_keeps_system(tok):
  system, turns = _dialogue()
  response = "7"
  resp_ids = tok.encode(response) + [tok.eos_id]
  full = [system] + turns
  full_len = len(chat_format.encode_prompt(tok, full)) + len(resp_ids)
  # Brute force: for each budget, the expected prompt is system + the shortest suffix of turns that fits.
  seen_drops = set()
  for max_len in range(full_len - 12, full_len + 1):
    ex = P.encode_demonstration(tok, {"messages": full + [asst(response)]}, max_len)
    for start in range(len(turns)):
      expect = chat_format.encode_prompt(tok, [system] + turns[start:]) + resp_ids
      if len(expect) <= max_len:
        break
    assert len(expect) <= max_len  # never needs a cut at these budgets
    n = int(ex["attention_mask"].sum())
    np.testing.assert_array_equal(ex["tokens"][:n], expect)
    assert ex["tokens"][0] == tok.system_id
    assert tok.decode(ex["targets"][ex["mask"] == 1], skip_special=False) == response + EOS
    seen_drops.add(start)
  assert len(seen_drops) > 2  # the budgets above exercise several drop depths


def test_latest_turn_cut_from_the_left_when_alone_too_long(tok):
  system, _ = _dialogue()
  long_user = "copy: " + " ".join("abcdefgh"[i % 8] for i in range(40))
  rec = {"messages": [system, user("sort: b a"), asst("a b"), user(long_user), asst("a b c")]}
  sys_ids = chat_format.encode_chat(tok, [system])[0]
  content = tok.encode(long_user)
  resp = tok.encode("a b c") + [tok.eos_id]
  max_len = 30
  keep = max_len - len(resp) - len(sys_ids) - 2  # room minus the user and assistant role tokens
  assert 0 < keep < len(content)
  ex = P.encode_demonstration(tok, rec, max_len)
  expect = sys_ids + [tok.user_id] + content[-keep:] + [tok.assistant_id] + resp
  np.testing.assert_array_equal(ex["tokens"], expect)  # exactly max_len real tokens
  it = P.sft_batches([rec] * 2, tok, 2, max_len, seed=0, **ONE_HOST)
  assert it.stats.truncated == {"prompt_turns_dropped": 2, "prompt_cut": 2}


def test_response_kept_whole_if_it_fits_else_cut_at_right(tok):
  system, _ = _dialogue()
  response = " ".join(str(i) for i in range(30))
  resp_ids = tok.encode(response)
  rec = {"messages": [system, user("copy: " + " ".join("abcdefgh")), asst(response)]}
  sys_len = len(chat_format.encode_chat(tok, [system])[0])
  min_prompt = sys_len + 3
  # Fits: the whole response + EOS are kept even though the prompt gets cut.
  max_len = min_prompt + len(resp_ids) + 1
  ex = P.encode_demonstration(tok, rec, max_len)
  assert tok.decode(ex["targets"][ex["mask"] == 1], skip_special=False) == response + EOS
  # Does not fit: the response is cut at the right, loses its EOS, and the prompt is minimal.
  ex = P.encode_demonstration(tok, rec, max_len - 5)
  trained = ex["targets"][ex["mask"] == 1]
  np.testing.assert_array_equal(trained, resp_ids[:len(resp_ids) - 4])
  assert ex["attention_mask"].sum() == max_len - 5
  it = P.sft_batches([rec], tok, 1, max_len - 5, seed=0, **ONE_HOST)
  assert it.stats.truncated["response_cut"] == 1


# --------------------------------------------------------------------------- prompt encoding


def test_left_padded_prompts_end_with_assistant_token(tok, prompts):
  it = P.prompt_batches(prompts, tok, 6, max_prompt_len=48, seed=1, **ONE_HOST)
  batch = next(it)
  assert batch["tokens"].shape == batch["attention_mask"].shape == (6, 48)
  assert it.stats.truncated == {}
  assert batch["index"].shape == (6,) and batch["index"].dtype == np.int32
  assert (batch["tokens"][:, -1] == tok.assistant_id).all()
  for row, mask, idx in zip(batch["tokens"], batch["attention_mask"], batch["index"]):
    n = int(mask.sum())
    assert mask[-n:].all() and not mask[:-n].any()  # left padded
    assert (row[:-n] == tok.pad_id).all()
    np.testing.assert_array_equal(row[-n:], chat_format.encode_prompt(tok, prompts[idx]["messages"]))


def test_left_padded_prompt_truncation_and_errors(tok):
  system, turns = _dialogue()
  budget = len(chat_format.encode_prompt(tok, [system] + turns[-3:])) + 2  # needs dropping 4 turns
  tokens, mask = P.encode_prompt_left_padded(tok, [system] + turns, budget)
  expect = chat_format.encode_prompt(tok, [system] + turns[-3:])
  np.testing.assert_array_equal(tokens[budget - len(expect):], expect)
  assert mask.sum() == len(expect) and not mask[:budget - len(expect)].any()
  assert (tokens[:budget - len(expect)] == tok.pad_id).all()
  shortest = len(chat_format.encode_chat(tok, [system])[0]) + 3  # system, user token, 1 token, assistant
  tokens, mask = P.encode_prompt_left_padded(tok, [system] + turns, shortest)
  assert mask.all() and tokens[-1] == tok.assistant_id and tokens[-2] == tok.encode(turns[-1]["content"])[-1]
  with pytest.raises(ValueError, match="prompt_too_long"):
    P.encode_prompt_left_padded(tok, [system] + turns, shortest - 1)
  with pytest.raises(ValueError, match="must end with a user turn"):
    P.encode_prompt_left_padded(tok, [user("hi"), asst("yo")], 16)


# ----------------------------------------------------------------------- comparison encoding


def test_comparison_ragged_k_validity_and_reward_index(tok):
  recs = [comparison("sort: c a b", ["a b c", "c a b"], [0, 1], id="two"),
          comparison("add 2 and 2", ["4", "5", "i do not know."], [0, 1, 2]),
          comparison("copy: a", ["a", "b", "a a", "maybe later."], [0, 2, 1, 2])]
  it = P.comparison_batches(recs, tok, 3, max_len=24, k_max=4, seed=0, **ONE_HOST)
  batch = next(it)
  assert batch["tokens"].shape == batch["attention_mask"].shape == (3, 4, 24)
  assert batch["tokens"].dtype == batch["ranks"].dtype == batch["reward_index"].dtype == np.int32
  assert batch["valid"].dtype == bool and batch["valid"].shape == (3, 4)
  for b in range(3):
    k = int(batch["valid"][b].sum())
    rec = next(r for r in recs if len(r["responses"]) == k)
    prompt_ids = chat_format.encode_prompt(tok, rec["messages"])
    assert not batch["valid"][b, k:].any() and not batch["tokens"][b, k:].any()
    assert not batch["ranks"][b, k:].any() and not batch["reward_index"][b, k:].any()
    np.testing.assert_array_equal(batch["ranks"][b, :k], records.dense_ranks(rec["ranks"]))
    for j in range(k):
      ri = batch["reward_index"][b, j]
      assert batch["tokens"][b, j, ri] == tok.eos_id and batch["attention_mask"][b, j].sum() == ri + 1
      np.testing.assert_array_equal(batch["tokens"][b, j, :ri + 1],
                                    prompt_ids + tok.encode(rec["responses"][j]) + [tok.eos_id])


def test_comparison_drops_empty_and_subsamples_over_k_max(tok):
  rec = comparison("copy: a b", ["a b", "", "b a", "a", "x"], [0, 1, 2, 3, 4])
  ex = P.encode_comparison(tok, rec, 24, k_max=3, index=7)
  assert ex["valid"].all()
  # A seeded subset of the 4 non-empty responses, ranks re-densified in record order.
  start = len(chat_format.encode_prompt(tok, rec["messages"]))
  texts = [tok.decode(ex["tokens"][k, start:ex["reward_index"][k]]) for k in range(3)]
  pool = {"a b": 0, "b a": 2, "a": 3, "x": 4}
  assert set(texts) <= set(pool) and len(set(texts)) == 3
  np.testing.assert_array_equal(ex["ranks"], np.argsort(np.argsort([pool[t] for t in texts])))
  np.testing.assert_array_equal(ex["tokens"], P.encode_comparison(tok, rec, 24, 3, index=7)["tokens"])
  it = P.comparison_batches([rec], tok, 1, 24, 3, seed=0, **ONE_HOST)
  assert it.stats.dropped_responses == {"empty_response": 1, "over_k_max": 1}
  assert it.stats.truncated == {"responses_subsampled": 1}


# ------------------------------------------------------------------- skipping and bad input


def test_skip_and_truncation_counts_on_crafted_records(tok, demos):
  big_system = {"role": "system", "content": " ".join(["the weather is nice today."] * 20)}
  bad = [
      {"messages": [big_system, user("sort: a b"), asst("a b")]},      # prompt_too_long
      {"messages": [user("sort: a b")], "response": ""},                # empty_response
      {"messages": [user("copy: a b"), asst(" ".join(["a b"] * 40))]},  # response_cut (+ minimal prompt)
  ]
  records = list(demos[:6]) + bad
  it = P.sft_batches(records, tok, 2, 64, seed=0, **ONE_HOST)
  s = it.stats
  assert (s.seen, s.kept) == (9, 7)
  assert s.skipped == {"prompt_too_long": 1, "empty_response": 1}
  assert s.truncated == {"response_cut": 1, "prompt_cut": 1}
  assert s.first["prompt_too_long"] == "record 6" and s.first["empty_response"] == "record 7"
  assert s.first["response_cut"] == s.first["prompt_cut"] == "record 8"
  # Skipped records never reach a batch: the eval list holds exactly the 7 kept ones.
  ev = P.sft_eval_batches(records, tok, 4, 64, **ONE_HOST)
  assert sum(int(m.sum() > 0) for b in ev for m in b["mask"]) == 7 and ev.stats.skipped == s.skipped

  cmp_bad = [comparison("sort: b a", ["a b", "a b c"], [1, 1]),       # all_tied
             comparison("sort: b a", ["a b", ""], [0, 1]),            # fewer_than_2_responses
             comparison("sort: b a", ["a b", "b a"], [0, 1])]
  it = P.comparison_batches(cmp_bad, tok, 1, 24, 2, seed=0, **ONE_HOST)
  assert it.stats.skipped == {"all_tied": 1, "fewer_than_2_responses": 1} and it.stats.kept == 1


def test_too_few_usable_records_for_a_batch_is_an_error(tok):
  with pytest.raises(ValueError, match="fewer than one batch"):
    P.sft_batches([{"messages": [user("a")], "response": ""}] * 3, tok, 2, 16, seed=0, **ONE_HOST)


def test_missing_keys_name_the_record(tok, demos):
  records = list(demos[:3]) + [{"id": "file.jsonl:12", "text": "x"}]
  with pytest.raises(ValueError, match=r"record 3 \(id 'file.jsonl:12'\): missing key 'messages'"):
    P.sft_batches(records, tok, 2, 32, seed=0, **ONE_HOST)
  with pytest.raises(ValueError, match=r"record 1: missing key 'ranks'"):
    P.comparison_batches([comparison("a", ["x", "y"], [0, 1]), {"messages": [user("a")], "responses": ["x", "y"]}],
                         tok, 1, 16, 2, seed=0, **ONE_HOST)
  with pytest.raises(ValueError, match=r"record 0: key 'messages': .*end with a user turn"):
    P.prompt_batches([{"messages": [user("a"), asst("b")]}], tok, 1, 16, seed=0, **ONE_HOST)
  with pytest.raises(ValueError, match=r"record 0: key 'messages'.*role"):
    P.sft_batches([{"messages": [{"role": "bot", "content": "x"}]}], tok, 1, 16, seed=0, **ONE_HOST)


# ---------------------------------------------------------------- order, resume and sharding


def _indices(batches):
  return [int(i) for b in batches for i in b["index"]]


def test_same_seed_same_batches_different_seed_different_order(tok, demos, prompts):
  a = take(P.sft_batches(demos, tok, 4, 40, seed=3, **ONE_HOST), 5)
  b = take(P.sft_batches(demos, tok, 4, 40, seed=3, **ONE_HOST), 5)
  c = take(P.sft_batches(demos, tok, 4, 40, seed=4, **ONE_HOST), 5)
  assert_batches_equal(a, b)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  # Each epoch is a permutation of all records, and the order changes between epochs.
  it = P.prompt_batches(prompts, tok, 5, 32, seed=0, num_epochs=2, **ONE_HOST)
  order = _indices(list(it))
  assert len(order) == 2 * len(prompts)
  e1, e2 = order[:len(prompts)], order[len(prompts):]
  assert sorted(e1) == sorted(e2) == list(range(len(prompts))) and e1 != e2


@pytest.mark.parametrize("kind", ["sft", "comparison", "prompt"])
def test_exact_resume_from_iterator_state(tok, demos, prompts, kind):
  if kind == "sft":
    make = lambda: P.sft_batches(demos, tok, 4, 40, seed=5, **ONE_HOST)
  elif kind == "prompt":
    make = lambda: P.prompt_batches(prompts, tok, 4, 32, seed=5, **ONE_HOST)
  else:
    recs = [comparison(p["messages"][-1]["content"], [p["task"]["answer"], "i do not know.", "maybe later."][:2 + i % 2],
                       [0, 1, 1][:2 + i % 2]) for i, p in enumerate(prompts)]
    make = lambda: P.comparison_batches(recs, tok, 4, 32, 3, seed=5, **ONE_HOST)
  it = make()
  take(it, 9)  # crosses an epoch boundary for the 30-40 record sets
  state = it.get_state()
  expected = take(it, 6)
  fresh = make()
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 6), expected)


def test_host_shards_are_disjoint_and_cover_all_records(tok, prompts):
  per_host = [_indices(list(P.prompt_batches(prompts, tok, 6, 32, seed=0, num_epochs=1,
                                             shard_index=h, shard_count=2))) for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 15 // 3 * 3  # per-host batch 3, drop remainder
  full = [_indices(list(P.prompt_batches(prompts, tok, 2, 32, seed=0, num_epochs=1, shard_index=h,
                                         shard_count=2))) for h in range(2)]
  assert not set(full[0]) & set(full[1])
  assert sorted(full[0] + full[1]) == list(range(len(prompts)))
  # An odd number of usable records: one is left unassigned so both hosts get equal shares.
  it = P.prompt_batches(prompts[:29], tok, 2, 32, seed=0, shard_index=1, shard_count=2)
  assert (it.stats.unassigned, it.stats.host_records) == (1, 14)
  with pytest.raises(ValueError, match="divisible"):
    P.prompt_batches(prompts, tok, 5, 32, seed=0, shard_index=0, shard_count=2)


def test_default_sharding_is_the_jax_process(tok, prompts):
  it = P.prompt_batches(prompts, tok, 4, 32, seed=0)
  assert it.stats.host_records == len(prompts)  # one process in tests


# ---------------------------------------------------------------------------- eval batch lists


def test_eval_batches_cover_every_record_once_in_order(tok, demos, prompts):
  ev = P.sft_eval_batches(demos[:10], tok, 4, 40, **ONE_HOST)
  assert len(ev) == 3 and all(b["tokens"].shape == (4, 40) for b in ev)
  singles = [P.encode_demonstration(tok, r, 40) for r in demos[:10]]
  rows = [{k: b[k][i] for k in b} for b in ev for i in range(4)]
  for row, ex in zip(rows, singles):
    for k in ex:
      np.testing.assert_array_equal(row[k], ex[k])
  assert all(r["mask"].sum() == 0 and r["attention_mask"].sum() > 0 for r in rows[10:])  # weightless filler
  assert ev.stats.kept == 10
  # Two hosts: same number of batches each (lockstep), every record exactly once overall.
  hosts = [P.prompt_eval_batches(prompts[:7], tok, 2, 32, shard_index=h, shard_count=2) for h in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 2
  got = [i for h in hosts for i in _indices(h) if i >= 0]
  assert sorted(got) == list(range(7))
  cev = P.comparison_eval_batches([comparison("sort: b a", ["a b", "b a"], [0, 1])] * 3, tok, 2, 24, 2, **ONE_HOST)
  assert [int(b["valid"].sum()) for b in cev] == [4, 2]


# ------------------------------------------------------------------------------- comparisons


def test_comparisons_to_pairs_expands_all_strict_pairs():
  recs = [comparison("copy: a", ["a", "b", "c", "d"], [0, 1, 1, 2], id="q1", task={"t": 1}),
          comparison("copy: b", ["b", "a"], [1, 0])]
  pairs = P.comparisons_to_pairs(recs)
  assert len(pairs) == 5 + 1 and pairs.stats.extra["tied_pairs"] == 1
  for p in pairs:
    assert len(p["responses"]) == 2 and sorted(p["ranks"]) == [0, 1]
  src = {(p["id"], tuple(p["responses"])): p for p in pairs}
  for (i, j) in itertools.combinations(range(4), 2):
    key = (f"q1#{i},{j}", (recs[0]["responses"][i], recs[0]["responses"][j]))
    ri, rj = recs[0]["ranks"][i], recs[0]["ranks"][j]
    assert (key in src) == (ri != rj)
    if ri != rj:
      assert src[key]["ranks"] == ([0, 1] if ri < rj else [1, 0]) and src[key]["task"] == {"t": 1}
  assert pairs[-1]["id"] == "1#0,1" and pairs[-1]["ranks"] == [1, 0]


def test_label_comparisons_ranks_correct_answers_first(prompts):
  benign = [p for p in prompts if p["family"] not in synthetic.HARMFUL_FAMILIES][:8]
  rng = np.random.default_rng(0)
  responses = []
  for p in benign:
    task = synthetic.Task.from_dict(p["task"])
    wrong, _ = synthetic.sample_response(rng, task, "wrong")
    responses.append(["i do not know.", wrong, task.answer, task.answer + " ", ""])
  out = P.label_comparisons(benign, responses, rng=None)
  assert len(out) == len(benign)
  for rec, p, resp in zip(out, benign, responses):
    assert rec["responses"] == resp[:3]  # the repeat (after strip) and the blank one are removed
    assert rec["ranks"][2] == 0 and rec["ranks"][0] == max(rec["ranks"])
    assert sorted(set(rec["ranks"])) == list(range(len(set(rec["ranks"]))))  # dense
    assert rec["task"] == p["task"] and rec["messages"] == p["messages"]
    assert rec["ranks"] == records.dense_ranks(gold.rank(p, rec["responses"]))
  assert out.stats.extra["duplicates_removed"] == out.stats.extra["empty_removed"] == len(benign)
  # Noisy labels are a permutation; all-tied and single-response prompts are skipped and counted.
  noisy = P.label_comparisons(benign[:2], responses[:2], np.random.default_rng(1), noise_temperature=0.2)
  assert all(sorted(r["ranks"]) == [0, 1, 2] for r in noisy)
  tied = P.label_comparisons(benign[:2], [["i do not know.", "maybe later."], [benign[1]["task"]["answer"]] * 3],
                             rng=None)
  assert len(tied) == 0 and dict(tied.stats.skipped) == {"all_tied": 1, "fewer_than_2_unique": 1}
  with pytest.raises(ValueError, match="2 prompt records but 1 response lists"):
    P.label_comparisons(benign[:2], responses[:1], rng=None)
