"""Reward models on real data: prompt-level splits, pair sets of K-wise vs pairs, compute plan, smoke runs.

Data tests skip (with the path in the message) when ../shared/data is absent.
"""
import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax import main as main_lib
from rlhf_jax.data import comparisons, pipeline
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.train import rm_data

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def need(rel: str) -> Path:
  path = DATA / rel
  if not path.exists():
    pytest.skip(f"shared data {path} is absent (expected ../shared/data beside the repo)")
  return path


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
  return rm_data.load_comparisons(["hh_rlhf/helpful-base", "hh_rlhf/helpful-online"], "test", need("hh_rlhf"),
                                  tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def oasst(tmp_path_factory):
  return rm_data.load_comparisons(["oasst_rankings/rankings"], "validation", need("oasst1_en_validation"),
                                  tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("by", rm_data.SPLIT_BY)
def test_prompt_split_is_disjoint_deterministic_and_order_free(hh, oasst, by):
  for recs in (hh, oasst):
    train, held = rm_data.split_by_prompt(recs, 0.2, "s", by)
    assert len(train) + len(held) == len(recs)
    keys_t = {rm_data.prompt_key(r, by) for r in train}
    keys_e = {rm_data.prompt_key(r, by) for r in held}
    assert not keys_t & keys_e                       # no prompt on both sides
    assert 0.12 < len(held) / len(recs) < 0.28        # ~ the requested fraction
    again_t, again_e = rm_data.split_by_prompt(list(reversed(recs)), 0.2, "s", by)
    assert {r["id"] for r in again_e} == {r["id"] for r in held}   # independent of order
    assert [r["id"] for r in train] == [r["id"] for r in rm_data.split_by_prompt(recs, 0.2, "s", by)[0]]
    other = rm_data.split_by_prompt(recs, 0.2, "t", by)[1]
    assert {r["id"] for r in other} != {r["id"] for r in held}     # the salt reshuffles


def test_split_keeps_records_of_one_prompt_together():
  msgs = lambda t: [{"role": "user", "content": t}]
  recs = [{"id": str(i), "messages": msgs(f"p{i % 7}"), "responses": ["a", "b"], "ranks": [0, 1]} for i in range(70)]
  train, held = rm_data.split_by_prompt(recs, 0.5)
  sides = collections.defaultdict(set)
  for side, part in (("t", train), ("e", held)):
    for r in part:
      sides[r["messages"][0]["content"]].add(side)
  assert all(len(s) == 1 for s in sides.values())
  with pytest.raises(ValueError, match="eval_fraction"):
    rm_data.split_by_prompt(recs, 1.0)
  with pytest.raises(ValueError, match="split_by"):
    rm_data.prompt_key(recs[0], "turns")


def test_missing_data_dir_names_the_config_key(tmp_path):
  with pytest.raises(ValueError, match=r"data.manual_dir=.*not found"):
    rm_data.resolve_data_dir(str(tmp_path / "nope"), "data.manual_dir", "hh files")
  assert rm_data.resolve_data_dir(str(tmp_path), "data.manual_dir", "x") == tmp_path.resolve()


# ---------------------------------------------------------------------- kwise vs pairs


def test_kwise_and_pairs_hold_the_same_pairs(oasst):
  pairs = comparisons.comparisons_to_pairs(oasst)
  # Brute force over every (i, j) of every record: multisets of (prompt, better, worse) agree.
  brute = collections.Counter((rm_data.prompt_key(r), r["responses"][i], r["responses"][j])
                              for r in oasst for i in range(len(r["ranks"])) for j in range(len(r["ranks"]))
                              if r["ranks"][i] < r["ranks"][j])
  assert collections.Counter(rm_data.ordered_pairs(oasst)) == brute
  assert collections.Counter(rm_data.ordered_pairs(pairs)) == brute
  assert all(len(p["responses"]) == 2 for p in pairs)
  ks = [len(r["responses"]) for r in oasst]
  assert set(ks) == {2, 3, 4, 5} and len(pairs) == sum(math.comb(k, 2) for k in ks)  # OASST ranks have no ties


def test_kwise_and_pairs_batches_encode_the_same_response_pairs(oasst):
  """Token level: the (winner, loser) response ids of K-wise examples equal the pair examples'.
  Under truncation the K-wise prompt can only be shorter (its room is set by the longest sibling)."""
  recs = oasst[:60]
  tok = tok_lib.train_bpe(rm_data.corpus_texts(recs), 600)
  max_len = 96

  def response_pairs(records, k_max):
    out = collections.Counter()
    prompt_len = {}
    for n, r in enumerate(records):
      e = pipeline.encode_comparison(tok, r, max_len, k_max, index=n)
      seqs = [e["tokens"][k, :e["reward_index"][k] + 1].tolist() for k in range(k_max)]
      for i in range(k_max):
        for j in range(k_max):
          if e["valid"][i] and e["valid"][j] and e["ranks"][i] < e["ranks"][j]:
            cut = [len(s) - s[::-1].index(tok.assistant_id) for s in (seqs[i], seqs[j])]
            key = (r["id"].split("#")[0], tuple(seqs[i][cut[0]:]), tuple(seqs[j][cut[1]:]))
            out[key] += 1
            prompt_len[key] = cut[0]
    return out, prompt_len

  kw, kw_len = response_pairs(recs, 5)
  pw, pw_len = response_pairs(comparisons.comparisons_to_pairs(recs), 2)
  assert kw == pw and sum(kw.values()) == len(rm_data.ordered_pairs(recs))
  assert all(kw_len[k] <= pw_len[k] for k in kw)


def test_equal_compute_plan_matches_brute_force_counts():
  # 12 prompts: 6 with K=2, 6 with K=4 -> 36 responses, 6*1 + 6*6 = 42 pairs.
  plan = rm_data.equal_compute_plan(12, 36, 42, kwise_epochs=2, prompts_per_batch=4, pairs_per_batch=10,
                                    k_max=4, unit="real")
  kw, pw = plan["kwise"], plan["pairs"]
  assert kw["steps"] == 6 and kw["real_passes"] == 72 and kw["padded_passes"] == 96 and kw["pair_terms"] == 84
  assert kw["pair_epochs"] == 2.0
  assert pw["steps"] == round(72 / 20) and pw["real_passes"] == 2 * pw["pair_terms"] == 80
  padded = rm_data.equal_compute_plan(12, 36, 42, 2, 4, 10, 4, unit="padded")["pairs"]
  assert padded["steps"] == round(96 / 20) and padded["padded_passes"] == 100
  with pytest.raises(ValueError, match="compare.unit"):
    rm_data.equal_compute_plan(12, 36, 42, 2, 4, 10, 4, unit="flops")


def test_length_baseline_and_describe():
  recs = [{"messages": [{"role": "user", "content": "q"}], "responses": ["long one", "s", "mid"], "ranks": [0, 2, 1]},
          {"messages": [{"role": "user", "content": "r"}], "responses": ["ab", "cd"], "ranks": [1, 0]}]
  # pairs: (long>s) 1, (long>mid) 1, (mid>s) 1, (cd vs ab equal length) 0.5
  assert rm_data.length_baseline(recs) == {"accuracy": 3.5 / 4, "num_pairs": 4}
  assert rm_data.describe(recs) == {"records": 2, "prompts": 2, "responses": 5, "pairs": 4,
                                    "k_hist": {"2": 1, "3": 1}}


def test_dialogue_documents_are_chat_encoded_without_final_eos():
  recs = [{"messages": [{"role": "user", "content": "hi"}], "responses": ["yo", "hey"], "ranks": [0, 1]}]
  tok = tok_lib.train_bpe(["hi yo hey"] * 3, 300)
  docs = rm_data.dialogue_documents(tok, recs)
  assert docs == [[tok.user_id, *tok.encode("hi"), tok.assistant_id, *tok.encode(r)] for r in ("yo", "hey")]


# --------------------------------------------------------------------------- smoke runs


def _smoke(name, tmp_path):
  exp = main_lib.load_experiment(str(REPO / "experiments" / name))
  config = exp.get_config()
  with config.unlocked():
    config.preset = "smoke"
    config.loop.progress = False
  return exp.train(config, str(tmp_path)), rcfg.apply_preset(config, exp.PRESETS)


def test_hh_smoke_runs_through_the_shared_loop(tmp_path):
  need("hh_rlhf")
  result, _ = _smoke("rm_hh_rlhf.py", tmp_path)
  acc = result["eval_pairwise_accuracy"]
  assert np.isfinite(acc) and 0.0 <= acc <= 1.0
  assert result["eval_pairs"] == result["eval_data"]["pairs"] == 32           # every held-out pair scored once
  assert result["train_data"]["records"] == 128 and result["lm_warmup"]["lm_steps"] == 2
  assert json.loads((tmp_path / "result.json").read_text())["eval_pairs"] == 32
  assert (tmp_path / "rm" / "metrics.jsonl").exists() and (tmp_path / "lm" / "metrics.jsonl").exists()


def test_oasst_smoke_compares_modes_on_the_same_eval_pairs(tmp_path):
  need("oasst1_en_validation")
  result, config = _smoke("rm_oasst_kwise.py", tmp_path)
  rep = result["repeats"][0]
  for mode in ("kwise", "pairs"):
    acc = rep[mode]["eval_pairwise_accuracy"]
    assert np.isfinite(acc) and 0.0 <= acc <= 1.0
    assert rep[mode]["eval_pairs"] == rep["eval"]["pairs"]                  # same held-out pairs for both
    assert (tmp_path / "rep0" / mode / "rm" / "metrics.jsonl").exists()
  # Equal real response passes, up to one pairs batch of rounding.
  assert abs(rep["kwise"]["real_passes"] - rep["pairs"]["real_passes"]) <= rep["pairs"]["batch_size"]
  assert rep["pairs"]["batch_size"] == config.compare.prompts_per_batch * config.compare.k_max // 2
  assert rep["train"]["pairs"] + rep["eval"]["pairs"] == len(rm_data.ordered_pairs(
      rm_data.load_comparisons(["oasst_rankings/rankings"], "validation", need("oasst1_en_validation"),
                               tmp_path / "tfds")))
