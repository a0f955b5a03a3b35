"""Tests for rlhf_jax/train/rollout.py: layout, log-prob/value alignment and rewards vs brute force."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import rollout as rollout_lib
from model_fixtures import init_params  # tests/ is on sys.path

V, N, TP, B = 32, 10, 6, 16
EOS, PAD, X = 1, 0, 7
CFG = gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32)


def _policy():
  return init_params(CFG, 0)


def _other():  # a reference that differs from the policy
  return init_params(CFG, 5)


@functools.cache
def _value():
  return heads.init(CFG, jax.random.PRNGKey(1))   # random head, so values are not all 0


TEMP = 0.8
BETA = 0.3


def count_score(params, tokens, mask, response_mask):
  """Synthetic reward: +1 per occurrence of token X in the response (plus a param offset)."""
  return jnp.sum((tokens == X) * response_mask, axis=1).astype(jnp.float32) + params["offset"]


SCORE_PARAMS = {"offset": jnp.float32(0.5)}


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (B, TP)).astype(np.int32)
  mask = np.ones((B, TP), np.int32)
  for b, n in enumerate(rng.integers(1, TP + 1, B)):
    mask[b, :TP - n] = 0
    toks[b, :TP - n] = 3   # junk under the padding; the rollout writes pad_id there
  return jnp.asarray(toks), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _rollout_fn(no_eos_penalty=-1.0, recompute=False):
  fn = rollout_lib.make_rollout(CFG, CFG, CFG, count_score, max_new_tokens=N, temperature=TEMP, eos_id=EOS,
                                pad_id=PAD, gamma=1.0, lam=0.95, no_eos_penalty=no_eos_penalty,
                                recompute_logprobs=recompute)
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _run(ref="same", no_eos_penalty=-1.0, recompute=False):
  toks, mask = _prompts()
  ref_params = _policy() if ref == "same" else _other()
  exp = _rollout_fn(no_eos_penalty, recompute)(_policy(), _value(), ref_params, SCORE_PARAMS, toks, mask,
                                               jax.random.PRNGKey(42), jnp.float32(BETA))
  return toks, mask, jax.device_get(exp)


def test_shapes_truncation_and_masks():
  toks, mask, e = _run()
  toks, mask = np.asarray(toks), np.asarray(mask)
  assert e["tokens"].shape == e["attention_mask"].shape == (B, TP + N)
  for k in ("response_mask", "response_tokens", "logprobs", "ref_logprobs", "values", "rewards", "advantages",
            "returns"):
    assert e[k].shape == (B, N), k
  for k in ("scores", "raw_scores", "kl", "lengths", "ended"):
    assert e[k].shape == (B,), k
  np.testing.assert_array_equal(e["tokens"][:, :TP], np.where(mask > 0, toks, PAD))
  np.testing.assert_array_equal(e["tokens"][:, TP:], e["response_tokens"])
  np.testing.assert_array_equal(e["attention_mask"], np.concatenate([mask, e["response_mask"]], 1))
  ended = e["ended"]
  assert ended.any() and (~ended).any(), "the fixed seed should give rows with and without EOS"
  for b in range(B):
    resp, m, length = e["response_tokens"][b], e["response_mask"][b], e["lengths"][b]
    np.testing.assert_array_equal(m, (np.arange(N) < length).astype(np.int32))   # contiguous prefix
    np.testing.assert_array_equal(resp[length:], PAD)                           # pad (not EOS) after the end
    real = resp[:length]
    if ended[b]:
      assert real[-1] == EOS and (real[:-1] != EOS).all()
    else:
      assert length == N and (real != EOS).all()
  assert e["stats"]["ended_frac"] == pytest.approx(ended.mean())
  assert e["stats"]["response_length"] == pytest.approx(e["lengths"].mean())


def test_reused_sampler_logprobs_equal_an_uncached_recompute():
  """The default reuses the sampler's log-probs (no extra policy forward); they must equal the
  learner's definition, an uncached `sequence_logprobs` over prompt + response."""
  _, _, e = _run()
  _, _, r = _run(recompute=True)
  np.testing.assert_array_equal(e["response_tokens"], r["response_tokens"])   # same samples
  m = e["response_mask"] > 0
  recomputed = np.asarray(sampling.sequence_logprobs(_policy(), CFG, jnp.asarray(e["tokens"]),
                                                     jnp.asarray(e["attention_mask"]), TEMP))[:, TP - 1:]
  np.testing.assert_array_equal(e["logprobs"], e["sampled_logprobs"])
  np.testing.assert_allclose(e["logprobs"][m], recomputed[m], atol=1e-5)
  np.testing.assert_allclose(r["logprobs"], np.where(m, recomputed, 0.0), atol=1e-6)
  np.testing.assert_allclose(e["advantages"], r["advantages"], atol=1e-4)
  assert (e["logprobs"][~m] == 0).all() and (e["ref_logprobs"][~m] == 0).all()
  assert (e["logprobs"][m] < 0).all()


def test_reference_equal_to_policy_gives_zero_kl_and_score_only_reward():
  # Policy log-probs come from the cached sampler, the reference's from an uncached forward:
  # equal up to float rounding (exactly equal with recompute_logprobs=True).
  for recompute, tol in ((False, 1e-5), (True, 1e-6)):
    _, _, e = _run(ref="same", recompute=recompute)
    np.testing.assert_allclose(e["kl"], 0.0, atol=tol)
    last = e["lengths"] - 1
    expected = np.zeros((B, N), np.float32)
    expected[np.arange(B), last] = e["scores"]
    np.testing.assert_allclose(e["rewards"], expected, atol=tol)
    assert e["stats"]["kl"] == pytest.approx(0.0, abs=tol)


def _gae_reference(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    n = int(mask[b].sum())
    nxt = 0.0
    for t in reversed(range(n)):
      v_next = values[b, t + 1] if t + 1 < n else 0.0
      nxt = rewards[b, t] + gamma * v_next - values[b, t] + gamma * lam * nxt
      adv[b, t] = nxt
  return adv, (adv + values) * mask


def test_kl_penalized_rewards_and_gae_against_brute_force():
  _, _, e = _run(ref="other")
  m = e["response_mask"].astype(np.float32)
  token_kl = (e["logprobs"] - e["ref_logprobs"]) * m
  np.testing.assert_allclose(e["kl"], token_kl.sum(1), rtol=1e-5, atol=1e-6)
  assert np.abs(e["kl"]).max() > 1e-3, "a different reference must give a nonzero KL"
  expected = -BETA * token_kl
  expected[np.arange(B), e["lengths"] - 1] += e["scores"]
  np.testing.assert_allclose(e["rewards"], expected, rtol=1e-5, atol=1e-6)
  adv, ret = _gae_reference(e["rewards"], e["values"], m, 1.0, 0.95)
  np.testing.assert_allclose(e["advantages"], adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(e["returns"], ret, rtol=1e-4, atol=1e-5)
  s = e["stats"]
  assert s["kl"] == pytest.approx(e["kl"].mean(), rel=1e-5)
  assert s["non_score_reward"] == pytest.approx(-BETA * e["kl"].mean(), rel=1e-5)
  assert s["kl_beta"] == pytest.approx(BETA)


def test_scores_and_no_eos_penalty():
  _, _, e = _run()
  direct = count_score(SCORE_PARAMS, jnp.asarray(e["tokens"]), jnp.asarray(e["attention_mask"]),
                       jnp.concatenate([jnp.zeros((B, TP), jnp.int32), jnp.asarray(e["response_mask"])], 1))
  np.testing.assert_allclose(e["raw_scores"], direct)
  np.testing.assert_allclose(e["scores"], np.where(e["ended"], e["raw_scores"], -1.0))
  assert e["stats"]["score"] == pytest.approx(e["scores"].mean())
  # Without a penalty the scorer's output is kept for every row (same samples: same rng).
  _, _, e2 = _run(no_eos_penalty=None)
  np.testing.assert_array_equal(e2["response_tokens"], e["response_tokens"])
  np.testing.assert_allclose(e2["scores"], e["raw_scores"])


def test_values_are_read_before_each_response_token():
  """values[:, t] must be V(prompt + response[:t]): computed from that prefix alone (junk after it)."""
  _, _, e = _run()
  m = e["response_mask"] > 0
  assert (e["values"][~m] == 0).all()
  values_fn = jax.jit(heads.values, static_argnums=1)
  junk = np.random.default_rng(9).integers(0, V, e["tokens"].shape)
  col = np.arange(TP + N)
  for t in (0, 1, 4, N - 1):
    # Tokens from position TP+t on (response token t onwards) are replaced by junk; causal
    # attention means the value at position TP-1+t must not change.
    tokens = np.where(col[None] < TP + t, e["tokens"], junk)
    direct = np.asarray(values_fn(_value(), CFG, jnp.asarray(tokens), jnp.asarray(e["attention_mask"])))
    rows = m[:, t]
    np.testing.assert_allclose(e["values"][rows, t], direct[rows, TP - 1 + t], rtol=1e-4, atol=1e-5)


def test_reward_model_score_fn_reads_the_eos_token():
  rm = heads.init(CFG, jax.random.PRNGKey(3))
  _, _, e = _run()
  score_fn = rollout_lib.reward_model_score_fn(CFG)
  tokens, mask = jnp.asarray(e["tokens"]), jnp.asarray(e["attention_mask"])
  got = np.asarray(score_fn(rm, tokens, mask, None))
  eos_pos = TP + e["lengths"] - 1
  want = np.asarray(heads.rewards(rm, CFG, tokens, mask, index=jnp.asarray(eos_pos)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert (e["tokens"][e["ended"], eos_pos[e["ended"]]] == EOS).all()


def test_bad_settings_raise():
  kw = dict(max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="pad_id must differ from eos_id"):
    rollout_lib.make_rollout(CFG, CFG, CFG, count_score, **{**kw, "pad_id": EOS})
  with pytest.raises(ValueError, match="no_eos_penalty=-1.0 needs an eos_id"):
    rollout_lib.make_rollout(CFG, CFG, CFG, count_score, **{**kw, "eos_id": None}, no_eos_penalty=-1.0)
  with pytest.raises(ValueError, match="share a vocabulary"):
    rollout_lib.make_rollout(CFG, gpt.preset("nano", vocab_size=V + 1), CFG, count_score, **kw)
  with pytest.raises(ValueError, match="eos_id=32 must be None or an int"):
    rollout_lib.make_rollout(CFG, CFG, CFG, count_score, **{**kw, "eos_id": V})
  bad_score = lambda p, t, m, r: jnp.zeros((t.shape[0], 2))
  fn = rollout_lib.make_rollout(CFG, CFG, CFG, bad_score, **kw)
  toks, mask = _prompts()
  with pytest.raises(ValueError, match=r"score_fn must return \[B\]=16 scores"):
    jax.eval_shape(fn, _policy(), _value(), _policy(), {}, toks, mask, jax.random.PRNGKey(0), 0.1)


def test_make_rollout_from_config_reads_the_ppo_settings():
  from rlhf_jax.train import ppo
  cfg = ppo.default_config()
  cfg.update(dict(max_new_tokens=N, temperature=0.5, lam=0.9, no_eos_penalty=-2.0))
  fn = rollout_lib.make_rollout_from_config(CFG, CFG, CFG, count_score, cfg, eos_id=EOS, pad_id=PAD)
  assert fn.spec == rollout_lib.RolloutSpec(max_new_tokens=N, temperature=0.5, top_k=0, top_p=1.0, eos_id=EOS,
                                            pad_id=PAD, gamma=1.0, lam=0.9, no_eos_penalty=-2.0)
  del cfg["lam"]
  with pytest.raises(ValueError, match=r"ppo config lacks key\(s\) \['lam'\]"):
    rollout_lib.make_rollout_from_config(CFG, CFG, CFG, count_score, cfg, eos_id=EOS, pad_id=PAD)


def test_host_text_score_fn_scores_decoded_text_inside_jit():
  """The gold labeler as a reward: prompt and response are decoded on the host and scored by gold.py."""
  from rlhf_jax.data import gold, pipeline, synthetic
  from rlhf_jax.data import tokenizer as tok_lib
  tok = tok_lib.train_bpe(synthetic.pretraining_corpus(300, seed=0), vocab_size=512)
  tasks = [synthetic.make_task("upper", ["a", "b", "c"], {}), synthetic.make_task("add", ["3", "4"], {}),
           synthetic.make_task("secret", [], {"name": "bob"})]
  answers = ["A B C", "well it is 7", "I can't help with that."]
  rows, masks, resp_masks = [], [], []
  for task, answer in zip(tasks, answers):
    p, pm = pipeline.encode_prompt_left_padded(tok, synthetic.task_messages(task, "Be brief."), 40)
    r = tok.encode(answer) + [tok.eos_id]
    r = r + [tok.pad_id] * (16 - len(r))
    rm = [1] * (len(tok.encode(answer)) + 1) + [0] * (16 - len(tok.encode(answer)) - 1)
    rows.append(np.concatenate([p, r])); masks.append(np.concatenate([pm, rm]))
    resp_masks.append(np.concatenate([np.zeros_like(pm), rm]))
  score_fn = rollout_lib.host_text_score_fn(lambda ps, rs: [gold.score(p, r) for p, r in zip(ps, rs)], tok)
  got = jax.jit(lambda t, m, r: score_fn(None, t, m, r))(*(jnp.asarray(np.stack(x), jnp.int32)
                                                            for x in (rows, masks, resp_masks)))
  want = [gold.score(task, answer) for task, answer in zip(tasks, answers)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  assert want[0] == 1.0 and want[2] == 1.0 and 0 < want[1] < 1
