"""LoRA (rlhf_jax/model/lora.py): merge == unmerged, only the adapters train, exact resume, and one
end-to-end chain SFT (LoRA) -> PPO (LoRA, the reference = the SFT base) -> export == transformers."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.model import gpt, heads, lora
from rlhf_jax.recipes import ppo as ppo_recipe, sft as sft_recipe
from rlhf_jax.train import checkpoint, loop, ppo, stages, steps, supervised
import hf_fixtures  # tests/ is on sys.path (pytest's rootdir-less import)
from data_fixtures import write_jsonl
from model_fixtures import init_params  # tests/ is on sys.path

EXP = Path(__file__).resolve().parents[1] / "experiments"
# Every kernel kind: q / kv (GQA) / out, swiglu's fc + gate, proj.
CFG = gpt.preset("nano", vocab_size=64, max_len=32, mlp="swiglu", n_kv_head=2, position="rope", norm="rmsnorm",
                 bias=False)


def _params():
  return init_params(CFG, 0)


LOGITS = jax.jit(gpt.logits, static_argnums=1)   # one compile for every logits call below


def _random_adapters(params, rank=4, seed=1):
  """Adapters with B drawn too (nonzero), so the update is not the zero matrix."""
  ad = lora.init(params, rank, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), ad)


def _kernels(tree, path=()):
  """{path: kernel-or-adapter} for the targeted kernels of a (possibly nested) tree."""
  out = {}
  for k, v in tree.items():
    if k in lora.KERNELS:
      out[path + (k,)] = v
    elif isinstance(v, dict):
      out.update(_kernels(v, path + (k,)))
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_zero_adapters_merge_to_the_base_exactly():
  ad = lora.init(_params(), 4, jax.random.PRNGKey(1))
  assert set(_kernels(ad)) == {("blocks", "attn", k) for k in ("q_kernel", "kv_kernel", "out_kernel")} | {
      ("blocks", "mlp", k) for k in ("fc_kernel", "gate_kernel", "proj_kernel")}
  q = ad["blocks"]["attn"]["q_kernel"]
  assert q["a"].shape == (2, 64, 4) and q["b"].shape == (2, 4, 4, 16) and not np.any(np.asarray(q["b"]))
  assert ad["blocks"]["attn"]["out_kernel"]["a"].shape == (2, 4, 16, 4)          # both input axes kept
  merged = lora.merge(_params(), ad, 16.0 / 4)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(_params())):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # Axes: A = the kernel's layer + input axes and None, B = None + its output axes.
  axes = lora.adapter_axes(gpt.param_axes(CFG), ad)
  assert axes["blocks"]["attn"]["out_kernel"] == {"a": ("layers", "heads", "head_dim", None),
                                                  "b": ("layers", None, "embed")}
  assert axes["blocks"]["attn"]["kv_kernel"]["b"] == ("layers", None, None, "kv_heads", "head_dim")
  # A scalar model: the trunk is adapted, the head is trained in full (a copy in the adapters).
  rm = heads.from_lm(_params(), CFG, jax.random.PRNGKey(2))
  rm_ad = lora.init(rm, 4, jax.random.PRNGKey(1))
  assert set(rm_ad) == {"gpt", "head"} and np.array_equal(rm_ad["head"]["kernel"], rm["head"]["kernel"])
  new_head = {"kernel": rm_ad["head"]["kernel"] + 1.0, "bias": rm_ad["head"]["bias"]}
  rm_merged = lora.merge(rm, {**rm_ad, "head": new_head}, 4.0)
  np.testing.assert_array_equal(rm_merged["head"]["kernel"], np.asarray(rm["head"]["kernel"]) + 1.0)
  assert lora.adapter_axes(heads.param_axes(CFG), rm_ad)["head"] == {"kernel": ("embed",), "bias": ()}


def test_merged_equals_unmerged_by_brute_force():
  """x @ (W + s A B) == x @ W + s (x @ A) @ B for every kernel (numpy float64), and the merged model's
  logits == the logits of weights merged independently in numpy."""
  ad, scale = _random_adapters(_params()), 16.0 / 4
  merged = lora.merge(_params(), ad, scale)
  rng = np.random.default_rng(0)
  for path, adapter in _kernels(ad).items():
    w = np.asarray(_get(_params(), path), np.float64)[0]                    # layer 0
    a, b = np.asarray(adapter["a"], np.float64)[0], np.asarray(adapter["b"], np.float64)[0]
    n_in = a.ndim - 1
    x = rng.normal(size=(5,) + w.shape[:n_in])
    unmerged = (np.tensordot(x, w, n_in) + scale * np.tensordot(np.tensordot(x, a, n_in), b, 1))
    ours = np.tensordot(x, np.asarray(_get(merged, path), np.float64)[0], n_in)
    np.testing.assert_allclose(ours, unmerged, atol=1e-5, rtol=1e-5, err_msg=str(path))
  by_hand = jax.tree.map(np.array, _params())                 # writable copies
  for path, adapter in _kernels(ad).items():
    w = _get(by_hand, path)
    a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
    d = np.stack([np.tensordot(a[i], b[i], 1) for i in range(a.shape[0])])
    w[...] = (w.astype(np.float64) + scale * d).astype(np.float32)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
  want = np.asarray(LOGITS(by_hand, CFG, tokens))
  got = np.asarray(LOGITS(merged, CFG, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.max(np.abs(got - np.asarray(LOGITS(_params(), CFG, tokens)))) > 1e-2   # the adapters matter


def test_gradients_reach_only_the_adapters():
  tree, _ = lora.attach(_params(), gpt.param_axes(CFG), lora.Spec(4), jax.random.PRNGKey(1))
  rows = np.random.default_rng(0).integers(0, 64, (4, 13)).astype(np.int32)
  batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((4, 12), np.int32)}
  grads = jax.jit(jax.grad(lambda t: lora.loss(steps.lm_loss_fn(CFG))(t, batch, None)[0]))(tree)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["base"])) and float(grads["scale"]) == 0.0
  b_grads = [g["b"] for g in _kernels(grads["lora"]).values()]
  assert all(np.any(np.asarray(g)) for g in b_grads)        # with B = 0 only B gets a gradient at first


def test_config_switch_and_clear_errors():
  assert lora.from_config(lora.config()) is None and lora.stage_info(lora.config()) == {}
  for targets in ("q_kernel, out_kernel", ("q_kernel,out_kernel",), ("q_kernel", "out_kernel")):
    spec = lora.from_config(mlc.ConfigDict(dict(rank=8, alpha=32.0, targets=targets)))
    assert spec.targets == ("q_kernel", "out_kernel") and spec.scale == 4.0
  with pytest.raises(ValueError, match="unknown"):
    lora.from_config(lora.config(rank=4, targets=("qkv_kernel",)))
  gelu_mlp = {"blocks": {"mlp": {"fc_kernel": np.zeros((1, 4, 8), np.float32)}}}     # no gate_kernel
  with pytest.raises(ValueError, match="none of the targets"):
    lora.init(gelu_mlp, 4, jax.random.PRNGKey(0), targets=("gate_kernel",))
  # A state without a reference must read a LoRA policy's base; a full fine-tuned policy needs a copy.
  value = heads.from_lm(_params(), CFG, jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="needs a LoRA policy"):
    ppo.create_rl_state(_params(), value, None, value, None, None, None, {m: {} for m in ppo.MODELS},
                        jax.random.PRNGKey(0), 0.1)


# ------------------------------------------------------------ supervised fit: frozen base, exact resume

ROWS = np.random.default_rng(0).integers(0, 64, (40, 17)).astype(np.int32)
TINY = gpt.preset("nano", vocab_size=64, max_len=32, n_layer=1, d_model=32, n_head=2, head_dim=16, dropout=0.1)


def _tiny_params():
  return init_params(TINY, 3)


def _losses(workdir):
  """{step: train loss}; a replayed step's later line wins."""
  return {h["step"]: h["pretrain/loss"] for h in loop.read_metrics(str(workdir)) if "pretrain/loss" in h}


class Stop(Exception):
  pass


def _fit_lm(workdir, stop_at=None):
  c = mlc.ConfigDict(dict(seed=0, batch_size=8, mesh=rcfg.mesh().to_dict(), lora=lora.config(rank=4).to_dict(),
                          optim=rcfg.optim(lr=1e-2, total_steps=10, warmup_steps=2, weight_decay=0.1).to_dict(),
                          loop=dict(num_steps=10, log_every=1, ckpt_every=4, progress=False, tensorboard=False)))

  def hook(step, state, metrics):
    if step == stop_at:
      raise Stop()

  return supervised.fit_lm(c, str(workdir), TINY, ROWS, ROWS[:8], params=_tiny_params(), eval_batches=0,
                           hooks=[hook])


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_fit")
  full, last, _ = _fit_lm(root / "full")
  with pytest.raises(Stop):
    _fit_lm(root / "crash", stop_at=7)     # checkpoint at 4; steps 5-7 are lost
  _fit_lm(root / "crash")                  # resumes at 4 and replays 5..10
  return {"root": root, "state": full, "last": last}


def test_fit_trains_the_adapters_and_leaves_the_base_bit_identical(lm_runs):
  state = lm_runs["state"]
  params = state["params"]
  assert lora.is_lora(params) and float(params["scale"]) == 16.0 / 4
  for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(_tiny_params())):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert all(np.any(np.asarray(ad["b"])) for ad in _kernels(params["lora"]).values())
  # No Adam moments for the base: the optimizer state is about 2x the adapters (+ counters).
  size = lambda t: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(t))
  assert size(state["opt_state"]) < 2 * size(params["lora"]) + 16 < size(params["base"])
  losses = _losses(lm_runs["root"] / "full")
  assert losses[10] < losses[1]
  # The checkpoint reads back as the merged model.
  got = checkpoint.load_params(str(lm_runs["root"] / "full" / "checkpoints"))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(lora.merged(params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exact_resume_with_lora(lm_runs):
  full, resumed = _losses(lm_runs["root"] / "full"), _losses(lm_runs["root"] / "crash")
  np.testing.assert_allclose([resumed[s] for s in range(5, 11)], [full[s] for s in range(5, 11)], rtol=1e-6)


# ------------------------------------------------------------ end to end: SFT -> PPO -> export


def _stage(file, recipe, workdir, **overrides):
  """The experiment's smoke preset, then `overrides` (which win over the preset)."""
  exp = load_experiment(str(EXP / file))
  c = exp.get_config()
  c.preset = "smoke"
  c = rcfg.apply_preset(c, exp.PRESETS)
  c.update_from_flattened_dict(overrides)
  return recipe.run(c, str(workdir))


def _raw_state(workdir):
  """The last train state of a stage as saved (not merged)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    ckpt.close()


def _write_rm_stage(workdir, sft):
  """An "rm" stage from the SFT model with a random head (no training: the PPO stage only needs one)."""
  params = jax.tree.map(np.asarray, heads.from_lm(sft.params, sft.config, jax.random.PRNGKey(5)))  # one placement
  stages.write_stage(str(workdir), "rm", sft.config, sft.tok, reward_offset=0.0)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(0, {"params": params}, force=True)
  ckpt.close()
  return params


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_chain")
  ckpt = hf_fixtures.make_checkpoint(str(root / "hf"), "qwen2")
  text = hf_fixtures.corpus(120, seed=1)
  msg = lambda role, content: {"role": role, "content": content}
  demos = write_jsonl(root / "demos.jsonl", [{"messages": [msg("user", text[i]), msg("assistant", text[i + 1])]}
                                             for i in range(0, 120, 2)])
  prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": [msg("user", t)]} for t in text[:40]])
  cwd = os.getcwd()
  os.chdir(root)
  try:
    out = {"root": root, "hf": ckpt}
    out["sft"] = _stage("sft.py", sft_recipe, root / "sft", init_from=ckpt, **{
        "data.train": str(demos), "max_len": 48, "epochs": 3, "loop.log_every": 1, "optim.lr": 2e-2,
        "optim.warmup_steps": 0, "lora.rank": 4})
    out["sft_model"] = stages.load_model(str(root / "sft"), expect="sft")
    out["rm_params"] = _write_rm_stage(root / "rm", out["sft_model"])
    out["ppo"] = _stage("ppo.py", ppo_recipe, root / "ppo", init_from=str(root / "sft"), rm_from=str(root / "rm"), **{
        "data.train": str(prompts), "loop.num_steps": 2, "loop.eval_every": 0, "n_eval_prompts": 0,
        "max_prompt_len": 24, "ppo.max_new_tokens": 6, "optim.lr": 1e-2, "optim.warmup_steps": 0,
        "value_optim.warmup_steps": 0, "lora.rank": 4})
  finally:
    os.chdir(cwd)
  return out


def test_lora_sft_trains_and_records_its_adapters(chain):
  losses = [h["sft/loss"] for h in loop.read_metrics(str(chain["root"] / "sft")) if "sft/loss" in h]
  assert len(losses) >= 6 and losses[-1] < losses[0] - 0.05
  info = stages.read_stage(str(chain["root"] / "sft"))
  assert info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 16.0
  raw = _raw_state(str(chain["root"] / "sft"))["params"]
  assert set(raw) == {"base", "lora", "scale"}
  hf_params = stages.load_model(chain["hf"]).params        # the base is the HF model, untouched
  for a, b in zip(jax.tree.leaves(raw["base"]), jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  merged = lora.merge(raw["base"], raw["lora"], float(raw["scale"]))
  for a, b in zip(jax.tree.leaves(chain["sft_model"].params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_ppo_reference_is_the_policy_base(chain):
  assert np.isfinite(chain["ppo"]["score"]) and np.isfinite(chain["ppo"]["kl"])
  first = next(h for h in loop.read_metrics(str(chain["root"] / "ppo")) if "ppo/kl" in h)
  assert first["step"] == 1 and abs(first["ppo/kl"]) < 1e-3     # B = 0: the first policy is the reference
  state = _raw_state(str(chain["root"] / "ppo"))
  assert "ref" not in state and "score" not in state      # no second copy of the SFT model or the RM
  pol, val = state["policy"]["params"], state["value"]["params"]
  assert set(pol) == set(val) == {"base", "lora", "scale"}
  # The policy's base is the SFT model bit for bit after training (so it is the reference), the
  # value model's base is the RM (the scorer); only adapters (and the value head) moved.
  for a, b in zip(jax.tree.leaves(pol["base"]), jax.tree.leaves(chain["sft_model"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(val["base"]), jax.tree.leaves(chain["rm_params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.any(np.asarray(ad["b"])) for ad in _kernels(pol["lora"]).values())
  assert not np.array_equal(np.asarray(val["lora"]["head"]["kernel"]), np.asarray(val["base"]["head"]["kernel"]))


def test_lora_ppo_export_matches_transformers(chain, tmp_path):
  from rlhf_jax import export

  info = export.export(str(chain["root"] / "ppo"), str(tmp_path / "policy"))
  assert info["kind"] == "causal_lm"
  pol = _raw_state(str(chain["root"] / "ppo"))["policy"]["params"]
  merged = lora.merge(pol["base"], pol["lora"], float(pol["scale"]))
  cfg = chain["sft_model"].config
  tokens, mask = np.array(hf_fixtures.PROBE_TOKENS, np.int32), np.array(hf_fixtures.PROBE_MASK, np.int32)
  ours = np.asarray(gpt.logits(merged, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
  base = np.asarray(gpt.logits(pol["base"], cfg, jnp.asarray(tokens), jnp.asarray(mask)))
  theirs = hf_fixtures.hf_causal_lm_logits(tmp_path / "policy", tokens, mask)
  real = mask.astype(bool)
  assert np.max(np.abs(ours[real] - theirs[real])) < 1e-4
  assert np.max(np.abs(base[real] - theirs[real])) > 1e-3          # the adapters are in the export
