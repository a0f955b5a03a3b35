"""Tests for rlhf_jax/train/ppo.py: learning a known reward, KL control, PPO-ptx and sharded equality."""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.losses.lm import lm_loss
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import ppo
from rlhf_jax.train import rollout as rollout_lib
from rlhf_jax.train import state as state_lib

V, N, TP = 32, 8, 4
PAD, EOS, X = 0, 1, 5
CFG = gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32)
POLICY = gpt.init(CFG, jax.random.PRNGKey(0))
AXES = {"policy": gpt.param_axes(CFG), "value": heads.param_axes(CFG), "ref": gpt.param_axes(CFG), "score": {}}


def _optim(lr=3e-3, weight_decay=0.0):
  return state_lib.make_optimizer(mlc.ConfigDict(dict(lr=lr, total_steps=1000, warmup_steps=0, schedule="constant",
                                                      weight_decay=weight_decay, grad_clip=1.0)))


def count_score(params, tokens, mask, response_mask):
  """+1 per occurrence of token X in the response."""
  del params, mask
  return jnp.sum((tokens == X) * response_mask, axis=1).astype(jnp.float32)


def zero_score(params, tokens, mask, response_mask):
  return jnp.zeros((tokens.shape[0],), jnp.float32)


def _ppo_cfg(**kw):
  cfg = ppo.default_config()
  cfg.update({**dict(ppo_epochs=2, num_minibatches=2, kl_target=0.0, temperature=1.0), **kw})
  return cfg


def _prompts(b, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (b, TP)).astype(np.int32)
  mask = np.ones((b, TP), np.int32)
  mask[: b // 4, :2] = 0
  return {"prompt_tokens": toks, "prompt_mask": mask}


def _ptx(b, t=12, seed=1):
  # A learnable pretraining batch: a fixed repeating pattern.
  rows = (np.arange(b)[:, None] + np.arange(t + 1)[None]) % 6 + 10
  return {"ptx_tokens": rows[:, :-1].astype(np.int32), "ptx_targets": rows[:, 1:].astype(np.int32),
          "ptx_mask": np.ones((b, t), np.int32)}


def _setup(mesh, score_fn=count_score, ppo_cfg=None, beta=0.1, ref=None, value=None, opt=None, eos_id=None):
  ppo_cfg = ppo_cfg or _ppo_cfg()
  opt = opt or _optim()
  value = value if value is not None else heads.from_lm(POLICY, CFG, jax.random.PRNGKey(1))
  roll = rollout_lib.make_rollout(CFG, CFG, CFG, score_fn, max_new_tokens=N, temperature=ppo_cfg.temperature,
                                  eos_id=eos_id, pad_id=PAD)
  state, shardings = ppo.create_rl_state(POLICY, value, POLICY if ref is None else ref, {}, opt, opt, mesh, AXES,
                                         jax.random.PRNGKey(2), beta)
  step = state_lib.jit_step(ppo.make_rl_step(roll, CFG, CFG, opt, opt, ppo_cfg), shardings, mesh)
  return state, shardings, step


def _mesh(shape=(1, 1, 1)):
  return parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_ppo_learns_a_known_reward_and_beta_controls_kl():
  """+1 per token X: chance level is N/V = 0.25; a small fixed beta must drive the score far above it,
  and a large fixed beta must stay closer to the reference (smaller KL)."""
  mesh = _mesh()
  state, _, step = _setup(mesh, beta=0.01)
  batch = parallel.put_batch(_prompts(16), mesh)
  curves = {}
  for beta in (0.01, 1.0):
    if beta != 0.01:  # same compiled step: beta is a state leaf, not a static setting
      state, _ = ppo.create_rl_state(POLICY, heads.from_lm(POLICY, CFG, jax.random.PRNGKey(1)), POLICY, {},
                                     _optim(), _optim(), mesh, AXES, jax.random.PRNGKey(2), beta)
    hist = []
    for _ in range(30):
      state, m = step(state, batch)
      hist.append(_host(m))
    curves[beta] = hist
    assert float(state["kl_beta"]) == pytest.approx(beta)  # kl_target 0: fixed beta
  score = {b: np.array([h["score"] for h in c]) for b, c in curves.items()}
  kl = {b: np.array([h["kl"] for h in c]) for b, c in curves.items()}
  print("\nscore (beta=0.01):", np.round(score[0.01], 2).tolist())
  print("score (beta=1.0): ", np.round(score[1.0], 2).tolist())
  print("kl last 10 (beta 0.01 / 1.0):", kl[0.01][-10:].mean(), kl[1.0][-10:].mean())
  chance = N / V
  assert score[0.01][:3].mean() < 2 * chance
  assert score[0.01][-5:].mean() > 3 * chance
  assert kl[1.0][-10:].mean() < 0.5 * kl[0.01][-10:].mean()
  assert kl[0.01][0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start


def test_first_minibatch_ratio_is_exactly_one():
  """One epoch, one minibatch: the learner's log-probs equal the rollout's, so nothing is clipped,
  approx_kl is 0 and the surrogate is -mean(whitened advantage) = 0."""
  mesh = _mesh()
  state, _, step = _setup(mesh, ppo_cfg=_ppo_cfg(ppo_epochs=1, num_minibatches=1))
  _, m = step(state, parallel.put_batch(_prompts(16), mesh))
  m = _host(m)
  assert m["clip_frac"] == 0.0
  assert abs(m["approx_kl"]) < 1e-10
  assert abs(m["policy_loss"]) < 1e-5
  assert m["ptx_loss"] == 0.0


def _zero_advantage_setup(mesh, ptx_coef):
  """Score 0, beta 0 and a zero value head: rewards, values, returns and advantages are all 0, so the
  PPO losses have exactly zero gradient and only the ptx term moves the policy."""
  cfg = _ppo_cfg(ppo_epochs=1, num_minibatches=1, ptx_coef=ptx_coef, whiten_advantages=False)
  value = heads.from_lm(POLICY, CFG, jax.random.PRNGKey(1), zero_head=True)
  return _setup(mesh, score_fn=zero_score, ppo_cfg=cfg, beta=0.0, value=value)


def test_ptx_step_equals_an_optimizer_step_on_the_lm_loss():
  mesh = _mesh()
  ptx_coef = 2.0
  state, _, step = _zero_advantage_setup(mesh, ptx_coef)
  ptx = _ptx(8)
  new_state, m = step(state, parallel.put_batch({**_prompts(16), **ptx}, mesh))
  m = _host(m)

  def lm(params):
    return lm_loss(gpt.logits(params, CFG, ptx["ptx_tokens"]), ptx["ptx_targets"], ptx["ptx_mask"])[0]

  loss0, grads = jax.value_and_grad(lm)(POLICY)
  opt = _optim()
  updates, _ = opt.update(jax.tree.map(lambda g: ptx_coef * g, grads), opt.init(POLICY), POLICY)
  expected = optax.apply_updates(POLICY, updates)
  assert m["ptx_loss"] == pytest.approx(float(loss0), rel=1e-5)
  assert m["policy_loss"] == 0.0 and m["advantage_std"] == 0.0
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       _host(new_state["policy"]["params"]), expected)
  assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
  assert float(lm(new_state["policy"]["params"])) < float(loss0) - 0.01


def test_ptx_off_skips_the_pretraining_batch():
  """ptx_coef = 0: no ptx keys needed, ptx_loss reported as 0, and (zero advantages, no weight decay)
  the policy does not move at all."""
  mesh = _mesh()
  state, _, step = _zero_advantage_setup(mesh, 0.0)
  before = _host(state["policy"]["params"])
  new_state, m = step(state, parallel.put_batch(_prompts(16), mesh))
  assert float(m["ptx_loss"]) == 0.0
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), _host(new_state["policy"]["params"]), before)
  assert all(jax.tree.leaves(same))


def test_ptx_keeps_the_pretraining_loss_lower_during_ppo():
  """Several PPO iterations on the known reward: with ptx_coef > 0 the LM loss on the pretraining
  batch ends lower than with plain PPO."""
  mesh = _mesh()
  ptx = _ptx(8)
  batch = parallel.put_batch({**_prompts(16), **ptx}, mesh)
  lm = jax.jit(lambda p: lm_loss(gpt.logits(p, CFG, ptx["ptx_tokens"]), ptx["ptx_targets"], ptx["ptx_mask"])[0])
  final = {}
  for coef in (0.0, 1.0):
    state, _, step = _setup(mesh, ppo_cfg=_ppo_cfg(ptx_coef=coef), beta=0.01)
    for _ in range(5):
      state, m = step(state, batch)
    final[coef] = float(lm(state["policy"]["params"]))
  start = float(lm(POLICY))
  print(f"\npretraining LM loss: start {start:.3f}, PPO {final[0.0]:.3f}, PPO-ptx {final[1.0]:.3f}")
  assert final[1.0] < final[0.0] - 0.1
  assert final[1.0] < start


def test_adaptive_kl_moves_beta_toward_the_target():
  mesh = _mesh()
  target, horizon, beta = 1e-3, 64.0, 0.5
  cfg = _ppo_cfg(ppo_epochs=1, kl_target=target, kl_horizon=horizon)
  state, _, step = _setup(mesh, ppo_cfg=cfg, beta=beta)
  batch = parallel.put_batch(_prompts(16), mesh)
  # Policy == reference: observed KL 0 < target -> error clipped to -0.2 -> beta shrinks.
  new_state, m = step(state, batch)
  assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(new_state["kl_beta"]) == pytest.approx(beta * (1 - 0.2 * 16 / horizon), rel=1e-6)
  assert float(m["kl_beta"]) == pytest.approx(beta) and float(m["kl_beta_next"]) == float(new_state["kl_beta"])
  # A reference far from the policy: KL above target -> beta grows (same compiled step).
  far_ref = gpt.init(gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32, init_std=0.5), jax.random.PRNGKey(7))
  state, _ = ppo.create_rl_state(POLICY, heads.from_lm(POLICY, CFG, jax.random.PRNGKey(1)), far_ref, {}, _optim(),
                                 _optim(), mesh, AXES, jax.random.PRNGKey(2), beta)
  new_state, m = step(state, batch)
  assert float(m["kl"]) > 10 * target
  assert float(new_state["kl_beta"]) == pytest.approx(beta * (1 + 0.2 * 16 / horizon), rel=1e-6)


@functools.lru_cache(maxsize=None)
def _sharded_step(shape):
  mesh = _mesh(shape)
  cfg = _ppo_cfg(ptx_coef=0.5, kl_target=3.0, kl_horizon=100.0)
  state, shardings, step = _setup(mesh, ppo_cfg=cfg, beta=0.2, eos_id=EOS,
                                  ref=gpt.init(CFG, jax.random.PRNGKey(3)))
  batch = parallel.put_batch({**_prompts(8), **_ptx(8)}, mesh)
  new_state, metrics = step(state, batch)
  return _host(metrics), new_state


def test_sharded_rl_step_matches_single_device():
  ref_m, ref_state = _sharded_step((1, 1, 1))
  m, state = _sharded_step((2, 2, 2))
  for k in ("score", "kl", "kl_beta_next", "response_length", "ended_frac", "policy_loss", "value_loss",
            "ptx_loss", "entropy", "approx_kl", "explained_variance", "advantage_mean", "return_mean"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-4, atol=1e-5, err_msg=k)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), _host(state["policy"]["params"]),
                       _host(ref_state["policy"]["params"]))
  assert max(jax.tree.leaves(diffs)) < 1e-4, diffs
  # Every model (and the Adam moments) follows the same logical sharding rules.
  assert state["policy"]["params"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["ref"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["value"]["params"]["gpt"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["value"]["params"]["head"]["kernel"].sharding.spec == P("fsdp")
  adam = [s for s in jax.tree.leaves(state["value"]["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert adam.mu["gpt"]["blocks"]["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert len(state["policy"]["params"]["wte"].sharding.device_set) == 8


def test_bad_inputs_raise():
  mesh = _mesh()
  state, _, step = _setup(mesh, ppo_cfg=_ppo_cfg(ptx_coef=1.0))
  with pytest.raises(ValueError, match="batch lacks 'ptx_tokens'"):
    step(state, parallel.put_batch(_prompts(16), mesh))
  state, _, step = _setup(mesh, ppo_cfg=_ppo_cfg(num_minibatches=3))
  with pytest.raises(ValueError, match="rollout batch 16 is not divisible by num_minibatches=3"):
    step(state, parallel.put_batch(_prompts(16), mesh))
  roll = rollout_lib.make_rollout(CFG, CFG, CFG, count_score, max_new_tokens=N, temperature=0.7, eos_id=None,
                                  pad_id=PAD)
  with pytest.raises(ValueError, match="differs from the rollout's 0.7"):
    ppo.make_rl_step(roll, CFG, CFG, _optim(), _optim(), _ppo_cfg())
  with pytest.raises(ValueError, match=r"lacks key\(s\) \['vf_coef'\]"):
    cfg = _ppo_cfg()
    del cfg["vf_coef"]
    ppo.make_rl_step(roll, CFG, CFG, _optim(), _optim(), cfg)
  with pytest.raises(ValueError, match=r"axes lacks param_axes for \['score'\]"):
    ppo.create_rl_state(POLICY, POLICY, POLICY, {}, _optim(), _optim(), mesh,
                        {k: v for k, v in AXES.items() if k != "score"}, jax.random.PRNGKey(0), 0.1)
