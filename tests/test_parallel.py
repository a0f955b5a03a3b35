"""Sharded train steps on simulated meshes equal the single-device step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.model import gpt
from rlhf_jax.train import state as state_lib
from rlhf_jax.train.steps import lm_loss_fn, make_train_step

CFG = gpt.preset("nano", dropout=0.0, vocab_size=96)
# eps=1e-3 (as tests/multiprocess_worker.py): Adam with a tiny eps turns float32 reduction-order noise on
# near-zero gradients (the key bias's is analytically zero: softmax is shift-invariant) into O(lr) steps
# of random sign, which differ between layouts and compilers; with eps=1e-3 an update is ~linear in such
# a gradient, so the sharded and single-device params agree to float32 rounding while real gradients
# still move every leaf by ~1e-3..1e-2.
OPTIM = mlc.ConfigDict(dict(lr=1e-2, total_steps=10, warmup_steps=0, schedule="constant", weight_decay=0.1,
                            grad_clip=1.0, eps=1e-3))


def _batch(b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[:, :3] = 0  # a loss mask that is not all ones
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


@functools.lru_cache(maxsize=None)  # compiled once per mesh and shared by the tests below
def _one_step(mesh_shape, microbatches=1):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = parallel.make_mesh(mesh_shape, devices)
  opt = state_lib.make_optimizer(OPTIM)
  state, shardings = state_lib.create_state(lambda r: gpt.init(CFG, r), opt, mesh, gpt.param_axes(CFG),
                                            jax.random.PRNGKey(0))
  step = state_lib.jit_step(make_train_step(lm_loss_fn(CFG), opt, microbatches), shardings, mesh)
  new_state, metrics = step(state, parallel.put_batch(_batch(), mesh))
  return mesh, new_state, metrics


@pytest.fixture(scope="module")
def reference():
  return _one_step((1, 1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_single_device(reference, shape):
  _, ref_state, ref_metrics = reference
  mesh, state, metrics = _one_step(shape)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(jax.device_get(a) - jax.device_get(b)))),
                       state["params"], ref_state["params"])
  # (OPTIM's eps keeps Adam from amplifying float32 noise on near-zero gradients; see above.)
  assert max(jax.tree.leaves(diffs)) < 1e-6, diffs
  assert len(state["params"]["wte"].sharding.device_set) == int(np.prod(shape))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_gradients_match_single_device(shape):
  loss_fn = lm_loss_fn(CFG)
  params = gpt.init(CFG, jax.random.PRNGKey(0))
  batch = _batch()
  ref = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))(params)
  mesh = parallel.make_mesh(shape, jax.devices()[:8])
  shardings = parallel.tree_shardings(params, gpt.param_axes(CFG), mesh)
  sharded = jax.device_put(params, shardings)
  with parallel.sharding_context(mesh):
    grads = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]), out_shardings=shardings)(
        sharded, parallel.put_batch(batch, mesh))
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref)
  assert max(jax.tree.leaves(diffs)) < 1e-6, diffs


def test_param_and_optimizer_shardings_follow_rules():
  mesh, state, _ = _one_step((2, 2, 2))
  p = state["params"]
  assert p["wte"].sharding.spec == P("tensor", "fsdp")               # vocab->tensor, embed->fsdp
  assert p["wpe"].sharding.spec == P(None, "fsdp")
  assert p["blocks"]["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert p["blocks"]["mlp"]["proj_kernel"].sharding.spec == P(None, "tensor", "fsdp")
  assert p["blocks"]["attn"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert p["blocks"]["attn"]["kv_kernel"].sharding.spec == P(None, "fsdp", None, "tensor", None)
  assert p["blocks"]["attn"]["kv_bias"].sharding.spec == P(None, None, "tensor", None)
  assert p["blocks"]["attn"]["out_kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert p["blocks"]["ln1"]["scale"].sharding.spec == P(None, None)
  # Adam moments are sharded exactly like their parameters.
  adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert adam.mu["wte"].sharding.spec == p["wte"].sharding.spec
  assert adam.nu["blocks"]["mlp"]["fc_kernel"].sharding.spec == p["blocks"]["mlp"]["fc_kernel"].sharding.spec


def test_gradient_accumulation_matches_full_batch(reference):
  _, ref_state, ref_metrics = reference
  _, state, metrics = _one_step((2, 1, 1), microbatches=2)
  # Every micro-batch has the same number of loss tokens, so the mean of means is the full mean.
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(jax.device_get(a) - jax.device_get(b)))),
                       state["params"], ref_state["params"])
  assert max(jax.tree.leaves(diffs)) < 5e-5


def test_logical_rules():
  mesh = parallel.make_mesh((2, 2, 2))
  # An activation [batch, length, embed]: batch takes data+fsdp, embed cannot reuse fsdp.
  assert parallel.logical_to_spec(("batch", "length", "embed"), mesh=mesh) == P(("data", "fsdp"), None, None)
  # Not divisible -> replicated rather than an error.
  assert parallel.logical_to_spec(("heads",), shape=(3,), mesh=mesh) == P(None)


def test_bad_batch_size_and_mesh_errors():
  mesh = parallel.make_mesh((4, 1, 2))
  with pytest.raises(ValueError, match="not divisible by the data-parallel mesh size 4"):
    parallel.put_batch(_batch(b=6), mesh)
  with pytest.raises(ValueError, match="needs 12 devices"):
    parallel.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match="unknown axis"):
    parallel.make_mesh({"data": 2, "model": 4})


def test_reward_model_step_on_2x2x2_matches_single_device():
  from rlhf_jax.model import heads
  from rlhf_jax.train.steps import kwise_rm_loss_fn
  rng = np.random.default_rng(1)
  b, k, t = 8, 4, 12
  lengths = rng.integers(4, t + 1, (b, k))
  attn = (np.arange(t)[None, None, :] < lengths[..., None]).astype(np.int32)
  batch = {"tokens": rng.integers(0, CFG.vocab_size, (b, k, t)).astype(np.int32) * attn,
           "attention_mask": attn, "reward_index": (lengths - 1).astype(np.int32),
           "ranks": np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32),
           "valid": np.arange(k)[None, :] < rng.integers(2, k + 1, (b, 1))}
  opt = state_lib.make_optimizer(OPTIM)
  out = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    state, shardings = state_lib.create_state(lambda r: heads.init(CFG, r), opt, mesh, heads.param_axes(CFG),
                                              jax.random.PRNGKey(0))
    step = state_lib.jit_step(make_train_step(kwise_rm_loss_fn(CFG), opt), shardings, mesh)
    out[shape] = step(state, parallel.put_batch(batch, mesh))
  (s1, m1), (s8, m8) = out[(1, 1, 1)], out[(2, 2, 2)]
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["accuracy"], m1["accuracy"])
  assert s8["params"]["head"]["kernel"].sharding.spec == P("fsdp")
  np.testing.assert_allclose(jax.device_get(s8["params"]["head"]["kernel"]),
                             jax.device_get(s1["params"]["head"]["kernel"]), atol=5e-5)


def _gqa_config(n_kv_head):
  """Every Llama-family option, so every kind of parameter is present."""
  return gpt.GPTConfig(vocab_size=96, max_len=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, d_ff=48,
                       dropout=0.0, family="qwen3", position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=True,
                       bias=True, qk_norm=True, tie_embeddings=False)


@pytest.mark.parametrize("cfg", [CFG, _gqa_config(2), gpt.GPTConfig(vocab_size=96, max_len=16, n_layer=1, n_head=2,
                                                                    d_model=16, pre_ln=False, bias=False)])
def test_param_axes_name_every_parameter_with_its_rank(cfg):
  shapes = jax.eval_shape(lambda k: gpt.init(cfg, k), jax.random.PRNGKey(0))
  axes = gpt.param_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_axes)
  known = {name for name, _ in parallel.DEFAULT_RULES}
  for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert len(a) == len(s.shape), (a, s.shape)
    assert all(n is None or n in known for n in a), a


@pytest.mark.parametrize("n_kv_head, kv_spec", [(2, "tensor"), (1, None)])
def test_kv_heads_shard_on_tensor_only_when_divisible(n_kv_head, kv_spec):
  cfg = _gqa_config(n_kv_head)
  mesh = parallel.make_mesh((2, 2, 2))
  opt = state_lib.make_optimizer(OPTIM)
  state, shardings = state_lib.create_state(lambda r: gpt.init(cfg, r), opt, mesh, gpt.param_axes(cfg),
                                            jax.random.PRNGKey(0))
  attn = state["params"]["blocks"]["attn"]
  assert attn["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert attn["kv_kernel"].sharding.spec == P(None, "fsdp", None, kv_spec, None)
  assert attn["kv_bias"].sharding.spec == P(None, None, kv_spec, None)
  assert state["params"]["lm_head"].sharding.spec == P("tensor", "fsdp")
  assert state["params"]["blocks"]["mlp"]["gate_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  # The sharded forward equals the single-device one.
  tokens = jnp.asarray(_batch()["tokens"])
  logits = jax.jit(gpt.logits, static_argnums=(1,))
  ref = logits(jax.device_get(state["params"]), cfg, tokens)
  with parallel.sharding_context(mesh):
    out = logits(state["params"], cfg, parallel.put_batch(tokens, mesh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
