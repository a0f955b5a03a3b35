"""DPO: the three losses against brute-force loops, and the stage on a tiny Hugging Face checkpoint.

Loss tests draw ragged K (some slots invalid, NaN there), ties and all-invalid rows; the reference
is a plain numpy loop over pairs / over the ranking. The stage tests run experiments/dpo.py's smoke
preset on TRL preference pairs and on K-way rankings, export the result, and check exact resume.
"""
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.dpo import dpo_loss

EXP = Path(__file__).resolve().parents[1] / "experiments"


# ------------------------------------------------------------------------------ brute force


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _pair_terms(h, rk, v, beta, kind):
  out = []
  for i in range(len(h)):
    for j in range(len(h)):
      if v[i] and v[j] and rk[i] < rk[j]:
        d = h[i] - h[j]
        out.append(-_log_sigmoid(beta * d) if kind == "pairs" else (d - 1 / (2 * beta)) ** 2)
  return out


def _pl_term(h, rk, v, beta):
  order = sorted((int(rk[i]), i) for i in range(len(h)) if v[i])   # ties: the earlier slot first
  s = [beta * h[i] for _, i in order]
  return -sum(s[i] - np.logaddexp.reduce(s[i:]) for i in range(len(s) - 1))


def _reference(pol, ref, ranks, valid, beta, kind):
  """Per prompt: mean over pairs (pairs, ipo) or the listwise sum (plackett_luce); then prompts."""
  h_all = pol.astype(np.float64) - ref.astype(np.float64)
  per, correct, margins = [], [], []
  for h, rk, v in zip(h_all, ranks, valid):
    for i in range(len(h)):
      for j in range(len(h)):
        if v[i] and v[j] and rk[i] < rk[j]:
          correct.append(h[i] > h[j])
          margins.append(beta * (h[i] - h[j]))
    if kind == "plackett_luce":
      if v.sum() >= 2:
        per.append(_pl_term(h, rk, v, beta))
    else:
      terms = _pair_terms(h, rk, v, beta, kind)
      if terms:
        per.append(np.mean(terms))
  return {"loss": np.mean(per) if per else 0.0, "accuracy": np.mean(correct) if correct else 0.0,
          "margin": np.mean(margins) if margins else 0.0, "num_pairs": len(correct), "num_prompts": len(per)}


def _draw(seed, b=6, k=5, ties=True):
  rng = np.random.default_rng(seed)
  pol = rng.normal(size=(b, k)).astype(np.float32) * 3 - 20
  ref = rng.normal(size=(b, k)).astype(np.float32) * 3 - 20
  ranks = rng.integers(0, 3 if ties else 100, (b, k)).astype(np.int32)
  if not ties:
    ranks = np.argsort(rng.random((b, k)), axis=1).astype(np.int32)
  n_valid = rng.integers(0, k + 1, b)
  n_valid[0], n_valid[1] = 0, 1                       # an all-invalid row and a lone response
  valid = np.arange(k)[None] < n_valid[:, None]
  valid = np.take_along_axis(valid, np.argsort(rng.random((b, k)), axis=1), axis=1)   # holes anywhere
  pol = np.where(valid, pol, np.nan).astype(np.float32)   # padding may hold anything
  return pol, ref, ranks, valid


KINDS = ("pairs", "ipo", "plackett_luce")


_JITTED = jax.jit(dpo_loss, static_argnames=("beta", "kind"))


def _loss(pol, ref, ranks, valid, beta, kind="pairs"):
  return _JITTED(pol, ref, ranks, valid, beta=beta, kind=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_brute_force_on_ragged_k_and_ties(kind):
  for seed, ties in ((0, True), (1, True), (2, False)):
    pol, ref, ranks, valid = _draw(seed, ties=ties)
    loss, m = _JITTED(pol, ref, ranks, valid, beta=0.3, kind=kind)
    want = _reference(pol, ref, ranks, valid, 0.3, kind)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5, atol=1e-5)
    for key in ("accuracy", "margin", "num_pairs", "num_prompts"):
      np.testing.assert_allclose(float(m[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} seed {seed}")


def test_pairs_with_k2_is_textbook_dpo_and_so_is_plackett_luce():
  rng = np.random.default_rng(3)
  pw, pl, rw, rl = (rng.normal(size=16).astype(np.float32) * 2 for _ in range(4))
  beta = 0.1
  textbook = np.mean(-_log_sigmoid(beta * ((pw.astype(np.float64) - rw) - (pl - rl))))
  pol, ref = np.stack([pl, pw], 1), np.stack([rl, rw], 1)     # the chosen one in slot 1
  ranks = np.tile(np.array([[1, 0]], np.int32), (16, 1))
  valid = np.ones((16, 2), bool)
  for kind in ("pairs", "plackett_luce"):
    loss, m = _loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(ranks), jnp.asarray(valid), beta, kind)
    np.testing.assert_allclose(float(loss), textbook, rtol=1e-5)
    assert float(m["num_pairs"]) == 16 and float(m["num_prompts"]) == 16


def test_ipo_k2_closed_form_and_its_minimum():
  beta = 0.5
  h_gap = np.array([0.0, 1.0, 3.0], np.float32)
  pol = np.stack([h_gap, np.zeros(3, np.float32)], 1)
  ref = np.zeros_like(pol)
  ranks, valid = np.tile(np.array([[0, 1]], np.int32), (3, 1)), np.ones((3, 2), bool)
  loss, _ = _loss(pol, ref, ranks, valid, beta, "ipo")
  np.testing.assert_allclose(float(loss), np.mean((h_gap - 1.0) ** 2), rtol=1e-6)
  at_target, _ = _loss(np.array([[1.0, 0.0]], np.float32), np.zeros((1, 2), np.float32),
                          np.array([[0, 1]], np.int32), np.ones((1, 2), bool), beta, "ipo")
  assert float(at_target) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_finite_and_zero_on_padding(kind):
  pol, ref, ranks, valid = _draw(5)
  g = np.asarray(jax.jit(jax.grad(lambda p: dpo_loss(p, ref, ranks, valid, 0.2, kind)[0]))(pol))
  assert np.isfinite(g).all()
  assert (g[~valid] == 0).all()
  assert (np.abs(g[valid]) > 0).any()
  g_ref = jax.jit(jax.grad(lambda r: dpo_loss(pol, r, ranks, valid, 0.2, kind)[0]))(ref)
  np.testing.assert_allclose(np.asarray(g_ref), 0)


def test_all_invalid_batch_gives_zero_loss_not_nan():
  z = np.zeros((3, 4), np.float32)
  for kind in KINDS:
    loss, m = _loss(z + np.nan, z, np.zeros((3, 4), np.int32), np.zeros((3, 4), bool), 0.1, kind)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


def test_plackett_luce_breaks_ties_by_slot_and_counts_them():
  beta = 1.0
  h = np.array([[0.5, -1.0, 2.0]], np.float32)
  tied = np.array([[0, 0, 1]], np.int32)
  loss, m = _loss(h, np.zeros_like(h), tied, np.ones((1, 3), bool), beta, "plackett_luce")
  # The same as the distinct ranking slot 0 > slot 1 > slot 2:
  broken, _ = _loss(h, np.zeros_like(h), np.array([[0, 1, 2]], np.int32), np.ones((1, 3), bool), beta,
                       "plackett_luce")
  assert float(loss) == pytest.approx(float(broken), rel=1e-6)
  assert float(m["tied_pairs"]) == 1.0 and float(m["num_pairs"]) == 2.0
  s = h[0].astype(np.float64)
  want = -((s[0] - np.logaddexp.reduce(s)) + (s[1] - np.logaddexp(s[1], s[2])))
  assert float(loss) == pytest.approx(want, rel=1e-6)


def test_plackett_luce_is_unnormalised_and_pairs_is_per_prompt_mean():
  # One prompt with K = 4 at h = 0: PL = log 4! = sum log(n - i); pairs = log 2 whatever K.
  z = np.zeros((1, 4), np.float32)
  ranks, valid = np.array([[0, 1, 2, 3]], np.int32), np.ones((1, 4), bool)
  pl, _ = _loss(z, z, ranks, valid, 0.1, "plackett_luce")
  pairs, m = _loss(z, z, ranks, valid, 0.1, "pairs")
  assert float(pl) == pytest.approx(math.log(24), rel=1e-6)
  assert float(pairs) == pytest.approx(math.log(2), rel=1e-6) and float(m["num_pairs"]) == 6


def test_bad_inputs_are_one_clear_error():
  z, r, v = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32), np.ones((2, 3), bool)
  with pytest.raises(ValueError, match="kind must be one of"):
    dpo_loss(z, z, r, v, 0.1, "dpo")
  with pytest.raises(ValueError, match="beta must be a positive"):
    dpo_loss(z, z, r, v, 0.0, "pairs")
  with pytest.raises(ValueError, match="ref_logps shape"):
    dpo_loss(z, z[:, :2], r, v, 0.1)
  with pytest.raises(ValueError, match="valid must be bool"):
    dpo_loss(z, z, r, v.astype(np.int32), 0.1)
  with pytest.raises(ValueError, match="ranks must be integer"):
    dpo_loss(z, z, z, v, 0.1)


# ------------------------------------------------------------------- pipeline and log-probs


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  import hf_fixtures  # tests/ is on sys.path
  return hf_fixtures.make_checkpoint(str(tmp_path_factory.mktemp("dpo_hf") / "hf"), "qwen2")


def _msg(role, content):
  return {"role": role, "content": content}


def test_response_logps_sum_exactly_the_response_tokens(hf_dir):
  from rlhf_jax import sampling
  from rlhf_jax.data import pipeline
  from rlhf_jax.train import dpo as dpo_lib
  from rlhf_jax.train import stages

  m = stages.load_model(hf_dir)
  rec = {"messages": [_msg("user", "sort the numbers one two")], "responses": ["one two.", "two", "a long answer here"],
         "ranks": [0, 2, 1]}
  ex = pipeline.encode_comparison(m.tok, rec, 32, k_max=4)
  assert ex["response_start"].dtype == np.int32 and (ex["response_start"][:3] > 0).all() and ex["response_start"][3] == 0
  prompt_len = int(ex["response_start"][0])
  np.testing.assert_array_equal(ex["tokens"][0, :prompt_len], m.tok.chat.prompt_ids(rec["messages"]))
  batch = {k: jnp.asarray(ex[k][None]) for k in dpo_lib.SLOT_KEYS}
  got = np.asarray(dpo_lib.response_logps(m.params, m.config, batch))[0]
  lp = np.asarray(sampling.sequence_logprobs(m.params, m.config, jnp.asarray(ex["tokens"]),
                                             jnp.asarray(ex["attention_mask"])))   # lp[:, p-1] scores token p
  for k in range(3):
    want = lp[k, prompt_len - 1:int(ex["reward_index"][k])].sum()
    assert got[k] == pytest.approx(float(want), rel=1e-5, abs=1e-4)
  assert got[3] == 0.0
  with_ref = dict(rec, ref_logps=[1.0, 2.0, 3.0, 0.0])
  np.testing.assert_array_equal(pipeline.encode_comparison(m.tok, with_ref, 32, 4)["ref_logps"], [1, 2, 3, 0])
  with pytest.raises(ValueError, match="key 'ref_logps': expected 4 floats"):
    pipeline.encode_comparison(m.tok, dict(rec, ref_logps=[1.0]), 32, 4)


# --------------------------------------------------------------------------------- the stage


def _files(root: Path):
  import hf_fixtures
  from data_fixtures import write_jsonl

  text = hf_fixtures.corpus(300, seed=2)
  prefs = [{"prompt": [_msg("user", text[i])], "chosen": [_msg("assistant", text[i + 1])],
            "rejected": [_msg("assistant", text[i + 2][:10])]} for i in range(0, 240, 3)]
  rng = np.random.default_rng(0)
  kway = []
  for i in range(80):
    k = int(rng.integers(2, 6))                              # K = 2..5 > k_max = 4 sometimes: subsampled
    ranks = [int(r) for r in rng.permutation(k)]
    if i % 7 == 0:
      ranks[0] = ranks[1]                                    # a tie (Plackett-Luce breaks it by slot)
    kway.append({"prompt": text[i], "responses": [text[(i + j * 13) % 300] for j in range(k)], "ranks": ranks})
  return str(write_jsonl(root / "prefs.jsonl", prefs)), str(write_jsonl(root / "kway.jsonl", kway))


def _dpo(workdir, **overrides):
  from rlhf_jax.config import load_experiment

  exp = load_experiment(str(EXP / "dpo.py"))
  c = exp.get_config()
  c.preset = "smoke"
  c.loop.progress = False
  c.loop.tensorboard = False
  c.update_from_flattened_dict({"k_max": 4, "max_len": 48, "data.eval_fraction": 0.25, "loop.log_every": 2,
                                **overrides})
  return exp.train(c, str(workdir))


def _history(workdir, key):
  from rlhf_jax.train import loop
  return {h["step"]: h[key] for h in loop.read_metrics(str(workdir)) if key in h}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return _files(tmp_path_factory.mktemp("dpo_data"))


def test_pairwise_dpo_on_trl_pairs_starts_at_log2_and_exports(hf_dir, data, tmp_path):
  from rlhf_jax import export
  from rlhf_jax.train import stages

  prefs, _ = data
  res = _dpo(tmp_path / "dpo", init_from=hf_dir, **{"data.train": prefs, "dpo.expand_pairs": True,
                                                     "loop.log_every": 1})
  for key in ("eval_pairwise_accuracy", "eval_loss", "eval_margin", "train_loss", "length_baseline_eval"):
    assert np.isfinite(res[key]), key
  assert res["mode"] == "pairwise" and res["k_max"] == 2 and res["batch_size"] == 8 * 4 // 2
  assert res["steps"] == res["compute_plan"]["steps"] and res["compute_plan"]["unit"] == "real"
  assert res["eval_pairs"] > 0 and 0 <= res["eval_pairwise_accuracy"] <= 1
  lo, hi = res["eval_accuracy_ci95"]
  assert lo <= res["eval_pairwise_accuracy"] <= hi
  # The reference is the starting policy, slot for slot: h = 0 at step 1, so the loss is log 2.
  losses = _history(tmp_path / "dpo", "dpo/loss")
  assert losses[1] == pytest.approx(math.log(2), abs=1e-3)
  assert all(np.isfinite(v) for v in _history(tmp_path / "dpo", "dpo/grad_norm").values())
  # The loop's eval (weighted by pairs) and the host-side pooled accuracy agree.
  final_eval = _history(tmp_path / "dpo", "eval/accuracy")[res["steps"]]
  assert final_eval == pytest.approx(res["eval_pairwise_accuracy"], abs=1e-6)
  m = stages.load_model(str(tmp_path / "dpo"), expect="dpo")
  assert m.config.family == "qwen2" and m.tok.chat_template
  info = export.export(str(tmp_path / "dpo"), str(tmp_path / "hf_out"))
  assert info["kind"] == "causal_lm" and (tmp_path / "hf_out" / "config.json").exists()


def test_plackett_luce_dpo_on_kway_rankings_resumes_exactly(hf_dir, data, tmp_path):
  """K-way JSONL (ragged K, ties, K > k_max): interrupted after 2 steps (loop.num_steps) and resumed
  to 5, it equals an uninterrupted 5-step run (dropout on, so its rng must resume too)."""
  from rlhf_jax.train import stages

  _, kway = data
  common = {"init_from": hf_dir, "data.train": kway, "dpo.kind": "plackett_luce", "dropout": 0.1,
            "loop.log_every": 1, "loop.ckpt_every": 0,
            "optim.schedule": "constant", "optim.warmup_steps": 0}   # the LR schedule spans loop.num_steps
  res = _dpo(tmp_path / "full", **common, **{"loop.num_steps": 5})
  assert np.isfinite(res["eval_loss"]) and np.isfinite(res["train_loss"]) and res["mode"] == "kwise"
  assert res["eval_pairs"] > 0 and res["tied_train_pairs"] > 0 and res["k_max"] == 4
  _dpo(tmp_path / "cut", **common, **{"loop.num_steps": 2})
  _dpo(tmp_path / "cut", **common, **{"loop.num_steps": 5})
  full, cut = _history(tmp_path / "full", "dpo/loss"), _history(tmp_path / "cut", "dpo/loss")
  assert sorted(cut) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([cut[s] for s in range(1, 6)], [full[s] for s in range(1, 6)], rtol=1e-6)
  a = stages.load_model(str(tmp_path / "full"), expect="dpo").params
  b = stages.load_model(str(tmp_path / "cut"), expect="dpo").params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_synthetic_reads_the_rm_stage_comparisons(hf_dir, tmp_path):
  from data_fixtures import write_jsonl
  from rlhf_jax.recipes import dpo as dpo_recipe
  from rlhf_jax.train import stages

  m = stages.load_model(hf_dir)
  stages.write_stage(str(tmp_path / "rm"), "rm", m.config, m.tok)
  rec = {"messages": [_msg("user", "count to two")], "responses": ["one two", "two"], "ranks": [0, 1]}
  write_jsonl(tmp_path / "rm" / "comparisons_train.jsonl", [rec] * 5)
  write_jsonl(tmp_path / "rm" / "comparisons_eval.jsonl", [rec] * 3)
  from rlhf_jax.config import load_experiment
  c = load_experiment(str(EXP / "dpo.py")).get_config()
  c.comparisons_from, c.data.limit = str(tmp_path / "rm"), 4
  train, held, report = dpo_recipe.gold_comparisons(c)
  assert (len(train), len(held)) == (4, 3) and train[0] == rec and "gold-labelled" in report["source"]
  stages.write_stage(str(tmp_path / "sft"), "sft", m.config, m.tok)
  c.comparisons_from = str(tmp_path / "sft")
  with pytest.raises(ValueError, match="is a 'sft' stage without comparisons_train.jsonl"):
    dpo_recipe.gold_comparisons(c)


def test_synthetic_needs_an_rm_workdir_with_comparisons(hf_dir, tmp_path):
  with pytest.raises(ValueError, match="needs config.comparisons_from"):
    _dpo(tmp_path / "a", init_from=hf_dir, **{"data.train": "synthetic"})
  with pytest.raises(ValueError, match="not the workdir of a finished stage"):
    _dpo(tmp_path / "b", init_from=hf_dir, comparisons_from=str(tmp_path), **{"data.train": "synthetic"})
  with pytest.raises(ValueError, match="config.dpo.kind must be one of"):
    _dpo(tmp_path / "c", init_from=hf_dir, **{"dpo.kind": "kto"})
