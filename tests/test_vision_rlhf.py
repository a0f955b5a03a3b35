"""RLHF on image prompts (issue 15): the image prefix through the scalar heads, the sampler and
the rollout; the K-wise RM loss with images; the pipeline's image comparisons and prompts (exact
resume); gold ranking with the image checker; and the PPO step with a frozen, shared encoder."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import parallel, sampling
from rlhf_jax.data import comparisons, image_world as iw, pipeline
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.losses.ranking import kwise_ranking_loss
from rlhf_jax.model import gpt, heads, vit, vlm
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.recipes import vision_rlhf
from rlhf_jax.train import ppo, rollout, state as state_lib, steps

TOK = tok_lib.train_bpe(iw.text_corpus(300), 360)
CFG = vlm.VLMConfig(vit.ViTConfig(d_model=16, n_layer=1, n_head=2, mlp_ratio=2),
                    GPTConfig(vocab_size=TOK.vocab_size, max_len=16 + 52, n_layer=1, n_head=2, d_model=16,
                              dropout=0.0))
P = CFG.num_image_tokens


@functools.lru_cache(maxsize=None)
def _params():
  return vlm.init(CFG, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _rm():
  return heads.from_lm(_params()["gpt"], CFG.gpt, jax.random.PRNGKey(1))


def _images(n, seed=1):
  return iw.stack_images([iw.sample_at(seed, i)["image"] for i in range(n)])


_image_tokens = jax.jit(vlm.image_tokens, static_argnums=(1,))
# Jitted once per shape (op-by-op dispatch of these tiny models is slower than compiling them).
_rewards = jax.jit(lambda p, t, m, i, pre: heads.rewards(p, CFG.gpt, t, m, i, prefix_embeds=pre))
_values = jax.jit(lambda p, t, m, pre: heads.values(p, CFG.gpt, t, m, prefix_embeds=pre))


def _prefix(images):
  return _image_tokens(_params(), CFG, images)


def _rows(b, t, seed=0, left=(), right=()):
  """Random tokens [b,t] with mask: rows in `left` have 3 left pads, rows in `right` 4 right pads."""
  tokens = np.random.default_rng(seed).integers(3, TOK.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  for r in left:
    mask[r, :3] = 0
  for r in right:
    mask[r, -4:] = 0
  return tokens, mask


def test_scalar_heads_read_the_image_prefix_and_ignore_padding():
  images = _images(3)
  tokens, mask = _rows(3, 10, left=(1,), right=(2,))
  prefix = _prefix(images)
  hidden = gpt.hidden_states(_params()["gpt"], CFG.gpt, tokens, mask, prefix_embeds=prefix)
  full, _ = gpt.forward(_params()["gpt"], CFG.gpt, tokens, vlm.full_mask(CFG, mask), prefix_embeds=prefix)
  np.testing.assert_array_equal(np.asarray(hidden), np.asarray(full[:, P:]))   # token-aligned: prefix dropped
  r = _rewards(_rm(), tokens, mask, None, prefix)
  v = _values(_rm(), tokens, mask, prefix)
  for row, keep in ((0, slice(0, 10)), (1, slice(3, 10)), (2, slice(0, 6))):   # each row alone, unpadded
    ones = np.ones((1, keep.stop - keep.start), np.int32)
    one = _rewards(_rm(), tokens[row:row + 1, keep], ones, None, prefix[row:row + 1])
    np.testing.assert_allclose(float(r[row]), float(one[0]), atol=1e-5)
    vals = _values(_rm(), tokens[row:row + 1, keep], ones, prefix[row:row + 1])
    np.testing.assert_allclose(np.asarray(v[row, keep]), np.asarray(vals[0]), atol=1e-5)
  other = _rewards(_rm(), tokens, mask, None, _prefix(_images(3, seed=2)))
  assert float(jnp.max(jnp.abs(other - r))) > 1e-4   # the reward depends on the image
  with pytest.raises(ValueError, match="prefix_embeds"):
    sampling.sequence_logprobs(_params()["gpt"], CFG.gpt, tokens, mask, prefix_embeds=prefix[:, :, :8])


def test_sampler_with_prefix_is_vlm_generate_and_its_logprobs_are_exact():
  images = _images(2)
  prompt, pmask = _rows(2, 6, seed=3, left=(0,))
  kw = dict(max_new_tokens=7, temperature=0.7, eos_id=None, pad_id=TOK.pad_id)
  a = sampling.generate(_params()["gpt"], CFG.gpt, prompt, pmask, jax.random.PRNGKey(4),
                        prefix_embeds=_prefix(images), **kw)
  b = vlm.generate(_params(), CFG, images, prompt, pmask, jax.random.PRNGKey(4), **kw)
  np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
  seq = np.concatenate([prompt, np.asarray(a["tokens"])], 1)
  smask = np.concatenate([pmask, np.asarray(a["mask"])], 1)
  lp = sampling.sequence_logprobs(_params()["gpt"], CFG.gpt, seq, smask, 0.7, prefix_embeds=_prefix(images))
  np.testing.assert_allclose(np.asarray(a["logprobs"]), np.asarray(lp[:, 5:]), atol=1e-5)
  with pytest.raises(ValueError, match="exceed max_len"):
    sampling.generate(_params()["gpt"], CFG.gpt, prompt, pmask, jax.random.PRNGKey(4),
                      prefix_embeds=_prefix(images), **{**kw, "max_new_tokens": 48})


def _rollout(recompute: bool):
  return rollout.make_rollout(CFG.gpt, CFG.gpt, CFG.gpt, rollout.reward_model_score_fn(CFG.gpt), max_new_tokens=6,
                              temperature=0.7, eos_id=TOK.eos_id, pad_id=TOK.pad_id, no_eos_penalty=-1.0,
                              recompute_logprobs=recompute)


def test_rollout_with_image_prompts_scores_and_values_with_the_prefix():
  images = _images(4)
  prompt, pmask = _rows(4, 6, seed=5, left=(1, 3))
  prefix = _prefix(images)
  args = (_params()["gpt"], _rm(), _params()["gpt"], _rm(), prompt, pmask, jax.random.PRNGKey(6), 0.1)
  exp = jax.jit(_rollout(False))(*args, prefix_embeds=prefix)
  again = jax.jit(_rollout(True))(*args, prefix_embeds=prefix)
  np.testing.assert_array_equal(np.asarray(exp["tokens"]), np.asarray(again["tokens"]))
  # the sampler's log-probs are the uncached recompute's (the first PPO ratio is 1 to float rounding)
  np.testing.assert_allclose(np.asarray(exp["logprobs"]), np.asarray(again["logprobs"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(exp["kl"]), 0.0, atol=1e-4)   # policy == reference
  # the RM score of each rollout row is heads.rewards of that row with its image
  raw = _rewards(_rm(), exp["tokens"], exp["attention_mask"], None, prefix)
  np.testing.assert_allclose(np.asarray(exp["raw_scores"]), np.asarray(raw), atol=1e-6)
  vals = _values(_rm(), exp["tokens"], exp["attention_mask"], prefix)[:, 5:-1]
  np.testing.assert_allclose(np.asarray(exp["values"]), np.asarray(jnp.where(exp["response_mask"] > 0, vals, 0)),
                             atol=1e-6)
  blank = jax.jit(_rollout(False))(*args, prefix_embeds=_prefix(np.zeros_like(images)))
  assert not np.array_equal(np.asarray(blank["raw_scores"]), np.asarray(exp["raw_scores"]))


def _records(n=12, seed=4):
  samples = [iw.sample_at(seed, i) for i in range(n)]
  answers = [[s["answer"], "maybe " + s["answer"] + " or so", "banana", "7"] for s in samples]
  return samples, comparisons.label_comparisons([iw.prompt_record(s) for s in samples], answers, None,
                                                scorer=iw.score)


def test_gold_ranking_with_the_image_checker_and_image_comparison_batches_resume():
  samples, recs = _records()
  for rec in recs:
    s = [iw.score(rec["task"], r) for r in rec["responses"]]
    for i in range(len(s)):
      for j in range(len(s)):
        assert (rec["ranks"][i] < rec["ranks"][j]) == (s[i] > s[j])   # dense ranks of the gold score
  assert recs[0]["ranks"][0] == 0 and recs.stats.seen == len(samples)
  it = pipeline.comparison_batches(recs, TOK, 4, 52, 4, seed=0, extra=iw.record_image)
  b = next(it)
  assert b["images"].shape == (4, 32, 32, 3) and b["tokens"].shape == (4, 4, 52)
  for row in range(4):   # each element's image is its own task's drawing
    prompt = TOK.decode(b["tokens"][row, 0][:b["response_start"][row, 0]].tolist(), skip_special=False)
    match = [rec for rec in recs if rec["task"]["question"] in prompt
             and np.array_equal(iw.record_image(rec)["images"], b["images"][row])]
    assert match
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  it.set_state(state)
  for x, y in zip(after, [next(it) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  ev = pipeline.comparison_eval_batches(recs, TOK, 5, 52, 4, extra=iw.record_image)
  assert sum(int(e["valid"].any(1).sum()) for e in ev) == len(recs)
  prompts = pipeline.prompt_batches([iw.prompt_record(s) for s in samples], TOK, 4, 44, seed=0,
                                    extra=iw.record_image)
  pb = next(prompts)
  for row in range(4):
    np.testing.assert_array_equal(pb["images"][row], iw.to_float(samples[int(pb["index"][row])]["image"]))
    assert pb["attention_mask"][row, -1] == 1


def test_kwise_rm_loss_with_images_is_the_per_row_brute_force():
  _, recs = _records()
  b = next(pipeline.comparison_batches(recs, TOK, 4, 52, 4, seed=1, extra=iw.record_image))
  loss_fn = steps.kwise_rm_loss_fn(CFG.gpt, lambda im: vlm.image_tokens(_params(), CFG, im))
  loss, metrics = jax.jit(loss_fn)(_rm(), b, None)
  r = np.zeros((4, 4), np.float32)
  for i in range(4):
    for k in range(4):
      one = _rewards(_rm(), b["tokens"][i, k:k + 1], b["attention_mask"][i, k:k + 1], b["reward_index"][i, k:k + 1],
                     _prefix(b["images"][i:i + 1]))
      r[i, k] = float(one[0])
  ref, ref_m = kwise_ranking_loss(jnp.asarray(r), b["ranks"], b["valid"])
  np.testing.assert_allclose(float(loss), float(ref), atol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), float(ref_m["accuracy"]), atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, b, None)[0]))(_rm())
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0


def test_ppo_step_on_image_prompts_keeps_the_shared_encoder_frozen():
  mesh = parallel.make_mesh({"data": -1})
  cfg = ppo.default_config()
  cfg.update(dict(max_new_tokens=6, temperature=0.7, init_kl_beta=0.1, kl_target=0.0, ppo_epochs=2,
                  num_minibatches=2))
  opt = optax.adam(1e-3)
  vision = vision_rlhf.vision_params(_params())
  full = vlm.param_axes(CFG)
  axes = {"policy": gpt.param_axes(CFG.gpt), "ref": gpt.param_axes(CFG.gpt), "value": heads.param_axes(CFG.gpt),
          "score": heads.param_axes(CFG.gpt), "vision": {k: full[k] for k in ("vit", "projector")}}
  state, shardings = ppo.create_rl_state(_params()["gpt"], _rm(), _params()["gpt"], _rm(), opt, opt, mesh, axes,
                                         jax.random.PRNGKey(0), 0.1, vision_params=vision)
  roll = rollout.make_rollout_from_config(CFG.gpt, CFG.gpt, CFG.gpt, rollout.reward_model_score_fn(CFG.gpt), cfg,
                                          eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  step = state_lib.jit_step(
      ppo.make_rl_step(roll, CFG.gpt, CFG.gpt, opt, opt, cfg,
                       prefix_fn=lambda vp, im: vlm.image_tokens(vp, CFG, im)), shardings, mesh)
  prompt, pmask = _rows(8, 8, seed=7, left=(0, 2))   # one row per simulated device
  batch = {"prompt_tokens": prompt, "prompt_mask": pmask, "images": _images(8)}
  before = jax.device_get(state)
  for _ in range(2):
    state, metrics = step(state, batch)
  after = jax.device_get(state)
  for x, y in zip(jax.tree.leaves(before["vision"]), jax.tree.leaves(after["vision"])):
    np.testing.assert_array_equal(x, y)
  moved = [float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(before["policy"]["params"]),
                                                      jax.tree.leaves(after["policy"]["params"]))]
  assert max(moved) > 0
  assert all(np.isfinite(float(metrics[k])) for k in ("approx_kl", "clip_frac", "value_loss", "score", "kl"))
  with pytest.raises(ValueError, match="images"):
    step(state, {"prompt_tokens": prompt, "prompt_mask": pmask})
  # At lr 0 the policy never moves, so every minibatch's ratio must be exactly the sampler's: the image
  # tokens are permuted with their rows (a misaligned prefix would show as approx_kl > 0).
  still = optax.sgd(0.0)
  state0, shard0 = ppo.create_rl_state(_params()["gpt"], _rm(), _params()["gpt"], _rm(), still, still, mesh, axes,
                                       jax.random.PRNGKey(1), 0.1, vision_params=vision)
  step0 = state_lib.jit_step(
      ppo.make_rl_step(roll, CFG.gpt, CFG.gpt, still, still, cfg,
                       prefix_fn=lambda vp, im: vlm.image_tokens(vp, CFG, im)), shard0, mesh)
  _, m0 = step0(state0, batch)
  assert float(m0["approx_kl"]) < 1e-6 and float(m0["clip_frac"]) == 0.0
