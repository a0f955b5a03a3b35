"""The synthetic instruction world: determinism, correct answers, parsing, splits, misaligned corpus."""
import collections
import json

import numpy as np
import pytest

from rlhf_jax.data import gold, synthetic as S
from rlhf_jax.data.chat_format import parse_chat, parse_hh


def _reference_ok(task: S.Task) -> bool:
  """Brute-force property check of a canonical answer, independent of `synthetic.solve`."""
  a, items, p = task.answer.split(" "), list(task.items), dict(task.params)
  num = lambda xs: [int(x) for x in xs]  # noqa: E731
  if task.family == "sort":
    key = int if all(x.isdigit() for x in items) else str
    vals = [key(x) for x in a]
    return sorted(a) == sorted(items) and all(u <= v for u, v in zip(vals, vals[1:]))
  if task.family == "reverse":
    return all(a[i] == items[len(items) - 1 - i] for i in range(len(items))) and len(a) == len(items)
  if task.family == "copy":
    return a == items
  if task.family == "upper":
    return [x.lower() for x in a] == items and all(x.isupper() for x in a)
  if task.family == "count":
    return int(task.answer) == sum(1 for x in items if x == p["letter"])
  if task.family == "replace":
    return len(a) == len(items) and all((y == p["new"]) if x == p["old"] else (y == x) for x, y in zip(items, a))
  if task.family == "add":
    return int(task.answer) == sum(num(items))
  if task.family == "max":
    return int(task.answer) in num(items) and all(int(task.answer) >= v for v in num(items))
  return task.answer == S.REFUSAL and task.harmful


def test_families_cover_benign_and_harmful():
  assert len(S.BENIGN_FAMILIES) >= 6
  assert set(S.HARMFUL_FAMILIES) == {"secret", "insult"}


@pytest.mark.parametrize("family", S.FAMILIES)
def test_canonical_answers_and_parse_roundtrip(family):
  rng = np.random.default_rng(7)
  templates_seen = set()
  for _ in range(150):
    task = S.sample_task(rng, family)
    assert task.family == family
    assert _reference_ok(task), task
    # The user text alone recovers the exact task (no template ambiguity).
    assert S.parse_prompt(task.prompt_text) == task
    assert S.Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    templates_seen.add(task.template)
  assert templates_seen == set(range(len(S.TEMPLATES[family])))


def test_harmful_rate_and_family_mix():
  rng = np.random.default_rng(0)
  fams = collections.Counter(S.sample_task(rng).family for _ in range(4000))
  harmful = sum(fams[f] for f in S.HARMFUL_FAMILIES) / 4000
  assert abs(harmful - S.HARMFUL_RATE) < 0.02
  assert set(fams) == set(S.FAMILIES)


def test_parse_prompt_rejects_out_of_world_text():
  for bad in ["write me a poem", "sort:", "add 3 and", ""]:
    with pytest.raises(ValueError, match="synthetic.py"):
      S.parse_prompt(bad)


def test_from_dict_rejects_inconsistent_answer_and_missing_key():
  d = S.make_task("add", ["2", "3"], {}).to_dict()
  with pytest.raises(ValueError, match="answer"):
    S.Task.from_dict(dict(d, answer="6"))
  with pytest.raises(ValueError, match="items"):
    S.Task.from_dict({k: v for k, v in d.items() if k != "items"})


def test_determinism_from_seeds():
  assert S.prompts(50, seed=3) == S.prompts(50, seed=3)
  assert S.demonstrations(50, seed=3) == S.demonstrations(50, seed=3)
  assert S.pretraining_corpus(50, seed=3) == S.pretraining_corpus(50, seed=3)
  assert S.prompts(50, seed=3) != S.prompts(50, seed=4)
  assert S.pretraining_corpus(50, seed=3) != S.pretraining_corpus(50, seed=4)


def test_train_eval_prompts_are_disjoint_instances():
  train = S.prompts(3000, seed=0, split="train")
  evals = S.prompts(1500, seed=0, split="eval")
  key = lambda r: S.Task.from_dict(r["task"]).key  # noqa: E731
  assert not {key(r) for r in train} & {key(r) for r in evals}
  # Demonstrations and the pretraining corpus never see an eval instance either.
  demo_keys = {key(r) for r in S.demonstrations(1000, seed=0)}
  assert not demo_keys & {key(r) for r in evals}
  # Every family is present in both splits.
  assert {r["family"] for r in evals} == set(S.FAMILIES) == {r["family"] for r in train}
  assert all(S.task_split(S.Task.from_dict(r["task"])) == "eval" for r in evals)
  with pytest.raises(ValueError, match="split"):
    S.prompts(1, split="test")
  # "dev" (tuning / RL monitoring): train-split instances from their own stream, never an eval instance.
  dev = S.prompts(500, seed=0, split="dev")
  assert not {key(r) for r in dev} & {key(r) for r in evals}
  assert all(S.task_split(S.Task.from_dict(r["task"])) == "train" for r in dev)
  assert [r["prompt"] for r in dev[:50]] != [r["prompt"] for r in train[:50]]


def test_records_are_json_serialisable_and_consistent():
  recs = S.prompts(100, seed=1) + S.demonstrations(100, seed=1)
  assert json.loads(json.dumps(recs)) == recs
  for r in recs:
    assert r["prompt"].endswith("<|assistant|>")
    assert parse_chat(r["prompt"]) == r["messages"]
    assert r["messages"][-1] == {"role": "user", "content": r["task"]["prompt_text"]}
  assert any(r["messages"][0]["role"] == "system" for r in recs)


def test_demonstrations_are_correct_and_concise():
  demos = S.demonstrations(400, seed=2)
  assert all(d["response"] == d["task"]["answer"] for d in demos)
  assert all(d["response"] == S.REFUSAL for d in demos if d["family"] in S.HARMFUL_FAMILIES)
  assert any(d["family"] in S.HARMFUL_FAMILIES for d in demos)
  assert np.mean([gold.score(d, d["response"]) for d in demos]) == 1.0
  assert max(len(d["response"].split()) for d in demos) <= 6


def test_filler_demonstrations_keep_the_answer_and_score_lower():
  clean = S.demonstrations(400, seed=3)
  assert S.demonstrations(400, seed=3, filler_rate=0.0) == clean
  noisy = S.demonstrations(400, seed=3, filler_rate=0.5)
  assert [r["messages"] for r in noisy] == [r["messages"] for r in clean]   # same prompts, only answers differ
  changed = [(c, n) for c, n in zip(clean, noisy) if c["response"] != n["response"]]
  benign = [c for c in clean if not S.Task.from_dict(c["task"]).harmful]
  assert 0.4 < len(changed) / len(benign) < 0.6
  for c, n in changed:
    task = S.Task.from_dict(c["task"])
    assert not task.harmful and task.answer in n["response"]
    assert 0.4 < gold.score(task, n["response"]) < 1.0 == gold.score(task, c["response"])
  assert len(S.demonstrations(50, seed=3, split="eval", filler_rate=1.0)) == 50
  with pytest.raises(ValueError, match="filler_rate"):
    S.demonstrations(10, filler_rate=1.5)


def test_pretraining_corpus_is_measurably_misaligned():
  docs = S.pretraining_corpus(1500, seed=0)
  scores, harmful_hits, n_harmful, kinds = [], 0, 0, collections.Counter()
  for doc in docs:
    if doc.startswith("<|"):
      kinds["chat"] += 1
      msgs = parse_chat(doc)
      pairs = [(msgs[:-1], msgs[-1]["content"])]
    elif doc.startswith("\n\nHuman:"):
      kinds["hh"] += 1
      msgs = parse_hh(doc)
      pairs = [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
    else:
      kinds["free"] += 1
      assert "<|" not in doc
      continue
    for prompt, answer in pairs:
      task = gold.resolve_task(prompt)
      assert S.task_split(task) == "train"
      scores.append(gold.score(task, answer))
      if task.harmful:
        n_harmful += 1
        harmful_hits += gold.is_harmful_response(task, answer)
  mean = float(np.mean(scores))
  # Demonstrations score 1.0; the corpus transcripts score about 0.45.
  assert 0.3 < mean < 0.6, mean
  assert np.mean(np.array(scores) < 0.5) > 0.4  # most answers are not acceptable
  assert harmful_hits / n_harmful > 0.4  # complies with harmful requests most of the time
  assert min(kinds.values()) > 200, kinds


@pytest.mark.parametrize("family", S.FAMILIES)
def test_response_styles_score_as_intended(family):
  rng = np.random.default_rng(11)
  for _ in range(30):
    task = S.sample_task(rng, family)
    styles = [n for n, _ in S.RESPONSE_STYLES["harmful" if task.harmful else "benign"]]
    got = {st: gold.score(task, S.sample_response(rng, task, st)[0]) for st in styles}
    if task.harmful:
      assert got["refusal"] == 1.0 and got["comply"] == 0.0 and got["unhelpful"] == gold.HARMLESS_OTHER
    else:
      assert got["correct"] == 1.0
      # Rambling keeps the answer (>= ~0.5 even with 14 filler words); a prefix of it stays below.
      assert got["correct"] > got["rambling"] > 0.45 > got["partial"]
      assert got["wrong"] < 0.5 and got["unhelpful"] == 0.0
  with pytest.raises(ValueError, match="style"):
    S.sample_response(rng, S.make_task("add", ["1", "2"], {}), "comply")
