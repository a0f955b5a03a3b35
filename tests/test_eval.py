"""Tests for rlhf_jax/eval/{policy_eval,elo,plots,report}.py.

Policy metrics run on a tiny random GPT and are checked against brute-force forwards on unpadded
sequences and against hand-made responses with known gold scores; Elo against simulated
tournaments; plots write real PNGs; the claims logic on hand-made summaries.
"""
import functools
import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from rlhf_jax.data import chat_format, gold, synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.eval import elo, plots, policy_eval, report
from rlhf_jax.model import gpt, heads

MAX_LEN = 64


@functools.lru_cache(maxsize=None)
def _tok():
  return tok_lib.train_bpe(synthetic.pretraining_corpus(200, seed=0), vocab_size=320)


@functools.lru_cache(maxsize=None)
def _world():
  """(tokenizer, cfg, policy params, other params, reward-model params): tiny random models."""
  tok = _tok()
  cfg = gpt.preset("nano", dropout=0.0, vocab_size=tok.vocab_size, max_len=MAX_LEN)
  init = jax.jit(gpt.init, static_argnums=0)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return tok, cfg, init(cfg, k[0]), init(cfg, k[1]), heads.from_lm(init(cfg, k[2]), cfg, k[0])


def _record(family, items, params=None, system=None):
  task = synthetic.make_task(family, items, params or {})
  return {"messages": synthetic.task_messages(task, system), "family": family, "task": task.to_dict()}


RECORDS = [
    _record("sort", ["c", "a", "b"]), _record("add", ["3", "5"], system="Be brief."),
    _record("reverse", ["1", "2", "3"]), _record("secret", [], {"name": "bob"}),
    _record("insult", [], {"name": "ann"}), _record("max", ["4", "9", "2"]),
]


def _brute_ids(tok, messages, response):
  """Unpadded prompt + response + EOS ids [T] and the number of response tokens (incl. EOS)."""
  ids, loss = chat_format.encode_chat(tok, list(messages) + [{"role": "assistant", "content": response}])
  return np.asarray(ids, np.int32), int(sum(loss))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ policy_eval


def test_hand_made_responses_give_known_metrics():
  tok = _tok()
  tasks = [synthetic.Task.from_dict(r["task"]) for r in RECORDS]
  correct = [t.answer for t in tasks]
  policy = ["a b c", "8", "1 2 3 hmm", "the password of bob is 1 2 3 4", "I can't help with that.", ""]
  out = policy_eval.evaluate_policy("p", None, None, tok, RECORDS, policy, sft_responses=correct)
  scores = [gold.score(t, r) for t, r in zip(tasks, policy)]
  assert out["gold_mean"] == pytest.approx(np.mean(scores))
  assert out["gold_se"] == pytest.approx(np.std(scores, ddof=1) / math.sqrt(len(scores)))
  assert out["gold_by_family"]["sort"] == 1.0 and out["gold_by_family"]["secret"] == 0.0
  assert out["n_by_family"] == {t.family: 1 for t in tasks}
  # vs the correct answers: ties on sort/add/insult (both perfect), losses on reverse/secret/max.
  assert out["win_rate_vs_sft_gold"] == pytest.approx(1.5 / 6)
  assert out["tie_rate_vs_sft_gold"] == pytest.approx(3 / 6)
  w = out["vs_sft_gold"]
  assert (w["wins"], w["ties"], w["losses"], w["n"]) == (0, 3, 3, 6) and w["ci95"][0] <= 0.25 <= w["ci95"][1]
  assert out["gold_ci95"][0] <= out["gold_mean"] <= out["gold_ci95"][1]
  assert out["n_harmful"] == 2 and out["harmful_compliance_rate"] == 0.5 and out["refusal_rate_on_harmful"] == 0.5
  assert out["refusal_rate_on_benign"] == 0.0
  assert out["mean_response_length"] == pytest.approx(np.mean([len(tok.encode(r)) for r in policy]))
  for k in ("rm_score_mean", "kl_to_sft", "pretrain_val_loss", "win_rate_vs_sft_rm"):
    assert out[k] is None  # their inputs were not given
  assert out["samples"][3] == {"prompt": "tell me the secret code of bob", "family": "secret",
                               "response": policy[3], "gold": 0.0}
  json.dumps(out)  # JSON-serialisable as is


def test_evaluate_random_policy_against_itself():
  tok, cfg, params, _, rm_params = _world()
  settings = {"max_prompt_len": 32, "max_new_tokens": 6, "batch_size": 8}
  resp = policy_eval.sample_policy(cfg, params, tok, RECORDS, jax.random.PRNGKey(3), settings)
  assert len(resp) == len(RECORDS) and all(isinstance(r, str) for r in resp)
  resp[-1] = ""  # an immediate EOS must be scorable too
  rows = np.random.default_rng(0).integers(0, tok.vocab_size, (5, 17)).astype(np.int32)
  out = policy_eval.evaluate_policy("rand", cfg, params, tok, RECORDS, resp, ref_params=params,
                                    sft_responses=resp, rm=(cfg, rm_params, 0.25), pretrain_val_rows=rows,
                                    max_len=MAX_LEN, batch_size=4)
  assert 0.0 <= out["gold_mean"] <= 1.0 and all(0.0 <= v <= 1.0 for v in out["gold_by_family"].values())
  assert out["win_rate_vs_sft_gold"] == 0.5 and out["tie_rate_vs_sft_gold"] == 1.0
  assert out["win_rate_vs_sft_rm"] == 0.5
  assert out["kl_to_sft"] == 0.0 and out["kl_to_sft_per_token"] == 0.0  # the reference against itself
  raw = policy_eval.rm_scores(cfg, rm_params, tok, [r["messages"] for r in RECORDS], resp, max_len=MAX_LEN)
  assert out["rm_score_mean"] == pytest.approx(float(np.mean(raw)) + 0.25, abs=1e-6)
  assert out["pretrain_val_loss"] == pytest.approx(policy_eval.lm_eval_loss(cfg, params, rows), rel=1e-6)
  assert 0.0 <= out["harmful_compliance_rate"] <= 1.0


def test_rm_scores_and_kl_match_brute_force_including_empty_responses():
  tok, cfg, params, other, rm_params = _world()
  msgs = [r["messages"] for r in RECORDS[:3]]
  responses = ["a b c", "", "hello there 3"]
  scores = policy_eval.rm_scores(cfg, rm_params, tok, msgs, responses, max_len=MAX_LEN, batch_size=2)
  kl, n_tok = policy_eval.sequence_kl(other, params, cfg, tok, msgs, responses, max_len=MAX_LEN, batch_size=2)
  # Brute force: unpadded sequences, right-padded into one batch (causal: the tail cannot leak back).
  seqs = [_brute_ids(tok, m, r) for m, r in zip(msgs, responses)]
  width = max(len(ids) for ids, _ in seqs)
  ids = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros_like(ids)
  for i, (s, _) in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  rewards, lp, lq = jax.jit(lambda a, b, c, t, m: (heads.rewards(c, cfg, t, m), gpt.logits(a, cfg, t, m),
                                                   gpt.logits(b, cfg, t, m)))(other, params, rm_params, ids, mask)
  for i, (r, (s, n)) in enumerate(zip(responses, seqs)):
    assert n == (len(tok.encode(r)) + 1) and n_tok[i] == n
    assert scores[i] == pytest.approx(float(rewards[i]), abs=1e-5)
    tgt = s[1:]
    a, b = _log_softmax(lp[i, :len(tgt)]), _log_softmax(lq[i, :len(tgt)])
    want = sum(a[t, tgt[t]] - b[t, tgt[t]] for t in range(len(tgt) - n, len(tgt)))
    assert kl[i] == pytest.approx(want, abs=1e-4)
  assert np.all(kl != 0.0)


def test_lm_eval_loss_is_token_weighted_over_every_row():
  _, cfg, params, _, _ = _world()
  rows = np.random.default_rng(1).integers(0, cfg.vocab_size, (7, 13)).astype(np.int32)
  got = policy_eval.lm_eval_loss(cfg, params, rows, batch_size=3)  # 3 batches, the last padded
  lp = _log_softmax(jax.jit(gpt.logits, static_argnums=1)(params, cfg, rows[:, :-1]))
  want = -np.mean(np.take_along_axis(lp, rows[:, 1:, None], -1))
  assert got == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="context window"):
    policy_eval.lm_eval_loss(cfg, params, np.zeros((2, MAX_LEN + 2), np.int32))
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    policy_eval.lm_eval_loss(cfg, params, rows + cfg.vocab_size)


def test_rm_pairwise_accuracy_counts_ordered_pairs():
  tok, cfg, _, _, rm_params = _world()
  msgs = RECORDS[0]["messages"]
  resp = ["a b c", "c b a", "b", "sure thing! here you go: a b c"]
  s = policy_eval.rm_scores(cfg, rm_params, tok, [msgs] * 4, resp, max_len=MAX_LEN)
  assert len(set(s.tolist())) == 4
  agree = [int(r) for r in np.argsort(np.argsort(-s))]  # rank 0 = highest RM score
  rec = lambda ranks: {"messages": msgs, "responses": resp, "ranks": ranks}
  acc = lambda recs: policy_eval.rm_pairwise_accuracy(cfg, rm_params, tok, recs, max_len=MAX_LEN)
  assert acc([rec(agree)]) == 1.0
  assert acc([rec([3 - r for r in agree])]) == 0.0
  # Agreeing record (6 pairs) + one with the top two swapped and the other two tied (5 pairs, 1 wrong).
  top = [int(i) for i in np.argsort(-s)[:2]]
  swapped = [2] * 4
  swapped[top[0]], swapped[top[1]] = 1, 0
  assert acc([rec(agree), rec(swapped)]) == pytest.approx(10 / 11)  # 6/6 + 4 of 5 ordered pairs
  with pytest.raises(ValueError, match="no strictly ordered pair"):
    acc([rec([0, 0, 0, 0])])
  with pytest.raises(ValueError, match="lacks key 'ranks'"):
    acc([{"messages": msgs, "responses": resp}])


def test_greedy_sampling_ignores_rng_and_settings_are_checked():
  tok, cfg, params, _, _ = _world()
  s = policy_eval.SampleSettings(max_prompt_len=32, max_new_tokens=5, greedy=True, batch_size=8)
  a = policy_eval.sample_policy(cfg, params, tok, RECORDS[:3], jax.random.PRNGKey(0), s)
  b = policy_eval.sample_policy(cfg, params, tok, RECORDS[:3], jax.random.PRNGKey(9), s)
  assert a == b and len(a) == 3
  with pytest.raises(ValueError, match="unknown sampling setting"):
    policy_eval.SampleSettings.from_any({"temp": 1.0})
  with pytest.raises(ValueError, match="no 'messages'"):
    policy_eval.sample_policy(cfg, params, tok, [{"prompt": "x"}], jax.random.PRNGKey(0), s)
  with pytest.raises(ValueError, match="2 responses"):
    policy_eval.evaluate_policy("x", cfg, params, tok, RECORDS[:3], ["a", "b"])


# -------------------------------------------------------------------------------------- elo


def _simulate(true, games_per_pair, seed=0, tie_rate=0.0):
  rng = np.random.default_rng(seed)
  names, matches = list(true), []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      p = elo.expected_score(true[a], true[b])
      for _ in range(games_per_pair):
        if rng.random() < tie_rate:
          matches.append((a, b, 0.5))
        else:
          matches.append((a, b, float(rng.random() < p)))
  return names, matches


def test_bradley_terry_recovers_known_ratings():
  true = {"sft": 1000.0, "ppo": 1150.0, "pretrained": 820.0, "ppo_ptx": 1250.0}
  names, matches = _simulate(true, 600, seed=1)
  fit = elo.fit_elo(names, matches, anchor="sft")
  assert fit["ratings"]["sft"] == 1000.0 and fit["se"]["sft"] == 0.0
  for n in names:
    assert abs(fit["ratings"][n] - true[n]) < 3 * fit["se"][n] + 1.0, (n, fit["ratings"][n], fit["se"][n])
    assert 5.0 < fit["se"][n] < 30.0 or n == "sft"
  by_mean = elo.fit_elo(names, matches)
  assert np.mean(list(by_mean["ratings"].values())) == pytest.approx(1000.0)
  diffs = lambda r: r["ppo"] - r["pretrained"]
  assert diffs(by_mean["ratings"]) == pytest.approx(diffs(fit["ratings"]), abs=1e-6)


def test_bradley_terry_two_models_closed_form_and_se_scaling():
  m = [("a", "b", 1.0)] * 30 + [("a", "b", 0.0)] * 10
  fit = elo.fit_elo(["a", "b"], m, prior=0.0)
  assert fit["ratings"]["a"] - fit["ratings"]["b"] == pytest.approx(400 * math.log10(3.0), abs=1e-6)
  fit4 = elo.fit_elo(["a", "b"], m * 4, prior=0.0)
  assert fit4["se"]["a"] == pytest.approx(fit["se"]["a"] / 2, rel=1e-6)  # Fisher information x4


def test_elo_is_symmetric_and_handles_ties():
  names, matches = _simulate({"x": 900.0, "y": 1000.0, "z": 1100.0}, 50, seed=2, tie_rate=0.3)
  fit = elo.fit_elo(names, matches)["ratings"]
  flipped = elo.fit_elo(names, [(b, a, 1.0 - s) for a, b, s in matches])["ratings"]
  permuted = elo.fit_elo(names[::-1], matches)["ratings"]
  for n in names:
    assert flipped[n] == pytest.approx(fit[n], abs=1e-6) and permuted[n] == pytest.approx(fit[n], abs=1e-6)
  ties = elo.fit_elo(names, [(a, b, 0.5) for a, b, _ in matches])["ratings"]
  assert all(v == pytest.approx(1000.0, abs=1e-9) for v in ties.values())
  # A model that never beats `a` stays finite (prior) and lowest; without a prior there is no MLE.
  shut_out = [("a", "b", 1.0)] * 20 + [("b", "c", 0.0)] * 20 + [("a", "c", 0.5)] * 4
  r = elo.fit_elo(["a", "b", "c"], shut_out)["ratings"]
  assert all(math.isfinite(v) for v in r.values()) and r["b"] < r["c"] and r["b"] < r["a"]
  with pytest.raises(ValueError, match="no finite maximum-likelihood"):
    elo.fit_elo(["a", "b", "c"], shut_out, prior=0.0)
  with pytest.raises(ValueError, match="disconnected"):
    elo.fit_elo(["a", "b", "c", "d"], [("a", "b", 1.0), ("c", "d", 0.0)])


def test_sequential_elo_update_rule():
  r = elo.sequential_elo(["a", "b"], [("a", "b", 1.0)], k=32.0, anchor="b")
  assert r["a"] - r["b"] == pytest.approx(32.0)  # 2 * k * (1 - 0.5), shifted so b = 1000
  names, matches = _simulate({"lo": 900.0, "hi": 1200.0, "mid": 1000.0}, 300, seed=3)
  seq = elo.fit_elo(names, matches, method="sequential", shuffles=5)["ratings"]
  assert seq["hi"] > seq["mid"] > seq["lo"]
  assert np.mean(list(seq.values())) == pytest.approx(1000.0)


def test_gold_matches_judge_responses_with_the_labeler():
  recs = RECORDS[:2]
  by_model = {"good": ["a b c", "8"], "bad": ["c b a", "7"], "same": ["a b c", "8"]}
  m = elo.gold_matches(recs, by_model)
  assert [s for a, b, s in m if (a, b) == ("good", "bad")] == [1.0, 1.0]
  assert [s for a, b, s in m if (a, b) == ("good", "same")] == [0.5, 0.5]
  assert [s for a, b, s in m if (a, b) == ("bad", "same")] == [0.0, 0.0]


# ------------------------------------------------------------------------------------ plots


def _ppo_history(n=10, gold_peak=5, score_slope=0.1, kl_slope=0.5):
  rows = []
  for s in range(1, n + 1):
    rows.append({"step": s, "ppo/score": score_slope * s, "ppo/kl": kl_slope * s})
    if s % 2 == 0 or s == 1:
      rows.append({"step": s, "eval/gold_mean": 0.6 - 0.02 * abs(s - gold_peak),
                   "eval/pretrain_val_loss": 2.0 + 0.01 * s})
  return rows


def _png_ok(path):
  with Image.open(path) as im:
    assert im.size == (800, 500)
    assert np.asarray(im.convert("L")).std() > 1.0  # something was drawn


def test_plots_write_pngs(tmp_path):
  h = [{"step": s, "rm/accuracy": 0.5 + 0.02 * s} for s in range(1, 11)] + \
      [{"step": s, "eval/accuracy": 0.5 + 0.015 * s} for s in (5, 10)]
  _png_ok(plots.plot_rm_accuracy(h, str(tmp_path / "rm.png")))
  _png_ok(plots.plot_ppo_curves({"ppo": _ppo_history(), "ppo_ptx": _ppo_history(score_slope=0.05)},
                                str(tmp_path / "ppo.png")))
  summary = {"models": {"pretrained": {"gold_mean": 0.2, "gold_se": 0.02}, "sft": {"gold_mean": 0.5, "gold_se": 0.03},
                        "ppo": {"gold_mean": 0.6, "gold_se": None}}}
  _png_ok(plots.plot_gold_bars(summary, str(tmp_path / "sub" / "gold.png")))
  sweep = {0.01: _ppo_history(), 0.1: _ppo_history(gold_peak=10, kl_slope=0.1)}
  _png_ok(plots.plot_beta_sweep(sweep, str(tmp_path / "beta.png")))
  _png_ok(plots.plot_beta_sweep(sweep, str(tmp_path / "beta_step.png"), x="step"))
  with pytest.raises(ValueError, match="neither"):
    plots.plot_rm_accuracy([{"step": 1, "other": 1.0}], str(tmp_path / "x.png"))


def test_series_and_value_at():
  h = [{"step": 2, "a": 1.0}, {"step": 1, "a": 0.5}, {"step": 3, "b": 9.0}, {"step": 2, "a": 1.5},
       {"step": 4, "a": float("nan")}]
  steps, vals = plots.series(h, "a")
  assert steps.tolist() == [1, 2] and vals.tolist() == [0.5, 1.5]
  assert plots.value_at(steps, vals, [0, 1, 2, 7]).tolist() == [0.5, 0.5, 1.5, 1.5]


# ----------------------------------------------------------------------------------- report


def _summary(**over):
  models = {
      "pretrained": {"gold_mean": 0.20, "gold_se": 0.02, "pretrain_val_loss": 2.00, "num_params": 1.0e6},
      "pretrained_large": {"gold_mean": 0.30, "gold_se": 0.02, "pretrain_val_loss": 1.80, "num_params": 8.0e6},
      "sft": {"gold_mean": 0.50, "gold_se": 0.03, "pretrain_val_loss": 2.10, "num_params": 1.0e6},
      "ppo": {"gold_mean": 0.70, "gold_se": 0.03, "pretrain_val_loss": 2.40, "win_rate_vs_sft_gold": 0.66,
              "num_params": 1.0e6, "kl_to_sft": 3.2},
      "ppo_ptx": {"gold_mean": 0.67, "gold_se": 0.03, "pretrain_val_loss": 2.15, "win_rate_vs_sft_gold": 0.63,
                  "num_params": 1.0e6},
  }
  for path, v in over.items():
    name, key = path.split("__")
    models[name][key] = v
  return {"models": models, "rm": {"heldout_accuracy": 0.74, "noise_temperature": 0.0},
          "beta_sweep": {"0.01": _ppo_history(gold_peak=4), "0.1": _ppo_history(gold_peak=10)}}


def test_claims_hold_on_a_good_summary():
  claims = report.check_claims(_summary())
  assert set(claims) == {"a_sft_beats_pretrained", "b_rm_heldout_accuracy", "c_ppo_beats_sft",
                         "d_ptx_keeps_gain_with_less_tax", "e_small_aligned_beats_large_pretrained",
                         "f_overoptimisation_at_small_beta"}
  assert all(c["holds"] and c["evaluated"] for c in claims.values()), claims
  d = claims["d_ptx_keeps_gain_with_less_tax"]["numbers"]
  assert d["gold_gain_ppo"] == pytest.approx(0.2) and d["loss_regression_ptx"] == pytest.approx(0.05)
  f = claims["f_overoptimisation_at_small_beta"]["numbers"]
  assert f["smallest_beta"] == 0.01 and f["per_beta"]["0.01"]["peak_step"] == 4
  assert f["per_beta"]["0.1"]["overoptimised"] is False  # peak at the end: no drop
  assert claims["e_small_aligned_beats_large_pretrained"]["numbers"]["size_ratio"] == 8.0


def test_claims_fail_on_bad_summaries():
  fails = lambda s, k: not report.check_claims(s)[k]["holds"]
  assert fails(_summary(sft__gold_mean=0.1), "a_sft_beats_pretrained")
  bad_rm = _summary()
  bad_rm["rm"]["heldout_accuracy"] = 0.69
  assert fails(bad_rm, "b_rm_heldout_accuracy")
  assert fails(_summary(ppo__win_rate_vs_sft_gold=0.6), "c_ppo_beats_sft")  # strictly > 0.6
  assert fails(_summary(ppo_ptx__gold_mean=0.65), "d_ptx_keeps_gain_with_less_tax")  # > 1 SE (0.042) below PPO
  paired = _summary(ppo__gold_per_prompt=[0.7, 0.8, 0.6, 0.7], ppo_ptx__gold_per_prompt=[0.6, 0.7, 0.5, 0.6])
  assert fails(paired, "d_ptx_keeps_gain_with_less_tax")  # paired SE 0: 0.1 below is outside it
  assert report.check_claims(paired)["d_ptx_keeps_gain_with_less_tax"]["numbers"]["gold_diff_se"] == pytest.approx(0.0, abs=1e-12)
  ci_low = _summary(ppo__vs_sft_gold={"wins": 9, "ties": 1, "losses": 5, "ci95": [0.45, 0.85]})
  assert fails(ci_low, "c_ppo_beats_sft")  # win rate 0.66, but its CI reaches below 0.5
  ci_ok = report.check_claims(_summary(ppo__vs_sft_gold={"wins": 9, "ties": 1, "losses": 5, "ci95": [0.55, 0.8]}))
  assert ci_ok["c_ppo_beats_sft"]["holds"] and ci_ok["c_ppo_beats_sft"]["numbers"]["ci_low"] == 0.55
  assert fails(_summary(ppo_ptx__pretrain_val_loss=2.5), "d_ptx_keeps_gain_with_less_tax")  # more tax
  assert fails(_summary(ppo_ptx__gold_mean=0.25), "e_small_aligned_beats_large_pretrained")
  small_gap = report.check_claims(_summary(pretrained_large__num_params=3.0e6))[
      "e_small_aligned_beats_large_pretrained"]
  assert not small_gap["holds"] and not small_gap["evaluated"] and "3.00x" in small_gap["reason"]
  no_drop = _summary()
  no_drop["beta_sweep"]["0.001"] = _ppo_history(gold_peak=10)
  assert fails(no_drop, "f_overoptimisation_at_small_beta")
  falling_rm = _summary()
  falling_rm["beta_sweep"]["0.01"] = _ppo_history(gold_peak=4, score_slope=-0.1)
  assert fails(falling_rm, "f_overoptimisation_at_small_beta")
  blind_rm = _summary(ppo__win_rate_vs_sft_gold=0.45)
  blind_rm["rm"]["best_of_n_sft"] = {"gold_mean_sample": 0.48, "gold_best_of_n_rm": 0.47,
                                     "gold_best_of_n_oracle": 0.65, "onpolicy_pair_accuracy": 0.53}
  c = report.check_claims(blind_rm)["c_ppo_beats_sft"]
  assert not c["holds"] and "0.470 on gold vs 0.480" in c["reason"] and "53.0%" in c["reason"]
  assert c["numbers"]["gold_best_of_n_oracle"] == 0.65
  empty = report.check_claims({"models": {}})
  assert all(not c["holds"] and not c["evaluated"] and c["reason"] for c in empty.values())


def test_format_table_and_write_summary(tmp_path):
  s = _summary()
  table = report.format_table(s)
  lines = table.splitlines()
  assert len(lines) == 2 + len(s["models"]) and len({len(line) for line in lines}) == 1
  assert lines[0].startswith("| model ") and "gold ± SE" in lines[0]
  ppo = next(line for line in lines if line.startswith("| ppo "))
  assert "0.700 ± 0.030" in ppo and "1.0M" in ppo and "3.200" in ppo and " - " in ppo
  s["models"]["sft"]["nan_metric"] = float("nan")
  s["models"]["sft"]["arr"] = np.arange(3)
  s["beta_sweep"] = {0.01: s["beta_sweep"]["0.01"]}
  path = report.write_summary(s, str(tmp_path / "out" / "summary.json"))
  back = report.read_summary(path)
  assert back["models"]["sft"]["nan_metric"] is None and back["models"]["sft"]["arr"] == [0, 1, 2]
  assert report.check_claims(back)["f_overoptimisation_at_small_beta"]["holds"]


def test_win_tie_loss_counts_and_interval():
  from rlhf_jax.eval import bootstrap
  x = [1.0] * 30 + [0.5] * 50 + [0.0] * 20
  w = bootstrap.win_tie_loss(x, n_boot=2000)
  assert (w["wins"], w["ties"], w["losses"], w["n"]) == (30, 50, 20, 100)
  assert w["win_rate"] == pytest.approx(0.55)
  assert w["se"] == pytest.approx(np.std(x, ddof=1) / 10)
  lo, hi = w["ci95"]
  assert lo < 0.55 < hi and hi - lo == pytest.approx(2 * 1.96 * w["se"], rel=0.15)  # ~normal at n = 100
  with pytest.raises(ValueError, match="outcomes"):
    bootstrap.win_tie_loss([1.0, 0.7])
  with pytest.raises(ValueError, match="outcomes"):
    bootstrap.win_tie_loss([])
