"""RLOO / GRPO: group advantages and the loss against plain loops, the group rollout's layout, learning a
known reward through `rl.fit_group_rl`, and exact resume.

The fitted runs share one configuration (compiled once per `fit_group_rl` call, the slow part on CPU).
"""
import functools
import json
import math
import statistics

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.losses import policy_gradient as pg
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.model import gpt
from rlhf_jax.train import group_rl, loop, rl
from model_fixtures import init_params  # tests/ is on sys.path

V, N, TP, B, K = 32, 8, 4, 8, 4
PAD, EOS, X = 0, 1, 5
CFG = gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32)


def _policy():
  return init_params(CFG, 0)


# ----------------------------------------------------------------------------- group advantages


def _loop_advantages(scores, valid, kind, eps):
  out = np.zeros_like(scores, dtype=np.float64)
  for b in range(scores.shape[0]):
    idx = [k for k in range(scores.shape[1]) if valid[b, k]]
    if len(idx) < 2:
      continue
    vals = [float(scores[b, k]) for k in idx]
    for k in idx:
      if kind == "rloo":
        others = [float(scores[b, j]) for j in idx if j != k]
        out[b, k] = scores[b, k] - sum(others) / len(others)
      else:
        out[b, k] = (scores[b, k] - statistics.fmean(vals)) / (statistics.stdev(vals) + eps)
  return out


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_group_advantages_equal_plain_loops_on_ragged_groups(kind):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(7, 5)).astype(np.float32)
  valid = rng.random((7, 5)) < 0.7
  valid[0] = True                       # a full group
  valid[1] = [True, False, False, False, False]   # one valid sample: no baseline
  valid[2] = False                      # an empty group
  scores[3] = 0.25                      # all equal: GRPO's std is 0
  valid[3] = True
  scores[~valid] = np.nan               # padding is never read
  got = np.asarray(pg.group_advantages(jnp.asarray(scores), jnp.asarray(valid), kind, eps=1e-4))
  want = _loop_advantages(np.nan_to_num(scores), valid, kind, 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (got[~valid] == 0).all() and (got[1] == 0).all() and (got[3] == 0).all()
  if kind == "rloo":   # the leave-one-out advantages of a group sum to 0
    np.testing.assert_allclose(got[0].sum(), 0.0, atol=1e-5)


def test_group_advantages_bad_inputs_raise():
  with pytest.raises(ValueError, match="kind must be one of"):
    pg.group_advantages(jnp.zeros((2, 3)), jnp.ones((2, 3), bool), "ppo")
  with pytest.raises(ValueError, match=r"need scores and valid both \[B,K\]"):
    pg.group_advantages(jnp.zeros((2, 3)), jnp.ones((2, 4), bool), "rloo")


# ----------------------------------------------------------------------------- the loss


def _loss_inputs(seed=1, b=6, t=5):
  rng = np.random.default_rng(seed)
  lp = jnp.asarray(rng.normal(-2, 0.5, (b, t)).astype(np.float32))
  old = lp + jnp.asarray(rng.normal(0, 0.3, (b, t)).astype(np.float32))
  ref = lp + jnp.asarray(rng.normal(0, 0.5, (b, t)).astype(np.float32))
  mask = jnp.asarray((np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.int32))
  adv = jnp.asarray(rng.normal(size=b).astype(np.float32))
  return lp, old, ref, mask, adv


def test_k3_kl_equals_its_formula_and_is_nonnegative():
  lp, _, ref, mask, _ = _loss_inputs()
  got = np.asarray(pg.k3_kl(lp, ref, mask))
  d = np.asarray(ref, np.float64) - np.asarray(lp, np.float64)
  want = (np.exp(d) - d - 1) * np.asarray(mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert (got >= 0).all() and (got[np.asarray(mask) == 0] == 0).all()
  np.testing.assert_allclose(np.asarray(pg.k3_kl(lp, lp, mask)), 0.0, atol=0)


def test_policy_gradient_loss_is_ppo_surrogate_plus_k3():
  lp, old, ref, mask, adv = _loss_inputs()
  tok_adv = jnp.where(mask > 0, adv[:, None], 0.0)
  want, want_m = ppo_losses.policy_loss(lp, old, tok_adv, mask, 0.2)
  got, got_m = pg.policy_gradient_loss(lp, old, adv, mask, 0.2)          # [B] advantages, no KL
  assert float(got) == float(want) and set(got_m) == set(want_m)
  got, got_m = pg.policy_gradient_loss(lp, old, adv, mask, 0.2, ref_logprobs=ref, kl_coef=0.1)
  k3 = float(np.sum(np.asarray(pg.k3_kl(lp, ref, mask))) / np.sum(np.asarray(mask)))
  assert float(got) == pytest.approx(float(want) + 0.1 * k3, rel=1e-6)
  assert float(got_m["ref_kl_k3"]) == pytest.approx(k3, rel=1e-6)
  # The k3 term's gradient vanishes where pi == pi_ref (its minimum).
  g = jax.grad(lambda x: pg.policy_gradient_loss(x, x, jnp.zeros(6), mask, 0.2, ref_logprobs=x, kl_coef=1.0)[0])(lp)
  np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="needs ref_logprobs"):
    pg.policy_gradient_loss(lp, old, adv, mask, 0.2, kl_coef=0.1)


# ----------------------------------------------------------------------------- the group rollout


def count_score(params, tokens, mask, response_mask):
  """+1 per occurrence of token X in the response (params unused: a {} scorer)."""
  del params, mask
  return jnp.sum((tokens == X) * response_mask, axis=1).astype(jnp.float32)


def _prompts(b=B, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (b, TP)).astype(np.int32)
  mask = np.ones((b, TP), np.int32)
  mask[: b // 4, :2] = 0
  return toks, mask


@pytest.mark.parametrize("advantage,kl_mode", [("rloo", "reward"), ("grpo", "k3")])
def test_group_rollout_layout_and_advantages(advantage, kl_mode):
  ref = gpt.init(CFG, jax.random.PRNGKey(3))
  fn = group_rl.make_group_rollout(CFG, CFG, count_score, group_size=K, advantage=advantage, kl_mode=kl_mode,
                                   kl_coef=0.3, max_new_tokens=N, temperature=1.0, eos_id=EOS, pad_id=PAD)
  toks, mask = _prompts()
  e = jax.device_get(jax.jit(fn)(_policy(), ref, {}, toks, mask, jax.random.PRNGKey(4)))
  assert e["tokens"].shape == (B * K, TP + N) and e["advantages"].shape == (B * K, N)
  # Row b*K + k is sample k of prompt b; the K samples of a prompt differ.
  np.testing.assert_array_equal(e["tokens"][:, :TP], np.repeat(np.where(mask > 0, toks, PAD), K, axis=0))
  assert len({tuple(r) for r in e["response_tokens"][:K]}) > 1
  want_r = e["scores"] - (0.3 * e["kl"] if kl_mode == "reward" else 0.0)
  np.testing.assert_allclose(e["rewards"], want_r, rtol=1e-6)
  want_a = _loop_advantages(want_r.reshape(B, K), np.ones((B, K), bool), advantage, 1e-4).reshape(-1)
  np.testing.assert_allclose(e["group_advantages"], want_a, rtol=1e-4, atol=1e-5)
  m = e["response_mask"] > 0
  np.testing.assert_allclose(e["advantages"], np.where(m, want_a[:, None], 0.0), rtol=1e-4, atol=1e-5)
  assert e["stats"]["kl"] != 0


def test_group_settings_raise():
  kw = dict(group_size=K, advantage="rloo", max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="group_size must be an int >= 2"):
    group_rl.make_group_rollout(CFG, CFG, count_score, **{**kw, "group_size": 1})
  with pytest.raises(ValueError, match="kl_mode must be one of"):
    group_rl.make_group_rollout(CFG, CFG, count_score, **kw, kl_mode="value")
  with pytest.raises(ValueError, match="pad_id must differ from eos_id"):
    group_rl.make_group_rollout(CFG, CFG, count_score, **{**kw, "pad_id": EOS})
  fn = group_rl.make_group_rollout(CFG, CFG, count_score, **kw, temperature=0.7)
  with pytest.raises(ValueError, match="differs from the rollout's 0.7"):
    group_rl.make_group_step(fn, CFG, None, mlc.ConfigDict(dict(ppo_epochs=1, num_minibatches=1, clip_eps=0.2,
                                                                ptx_coef=0.0, temperature=1.0)))


# ----------------------------------------------------------------------------- fit_group_rl


class Prompts:
  """A host prompt iterator with get_state/set_state (a fresh seeded batch per position)."""

  def __init__(self):
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    toks, mask = _prompts(seed=self.i % 3)
    self.i += 1
    return {"tokens": toks, "attention_mask": mask}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])


def _config(advantage="rloo", kl_mode="reward", steps=16):
  c = mlc.ConfigDict()
  c.seed, c.batch_size = 0, B
  c.mesh = rcfg.mesh()
  c.optim = rcfg.optim(lr=3e-3, warmup_steps=0, weight_decay=0.0, schedule="constant", grad_clip=1.0)
  c.pg = group_rl.default_config()
  c.pg.update(dict(advantage=advantage, kl_mode=kl_mode, kl_coef=0.01, group_size=K, max_new_tokens=N,
                   temperature=1.0, no_eos_penalty=None))
  c.loop = rcfg.loop(num_steps=steps, log_every=1, ckpt_every=4, progress=False)
  c.loop.tensorboard = False
  return c


class Crash(Exception):
  pass


def _fit(workdir, crash_at=None, **kw):
  def hook(step, state, metrics):
    if step == crash_at:
      raise Crash()
  cfg = _config(**kw)
  return rl.fit_group_rl(cfg, str(workdir), policy_cfg=CFG, policy_params=_policy(), ref_params=_policy(),
                         score_params={}, score_cfg=None, score_fn=count_score, prompt_batches=Prompts(), eos_id=EOS,
                         pad_id=PAD, hooks=[hook], name="rloo")


@functools.lru_cache(maxsize=None)
def _full_run(tmp_root):
  state, _, _ = _fit(f"{tmp_root}/full")
  return state, {h["step"]: h for h in loop.read_metrics(f"{tmp_root}/full")}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("group_rl"))


def test_rloo_learns_a_known_reward_without_a_value_model(tmp_root):
  state, hist = _full_run(tmp_root)
  assert set(state) == {"step", "rng", "policy", "ref", "score"}       # no value model allocated
  score = np.array([hist[s]["rloo/score"] for s in sorted(hist)])
  print("\nRLOO score:", np.round(score, 2).tolist())
  chance = N / V
  assert score[:2].mean() < 2 * chance
  assert score[-4:].mean() > 3 * chance
  assert hist[1]["rloo/kl"] == pytest.approx(0.0, abs=1e-5)            # policy == reference at the start
  for key in ("policy_loss", "entropy", "clip_frac", "approx_kl", "advantage_std", "reward_group_std",
              "zero_advantage_frac"):
    assert all(math.isfinite(h[f"rloo/{key}"]) for h in hist.values()), key


def test_group_rl_resumes_exactly(tmp_root):
  _, full = _full_run(tmp_root)
  with pytest.raises(Crash):
    _fit(f"{tmp_root}/crash", crash_at=10)      # checkpoint at 8; 9-10 are lost
  _fit(f"{tmp_root}/crash")                     # resumes at 8 and replays 9..16
  resumed = {}
  with open(f"{tmp_root}/crash/metrics.jsonl") as f:
    for line in f:
      rec = json.loads(line)
      resumed[rec["step"]] = rec
  assert sorted(resumed) == list(range(1, 17))
  for s in range(9, 17):
    for key in ("rloo/score", "rloo/kl", "rloo/policy_loss", "rloo/advantage_std"):
      assert resumed[s][key] == pytest.approx(full[s][key], rel=1e-6, abs=1e-7), (s, key)


def test_grpo_step_with_the_k3_term(tmp_path):
  state, last, _ = rl.fit_group_rl(_config("grpo", "k3", steps=2), str(tmp_path), policy_cfg=CFG,
                                   policy_params=_policy(), ref_params=_policy(), score_params={}, score_cfg=None,
                                   score_fn=count_score, prompt_batches=Prompts(), eos_id=EOS, pad_id=PAD, name="grpo")
  hist = loop.read_metrics(str(tmp_path))
  # The policy starts at the reference; the k3 term (a mean over the iteration's 4 updates) then grows.
  assert 0 <= hist[0]["grpo/ref_kl_k3"] < hist[1]["grpo/ref_kl_k3"] and int(state["step"]) == 2
  assert hist[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-5)
  assert math.isfinite(last["policy_loss"])
