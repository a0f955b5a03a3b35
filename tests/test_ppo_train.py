"""Tests for rlhf_jax/train/ppo.py: learning a known reward, KL control, PPO-ptx and sharded equality.

Compiling a whole RL step is the slow part on CPU (~10 s), so the tests share ONE configuration,
compiled once per mesh; what differs between tests is state (beta, the reference, the reward
weight, the value head) or data (a zero ptx_mask turns the pretraining term off).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel, sampling
from rlhf_jax.losses.lm import lm_loss
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import ppo
from rlhf_jax.train import rollout as rollout_lib
from rlhf_jax.train import state as state_lib
from model_fixtures import init_params  # tests/ is on sys.path

V, N, TP = 32, 8, 4
PAD, EOS, X = 0, 1, 5
B, BP, TPTX = 16, 8, 12
CFG = gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32)


def _policy():
  return init_params(CFG, 0)


AXES = {"policy": gpt.param_axes(CFG), "value": heads.param_axes(CFG), "ref": gpt.param_axes(CFG),
        "score": {"w": ()}}
OPTIM = mlc.ConfigDict(dict(lr=3e-3, total_steps=1000, warmup_steps=0, schedule="constant", weight_decay=0.0,
                            grad_clip=1.0))
OPT = state_lib.make_optimizer(OPTIM)


def count_score(params, tokens, mask, response_mask):
  """params["w"] per occurrence of token X in the response (w = 0 turns the reward off)."""
  del mask
  return params["w"] * jnp.sum((tokens == X) * response_mask, axis=1).astype(jnp.float32)


def _ppo_cfg(**kw):
  """The one configuration the compiled-step tests share: 2 epochs x 2 minibatches, PPO-ptx, adaptive KL.

  kl_horizon = 10000 (lm-human-preferences' value) moves beta by at most 0.2 * 16 / 10000 = 0.032% per
  iteration, so over a 30-iteration test beta is effectively fixed, yet the update is exact and testable.
  """
  cfg = ppo.default_config()
  cfg.update({**dict(ppo_epochs=2, num_minibatches=2, ptx_coef=0.5, kl_target=3.0, kl_horizon=10000.0,
                     temperature=1.0, no_eos_penalty=None), **kw})
  return cfg


def _mesh(shape=(1, 1, 1)):
  return parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])


def _state(mesh, beta, ref=None, value=None, w=1.0):
  value = heads.from_lm(_policy(), CFG, jax.random.PRNGKey(1)) if value is None else value
  return ppo.create_rl_state(_policy(), value, _policy() if ref is None else ref, {"w": jnp.float32(w)}, OPT, OPT, mesh,
                             AXES, jax.random.PRNGKey(2), beta)[0]


def _raw_step(**kw):
  cfg = _ppo_cfg(**kw)
  roll = rollout_lib.make_rollout(CFG, CFG, CFG, count_score, max_new_tokens=N, temperature=cfg.temperature,
                                  eos_id=EOS, pad_id=PAD)
  return ppo.make_rl_step(roll, CFG, CFG, OPT, OPT, cfg)


def _step(shape=(1, 1, 1)):
  """The jitted step on a mesh (compiled on first use, then shared by the tests)."""
  return _cached_step(tuple(shape))


@functools.lru_cache(maxsize=None)
def _cached_step(shape):
  mesh = _mesh(shape)
  _, shardings = ppo.create_rl_state(_policy(), heads.from_lm(_policy(), CFG, jax.random.PRNGKey(1)), _policy(),
                                     {"w": jnp.float32(1)}, OPT, OPT, mesh, AXES, jax.random.PRNGKey(2), 0.1)
  return mesh, state_lib.jit_step(_raw_step(), shardings, mesh)


def _prompts(b=B, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (b, TP)).astype(np.int32)
  mask = np.ones((b, TP), np.int32)
  mask[: b // 4, :2] = 0
  return {"prompt_tokens": toks, "prompt_mask": mask}


def _ptx(b=BP, identical=False):
  """A learnable pretraining batch: a repeating pattern of tokens 10..15 (rows shifted unless identical)."""
  shift = np.zeros((b, 1), int) if identical else np.arange(b)[:, None]
  rows = (shift + np.arange(TPTX + 1)[None]) % 6 + 10
  return {"ptx_tokens": rows[:, :-1].astype(np.int32), "ptx_targets": rows[:, 1:].astype(np.int32),
          "ptx_mask": np.ones((b, TPTX), np.int32)}


@jax.jit
def _lm(params, ptx):
  return lm_loss(gpt.logits(params, CFG, jnp.asarray(ptx["ptx_tokens"])), jnp.asarray(ptx["ptx_targets"]),
                 jnp.asarray(ptx["ptx_mask"]))[0]


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), _host(a), _host(b))))


# ----------------------------------------------------------------------------- learning


@functools.lru_cache(maxsize=None)
def _known_reward_runs(iters=30):
  """30 PPO iterations each for beta 0.01 and beta 1.0, and for beta 0.01 without the pretraining
  batch (its ptx_mask all 0: lm_loss is exactly 0 with zero gradient, i.e. plain PPO)."""
  mesh, step = _step()
  ptx = _ptx()
  no_ptx = {**ptx, "ptx_mask": np.zeros_like(ptx["ptx_mask"])}
  runs = {}
  for name, beta, pre in (("ptx", 0.01, ptx), ("ptx", 1.0, ptx), ("ppo", 0.01, no_ptx)):
    batch = parallel.put_batch({**_prompts(), **pre}, mesh)
    state = _state(mesh, beta)
    hist = []
    for _ in range(iters):
      state, m = step(state, batch)
      hist.append(_host(m))
    runs[(name, beta)] = {
        "score": np.array([h["score"] for h in hist]), "kl": np.array([h["kl"] for h in hist]),
        "final_beta": float(state["kl_beta"]), "final_lm": float(_lm(state["policy"]["params"], ptx)),
        "ptx_loss": np.array([h["ptx_loss"] for h in hist])}
  return runs


def test_ppo_learns_a_known_reward_and_beta_controls_kl():
  """+1 per token X: chance level is about N/V = 0.25 per response. A small beta must drive the score
  far above it; a large beta must stay closer to the reference (smaller KL)."""
  runs = _known_reward_runs()
  small, large = runs[("ppo", 0.01)], runs[("ptx", 1.0)]
  print("\nscore, beta=0.01:", np.round(small["score"], 2).tolist())
  print("score, beta=1.0: ", np.round(large["score"], 2).tolist())
  print(f"KL over the last 10 iterations: beta=0.01 {small['kl'][-10:].mean():.3f}, "
        f"beta=1.0 {large['kl'][-10:].mean():.3f}")
  chance = N / V
  assert small["score"][:2].mean() < 2 * chance
  assert small["score"][-5:].mean() > 3 * chance
  assert runs[("ptx", 0.01)]["score"][-5:].mean() > 3 * chance   # PPO-ptx learns the reward too
  assert large["kl"][-10:].mean() < 0.5 * small["kl"][-10:].mean()
  assert small["kl"][0] == pytest.approx(0.0, abs=1e-5)   # policy == reference before the first update
  # The long horizon keeps beta within ~1% over 30 iterations.
  assert small["final_beta"] == pytest.approx(0.01, rel=0.02) and large["final_beta"] == pytest.approx(1.0, rel=0.02)


def test_ptx_keeps_the_pretraining_loss_lower_during_ppo():
  """Same run with and without the pretraining batch: the LM loss on it ends far lower with PPO-ptx."""
  runs = _known_reward_runs()
  start = float(_lm(_policy(), _ptx()))
  plain, ptx = runs[("ppo", 0.01)], runs[("ptx", 0.01)]
  print(f"\npretraining LM loss: start {start:.3f}, PPO {plain['final_lm']:.3f}, PPO-ptx {ptx['final_lm']:.3f}")
  assert ptx["final_lm"] < plain["final_lm"] - 0.5
  assert ptx["final_lm"] < start - 0.5
  assert (plain["ptx_loss"] == 0).all()
  assert ptx["ptx_loss"][-1] < 0.5 * ptx["ptx_loss"][0]   # the reported ptx loss falls too


# ----------------------------------------------------------------------------- exact checks


def _zero_advantage_state(mesh):
  """Score weight 0, beta 0 and a zero value head: rewards, values, returns and advantages are all 0,
  so the PPO losses have exactly zero gradient and only the ptx term can move the policy."""
  return _state(mesh, 0.0, value=heads.from_lm(_policy(), CFG, jax.random.PRNGKey(1), zero_head=True), w=0.0)


def test_ptx_update_equals_optimizer_steps_on_the_lm_loss():
  """PPO-ptx with zero advantages = ptx_coef * LM-loss gradient steps. The ptx rows are identical, so every
  minibatch (2 epochs x 2 minibatches, whatever the permutation) is the same half-batch."""
  mesh, step = _step()
  ptx = _ptx(identical=True)
  new_state, m = step(_zero_advantage_state(mesh), parallel.put_batch({**_prompts(), **ptx}, mesh))
  m = _host(m)
  half = jax.tree.map(lambda x: x[:BP // 2], ptx)

  @jax.jit
  def reference_step(params, opt_state):  # one AdamW step on ptx_coef * LM loss
    loss, grads = jax.value_and_grad(_lm)(params, half)
    updates, opt_state = OPT.update(jax.tree.map(lambda g: 0.5 * g, grads), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = _policy(), OPT.init(_policy())
  losses = []
  for _ in range(4):
    params, opt_state, loss = reference_step(params, opt_state)
    losses.append(float(loss))
  assert m["ptx_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  assert m["policy_loss"] == 0.0 and m["advantage_std"] == 0.0 and m["return_mean"] == 0.0
  assert float(new_state["kl_beta"]) == 0.0
  # Adam turns float32 noise on (analytically) zero gradients into O(lr) steps: bound well below lr.
  assert _max_diff(new_state["policy"]["params"], params) < 1e-4
  assert float(_lm(new_state["policy"]["params"], ptx)) < float(_lm(_policy(), ptx)) - 0.05


def test_without_ptx_and_advantages_the_policy_does_not_move():
  mesh, step = _step()
  ptx = _ptx()
  new_state, m = step(_zero_advantage_state(mesh),
                      parallel.put_batch({**_prompts(), **ptx, "ptx_mask": np.zeros_like(ptx["ptx_mask"])}, mesh))
  assert float(m["ptx_loss"]) == 0.0 and float(m["policy_loss"]) == 0.0
  assert _max_diff(new_state["policy"]["params"], _policy()) == 0.0   # Adam on zero grads, no weight decay
  assert int(new_state["step"]) == 1


def test_ptx_off_needs_no_pretraining_batch():
  # Trace only: ptx_coef == 0 never reads the ptx keys.
  state = _state(_mesh(), 0.1)
  _, metrics = jax.eval_shape(_raw_step(ptx_coef=0.0), state, _prompts())
  assert metrics["ptx_loss"].shape == ()


def test_learner_logprobs_equal_the_rollout_definition():
  """On fresh rollout data (old log-probs from sampling.sequence_logprobs, as the rollout records them;
  tests/test_rollout.py ties those to the sampler) the policy loss sees ratio exactly 1: no clipping,
  approx_kl 0, and the surrogate is -mean(advantage)."""
  temp = 0.7
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(2, V, (B, TP + N)).astype(np.int32))
  lengths = rng.integers(1, N + 1, B)
  resp_mask = jnp.asarray((np.arange(N)[None] < lengths[:, None]).astype(np.int32))
  attn = jnp.concatenate([jnp.ones((B, TP), jnp.int32), resp_mask], 1)
  old = jax.jit(sampling.sequence_logprobs, static_argnums=1)(_policy(), CFG, tokens, attn, temp)[:, TP - 1:]
  adv = jnp.asarray(rng.normal(size=(B, N)).astype(np.float32)) * resp_mask
  mb = {"tokens": tokens, "attention_mask": attn, "response_mask": resp_mask, "logprobs": old, "advantages": adv}
  loss, met = jax.jit(ppo._policy_loss_fn(CFG, temp, 0.2, 0.0))(_policy(), mb, {})
  assert float(met["clip_frac"]) == 0.0
  assert float(met["approx_kl"]) < 1e-12
  assert float(loss) == pytest.approx(-float(jnp.sum(adv) / jnp.sum(resp_mask)), rel=1e-5)
  assert 0 < float(met["entropy"]) <= np.log(V) + 1e-5


# ----------------------------------------------------------------------------- adaptive KL, sharding


def test_adaptive_kl_moves_beta_toward_the_target():
  target, horizon, beta = 3.0, 10000.0, 0.5
  mesh, step = _step()
  batch = parallel.put_batch({**_prompts(), **_ptx()}, mesh)
  # Policy == reference: observed KL 0 < target -> error clipped to -0.2 -> beta shrinks.
  new_state, m = step(_state(mesh, beta), batch)
  assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(new_state["kl_beta"]) == pytest.approx(beta * (1 - 0.2 * B / horizon), rel=1e-6)
  assert float(m["kl_beta"]) == pytest.approx(beta) and float(m["kl_beta_next"]) == float(new_state["kl_beta"])
  # A peaked reference far from the (near-uniform) policy: KL above target -> beta grows.
  far = gpt.init(gpt.preset("nano", dropout=0.0, vocab_size=V, max_len=32, init_std=0.5), jax.random.PRNGKey(7))
  new_state, m = step(_state(mesh, beta, ref=far), batch)
  assert float(m["kl"]) > 1.2 * target
  assert float(new_state["kl_beta"]) == pytest.approx(beta * (1 + 0.2 * B / horizon), rel=1e-6)


def _full_step_on(shape):
  mesh, step = _step(shape)
  state = _state(mesh, 0.2, ref=gpt.init(CFG, jax.random.PRNGKey(3)))
  new_state, m = step(state, parallel.put_batch({**_prompts(), **_ptx()}, mesh))
  return new_state, _host(m)


def test_sharded_rl_step_matches_single_device():
  """One full PPO-ptx step (EOS, adaptive KL, 2 epochs x 2 minibatches) on a 2x2x2 mesh equals (1,1,1)."""
  ref_state, ref_m = _full_step_on((1, 1, 1))
  state, m = _full_step_on((2, 2, 2))
  assert ref_m["ended_frac"] > 0 and ref_m["kl"] != 0   # EOS handling and the KL term are exercised
  for k in ("score", "kl", "kl_beta_next", "response_length", "ended_frac", "policy_loss", "value_loss",
            "ptx_loss", "entropy", "approx_kl", "clip_frac", "explained_variance", "advantage_mean", "return_mean"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert _max_diff(state["policy"]["params"], ref_state["policy"]["params"]) < 1e-4
  assert _max_diff(state["value"]["params"], ref_state["value"]["params"]) < 1e-4
  # Every model (and the Adam moments) follows the same logical sharding rules.
  assert state["policy"]["params"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["ref"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["value"]["params"]["gpt"]["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["value"]["params"]["head"]["kernel"].sharding.spec == P("fsdp")
  adam = [s for s in jax.tree.leaves(state["value"]["opt_state"],
                                     is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert adam.mu["gpt"]["blocks"]["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert len(state["policy"]["params"]["wte"].sharding.device_set) == 8


def test_bad_inputs_raise():
  state = _state(_mesh(), 0.1)
  with pytest.raises(ValueError, match="batch lacks 'ptx_tokens'"):
    jax.eval_shape(_raw_step(), state, _prompts())
  with pytest.raises(ValueError, match="rollout batch 15 is not divisible by num_minibatches=2"):
    jax.eval_shape(_raw_step(ptx_coef=0.0), state, _prompts(15))
  with pytest.raises(ValueError, match="ptx batch 3 is not divisible by num_minibatches=2"):
    jax.eval_shape(_raw_step(), state, {**_prompts(), **_ptx(3)})
  roll = rollout_lib.make_rollout(CFG, CFG, CFG, count_score, max_new_tokens=N, temperature=0.7, eos_id=None,
                                  pad_id=PAD)
  with pytest.raises(ValueError, match="differs from the rollout's 0.7"):
    ppo.make_rl_step(roll, CFG, CFG, OPT, OPT, _ppo_cfg())
  cfg = _ppo_cfg(temperature=0.7)
  del cfg["vf_coef"]
  with pytest.raises(ValueError, match=r"lacks key\(s\) \['vf_coef'\]"):
    ppo.make_rl_step(roll, CFG, CFG, OPT, OPT, cfg)
  with pytest.raises(ValueError, match=r"axes lacks param_axes for \['score'\]"):
    ppo.create_rl_state(_policy(), _policy(), _policy(), {}, OPT, OPT, _mesh(),
                        {k: v for k, v in AXES.items() if k != "score"}, jax.random.PRNGKey(0), 0.1)


def test_value_warmup_freezes_the_policy_and_its_optimizer_only():
  """value_warmup_iters=2: the first two iterations change the value model but not the policy (nor its
  Adam state); the third updates the policy exactly as an unfrozen step from that state would."""
  mesh = _mesh((1, 1, 1))
  state = _state(mesh, 0.1)
  _, shardings = ppo.create_rl_state(_policy(), heads.from_lm(_policy(), CFG, jax.random.PRNGKey(1)), _policy(),
                                     {"w": jnp.float32(1)}, OPT, OPT, mesh, AXES, jax.random.PRNGKey(2), 0.1)
  warm = state_lib.jit_step(_raw_step(value_warmup_iters=2), shardings, mesh, donate=False)
  _, plain = _step()
  batch = parallel.put_batch({**_prompts(), **_ptx()}, mesh)
  s1, _ = warm(state, batch)
  s2, _ = warm(s1, batch)
  assert _max_diff(s2["policy"], state["policy"]) == 0.0          # params and optimizer state
  assert _max_diff(s2["value"]["params"], state["value"]["params"]) > 0
  s3, _ = warm(s2, batch)
  s3_plain, _ = plain(jax.tree.map(jnp.copy, s2), batch)
  assert _max_diff(s3["policy"]["params"], s2["policy"]["params"]) > 0
  assert _max_diff(s3["policy"], s3_plain["policy"]) < 1e-6
