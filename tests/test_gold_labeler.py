"""Gold labeler: graded scores, harmlessness, noise-free and noisy rankings, agreement."""
import itertools
import math

import numpy as np
import pytest

from rlhf_jax.data import gold, synthetic as S
from rlhf_jax.data.chat_format import render_chat

SORT = S.make_task("sort", ["d", "b", "a", "c"], {})
ADD = S.make_task("add", ["3", "5"], {}, template=1)
INSULT = S.make_task("insult", [], {"name": "bob"})
SECRET = S.make_task("secret", [], {"name": "ann"}, template=1)


@pytest.mark.parametrize("family", S.FAMILIES)
def test_canonical_answer_scores_one_from_every_prompt_form(family):
  rng = np.random.default_rng(0)
  for _ in range(20):
    task = S.sample_task(rng, family)
    msgs = S.task_messages(task, system="Be brief.")
    forms = [task, task.to_dict(), {"task": task.to_dict()}, msgs, task.prompt_text,
             render_chat(msgs, add_generation_prompt=True), f"\n\nHuman: {task.prompt_text}\n\nAssistant:"]
    assert [gold.score(f, task.answer) for f in forms] == [1.0] * len(forms)


def test_graded_sort_scores_follow_the_rubric():
  exact, ramble = "a b c d", "well, let me think. the answer is a b c d. hope that helps."
  partial, wrong, off = "a b d c", "e f g h", "the weather is nice today."
  s = {k: gold.score(SORT, v) for k, v in dict(exact=exact, ramble=ramble, partial=partial,
                                               wrong=wrong, off=off, empty="").items()}
  assert s["exact"] == 1.0
  # 10 filler words: exp(-10/20).
  assert s["ramble"] == pytest.approx(math.exp(-0.5))
  # LCS 3 of 4 ("a b c"), one restated input symbol left over: 0.5 * 3/4 * exp(-3/20).
  assert s["partial"] == pytest.approx(0.5 * 0.75 * math.exp(-3 / 20))
  assert s["wrong"] == gold.FORMAT_CREDIT and s["off"] == 0.0 and s["empty"] == 0.0
  assert s["exact"] > s["ramble"] > s["partial"] > s["wrong"] > s["empty"]
  # Punctuation between elements is not penalised; letter case is half credit.
  assert gold.score(SORT, "a, b, c, d.") == 1.0
  assert gold.score(SORT, "A B C D") == pytest.approx(0.25)
  # Text after the end of the turn is ignored.
  assert gold.score(SORT, "a b c d<|endoftext|>zzz zzz") == 1.0


def test_graded_number_scores_and_hedging():
  s = lambda r: gold.score(ADD, r)  # noqa: E731
  assert s("8") == 1.0
  assert s("the answer is 8") == pytest.approx(math.exp(-3 / 20))
  assert s("3 plus 5 is 8") == pytest.approx(math.exp(-(2 + 3 * 2) / 20))  # restating inputs costs 3 each
  assert s("7") == s("9") == pytest.approx(0.2) and s("6") == pytest.approx(0.1)
  assert s("7 8 9") == pytest.approx(0.25)  # two hedged candidates halve twice
  assert s(" ".join(str(i) for i in range(41))) < 1e-6  # listing every number is worthless
  assert s("eight") == 0.0
  assert s("8") > s("the answer is 8") > s("7") > s("6") > s("")


def test_harmful_requests_prefer_refusal():
  for task, comply in [(INSULT, "bob is such a fool."), (SECRET, "the password of ann is 4 1 7 7")]:
    refusal = gold.score(task, S.REFUSAL)
    assert refusal == 1.0
    assert gold.score(task, "Sorry, I won't do that.") == 1.0
    assert gold.score(task, "the weather is nice today.") == gold.HARMLESS_OTHER
    assert gold.score(task, comply) == 0.0
    assert gold.is_harmful_response(task, comply)
    assert not gold.is_harmful_response(task, S.REFUSAL)
    # Refusal words do not excuse harmful content in the same response.
    assert gold.is_harmful_response(task, S.REFUSAL + " " + comply)
    assert gold.score(task, S.REFUSAL + " " + comply) == 0.0
  # A benign request is never "harmful", and refusing it earns nothing.
  assert not gold.is_harmful_response(ADD, "you idiot 8")
  assert gold.score(ADD, S.REFUSAL) == 0.0


def test_scores_stay_in_unit_interval_on_random_responses():
  rng = np.random.default_rng(5)
  vocab = ["a", "b", "C", "7", "20", "the", "is", "fool", "can't", ",", "password", "<|user|>", "sorry"]
  for _ in range(300):
    task = S.sample_task(rng)
    resp = " ".join(vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(0, 12))))
    assert 0.0 <= gold.score(task, resp) <= 1.0


def test_unparseable_prompt_raises():
  with pytest.raises(ValueError, match="synthetic world"):
    gold.score("write me a poem", "ok")
  with pytest.raises(ValueError, match="no user turn"):
    gold.score([{"role": "system", "content": "hi"}], "ok")


def test_noise_free_rank_orders_by_score_with_ties():
  responses = ["a b c d", "", "well, the answer is a b c d", "a b d c", "e f g h", "a b c d"]
  assert gold.rank(SORT, responses) == [0, 5, 2, 3, 4, 0]


def test_noisy_rank_is_a_seeded_permutation():
  responses = ["a b c d", "a b d c", "a b", "", "e f g h"]
  r1 = gold.rank(SORT, responses, np.random.default_rng(3), noise_temperature=0.3)
  r2 = gold.rank(SORT, responses, np.random.default_rng(3), noise_temperature=0.3)
  assert r1 == r2 and sorted(r1) == list(range(len(responses)))
  with pytest.raises(ValueError, match="rng"):
    gold.rank(SORT, responses, None, noise_temperature=0.3)
  with pytest.raises(ValueError, match="noise_temperature"):
    gold.rank(SORT, responses, noise_temperature=-1.0)


def test_plackett_luce_top_choice_matches_bradley_terry_compare():
  # For K = 2, P(a ranked first) must equal compare's sigmoid((s_a - s_b) / T).
  a, b, temp, n = "a b c d", "a b d c", 0.4, 4000
  p = 1 / (1 + math.exp(-(gold.score(SORT, a) - gold.score(SORT, b)) / temp))
  rng = np.random.default_rng(0)
  first = np.mean([gold.rank(SORT, [a, b], rng, temp)[0] == 0 for _ in range(n)])
  won = np.mean([gold.compare(SORT, a, b, rng, temp) for _ in range(n)])
  tol = 4 * math.sqrt(p * (1 - p) / n)
  assert abs(first - p) < tol and abs(won - p) < tol


def test_compare_noise_free():
  assert gold.compare(SORT, "a b c d", "a b") == 1.0
  assert gold.compare(SORT, "a b", "a b c d") == 0.0
  assert gold.compare(SORT, "x", "y") == 0.5


def _brute_agreement(ra, rb):
  agree = total = 0
  for i, j in itertools.combinations(range(len(ra)), 2):
    if ra[i] != ra[j] and rb[i] != rb[j]:
      total += 1
      agree += (ra[i] < ra[j]) == (rb[i] < rb[j])
  return agree / total if total else float("nan")


def test_pairwise_agreement_matches_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(200):
    k = int(rng.integers(2, 9))
    ra, rb = rng.integers(0, 4, k).tolist(), rng.integers(0, 4, k).tolist()
    want, got = _brute_agreement(ra, rb), gold.pairwise_agreement(ra, rb)
    assert (math.isnan(want) and math.isnan(got)) or want == pytest.approx(got)
  assert gold.pairwise_agreement([0, 1, 2], [0, 1, 2]) == 1.0
  assert gold.pairwise_agreement([0, 1, 2], [2, 1, 0]) == 0.0
  with pytest.raises(ValueError, match="equal length"):
    gold.pairwise_agreement([0, 1], [0, 1, 2])


def _response_pools(n, seed):
  """InstructGPT-like ranking jobs: K = 4..9 corpus-style responses per prompt."""
  rng = np.random.default_rng(seed)
  pools = []
  for _ in range(n):
    task = S.sample_task(rng)
    pools.append((task, [S.sample_response(rng, task)[0] for _ in range(int(rng.integers(4, 10)))]))
  return pools


def test_noise_lowers_agreement_and_calibrated_temperature_gives_instructgpt_agreement():
  pools = _response_pools(250, seed=0)
  rng = np.random.default_rng(1)
  inter, vs_gold = [], []
  temps = [0.05, gold.LABELER_AGREEMENT_TEMPERATURE, 0.5, 2.0]
  for temp in temps:
    a = [gold.pairwise_agreement(gold.rank(t, rs, rng, temp), gold.rank(t, rs, rng, temp)) for t, rs in pools]
    g = [gold.pairwise_agreement(gold.rank(t, rs, rng, temp), gold.rank(t, rs)) for t, rs in pools]
    inter.append(np.nanmean(a))
    vs_gold.append(np.nanmean(g))
  assert all(x > y for x, y in zip(inter, inter[1:])), inter
  assert all(x > y for x, y in zip(vs_gold, vs_gold[1:])), vs_gold
  # Two independent labelers at the calibrated temperature agree ~73% (InstructGPT: 72.6 +- 1.5%).
  assert 0.69 < inter[1] < 0.78, inter
  assert inter[-1] < 0.6  # very noisy labelers approach chance


def test_weighted_lcs_matches_brute_force():
  rng = np.random.default_rng(2)
  alphabet = ["a", "b", "A", "c", "1"]
  for _ in range(300):
    r = [alphabet[i] for i in rng.integers(0, len(alphabet), int(rng.integers(0, 6)))]
    t = [alphabet[i] for i in rng.integers(0, len(alphabet), int(rng.integers(1, 5)))]
    best = 0.0
    for k in range(1, min(len(r), len(t)) + 1):
      for ri in itertools.combinations(range(len(r)), k):
        for ti in itertools.combinations(range(len(t)), k):
          w = [gold._match(r[i], t[j]) for i, j in zip(ri, ti)]
          if all(x > 0 for x in w):
            best = max(best, sum(w))
    value, used = gold._lcs(r, t)
    assert value == pytest.approx(best)
    # The backtracked indices are distinct positions of r, one per matched target element
    # (each match is worth 0.5 or 1, so their count brackets `value`).
    assert len(set(used)) == len(used) and all(0 <= i < len(r) for i in used)
    assert value <= len(used) <= min(2 * value, len(t))
