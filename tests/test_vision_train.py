"""Image input training (issue 15): the VLM loss, the image-world batch iterator, and the smoke run
of experiments/vision_tiny.py (alignment -> multimodal SFT -> eval with / without the image):
the loss falls, the projector-only stage leaves ViT and decoder untouched, a crashed run resumes
exactly, and the blanked-image baseline is reported."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax.config import load_experiment
from rlhf_jax.data import image_world as iw
from rlhf_jax.data import pipeline
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.losses.lm import lm_loss
from rlhf_jax.model import vit, vlm
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.recipes import vision
from rlhf_jax.train import checkpoint, loop, steps

EXP = Path(__file__).resolve().parents[1] / "experiments" / "vision_tiny.py"
TOK = tok_lib.train_bpe(iw.text_corpus(300), 360)
CFG = vlm.VLMConfig(vit.ViTConfig(d_model=16, n_layer=1, n_head=2, mlp_ratio=2),
                    GPTConfig(vocab_size=TOK.vocab_size, max_len=16 + 48, n_layer=1, n_head=2, d_model=16,
                              dropout=0.0))


def test_image_batches_layout_and_exact_resume():
  it = iw.image_batches(TOK, 4, 48, n=12, seed=3, shuffle_seed=1, families=("shape", "count"))
  assert it.stats.kept == 12
  b = next(it)
  assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.float32
  assert {k: b[k].shape for k in ("tokens", "targets", "mask", "attention_mask")} == {
      k: (4, 48) for k in ("tokens", "targets", "mask", "attention_mask")}
  for row in range(4):   # left-aligned encode_demonstration rows: [pads | prompt | answer EOS]
    am = b["attention_mask"][row]
    n = int(am.sum())
    assert am[-1] == 1 and am[:48 - n].sum() == 0 and am[48 - n:].all()
    assert b["tokens"][row, -1] == TOK.eos_id and b["mask"][row, -1] == 0   # nothing follows the EOS
    found = [i for i in range(12) if np.array_equal(iw.to_float(iw.sample_at(3, i, ("shape", "count"))["image"]),
                                                    b["images"][row])]
    s = iw.sample_at(3, found[0], ("shape", "count"))
    ref = pipeline.encode_demonstration(TOK, iw.demonstration(s), 48)
    np.testing.assert_array_equal(b["tokens"][row, 48 - n:], ref["tokens"][:n])
    np.testing.assert_array_equal(b["mask"][row, 48 - n:], ref["mask"][:n])
    assert TOK.decode(b["targets"][row][b["mask"][row] == 1].tolist()[:-1]).strip() == s["answer"]
  state = it.get_state()
  after = [next(it) for _ in range(4)]     # crosses an epoch (3 batches per epoch)
  it.set_state(state)
  again = [next(it) for _ in range(4)]
  for x, y in zip(after, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ValueError, match="raise max_len"):
    iw.image_batches(TOK, 4, 12, n=8, seed=0)


def test_vlm_loss_fn_is_the_response_loss_and_freezes_what_it_is_given():
  params = vlm.init(CFG, jax.random.PRNGKey(0))
  batch = next(iw.image_batches(TOK, 4, 48, n=4, seed=0))
  loss, metrics = steps.vlm_loss_fn(CFG)(params, batch, None)
  ref, _ = lm_loss(vlm.logits(params, CFG, batch["images"], batch["tokens"], batch["attention_mask"]),
                   batch["targets"], batch["mask"])
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
  assert float(metrics["num_tokens"]) == float(batch["mask"].sum())
  train, frozen = vision.split_params(params, "projector")
  assert list(train) == ["projector"] and sorted(frozen) == ["gpt", "vit"]
  assert [sorted(p) for p in vision.split_params(params, "decoder_projector")] == [["gpt", "projector"], ["vit"]]
  fn = steps.vlm_loss_fn(CFG, frozen)
  np.testing.assert_allclose(float(fn(train, batch, None)[0]), float(loss), rtol=1e-6)
  grads = jax.grad(lambda p: fn(p, batch, None)[0])(train)
  assert list(grads) == ["projector"] and float(jnp.abs(grads["projector"]["fc_kernel"]).sum()) > 0
  # the image matters to the loss (a blank image changes it)
  blank = dict(batch, images=np.zeros_like(batch["images"]))
  assert abs(float(steps.vlm_loss_fn(CFG)(params, blank, None)[0]) - float(loss)) > 1e-6
  with pytest.raises(ValueError, match="both trained and frozen"):
    steps.vlm_loss_fn(CFG, frozen)(params, batch, None)
  with pytest.raises(ValueError, match="trainable='ViT'"):
    vision.split_params(params, "ViT")


class Stop(Exception):
  pass


def _config(**overrides):
  exp = load_experiment(str(EXP))
  c = exp.get_config()
  c.preset = "smoke"
  for k, v in overrides.items():
    c.update_from_flattened_dict({k: v})
  return exp, c


def _sft_losses(workdir):
  """{step: sft train loss}; a replayed step's later line wins."""
  return {h["step"]: h["sft/loss"] for h in loop.read_metrics(str(Path(workdir) / "sft")) if "sft/loss" in h}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("vision")
  exp, c = _config()
  full = exp.train(c, str(root / "full"))

  def stop_at(n):
    def stop(step, state, metrics):
      if step == n:
        raise Stop()
    return stop

  smoke = lambda: rcfg.apply_preset(_config()[1], exp.PRESETS)
  with pytest.raises(Stop):   # sft checkpoint at 10; steps 11-15 lost
    vision.run(smoke(), str(root / "crash"), hooks={"sft": [stop_at(15)]})
  with pytest.raises(Stop):   # align done; sft resumes at 10; rm; ppo checkpoint at 2, iteration 3 lost
    vision.run(smoke(), str(root / "crash"), hooks={"ppo": [stop_at(3)]})
  resumed = exp.train(_config()[1], str(root / "crash"))           # ppo resumes at 2
  return {"root": root, "full": full, "resumed": resumed}


def test_smoke_run_trains_and_reports_the_blank_image_baseline(smoke_runs):
  root, full = smoke_runs["root"], smoke_runs["full"]
  for name in ("align", "sft"):
    st = full["stages"][name]
    assert st["final_loss"] < st["first_logged_loss"], (name, st)
  assert full["stages"]["align"]["trained_subtrees"] == ["projector"]
  assert full["stages"]["sft"]["trained_subtrees"] == ["gpt", "projector", "vit"]
  # the align checkpoint holds the projector only: ViT and decoder had no optimizer state and stayed
  assert list(checkpoint.load_params(str(root / "full" / "align" / "checkpoints"))) == ["projector"]
  saved = json.loads((root / "full" / "results.json").read_text())
  for key in ("with_image", "blank_image"):
    assert set(saved["eval"][key]) == set(iw.FAMILIES) | {"mean"}
    assert all(0.0 <= v <= 1.0 for v in saved["eval"][key].values())
  table = (root / "full" / "results.md").read_text()
  assert "| family | with image | blank image | gain |" in table and all(f"| {f} |" in table for f in iw.FAMILIES)


def test_smoke_run_resumes_exactly(smoke_runs):
  root = smoke_runs["root"]
  full, crash = _sft_losses(root / "full"), _sft_losses(root / "crash")
  assert sorted(crash) == sorted(full) == [5, 10, 15, 20]
  np.testing.assert_allclose([crash[s] for s in (15, 20)], [full[s] for s in (15, 20)], rtol=1e-6)
  a = checkpoint.load_params(str(root / "full" / "sft" / "checkpoints"))
  b = checkpoint.load_params(str(root / "crash" / "sft" / "checkpoints"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert smoke_runs["resumed"]["eval"] == smoke_runs["full"]["eval"]
  # the RL stage resumed from its iteration-2 checkpoint: iteration 3 and the policy are the same
  ppo_log = lambda run: {h["step"]: h for h in loop.read_metrics(str(root / run / "ppo")) if "ppo/score" in h}
  full_ppo, crash_ppo = ppo_log("full"), ppo_log("crash")
  assert sorted(full_ppo) == sorted(crash_ppo) == [1, 2, 3]
  for k in ("score", "kl", "approx_kl", "policy_loss", "value_loss"):
    np.testing.assert_allclose(crash_ppo[3][f"ppo/{k}"], full_ppo[3][f"ppo/{k}"], rtol=1e-5, atol=1e-7)
  assert smoke_runs["resumed"]["rlhf"] == smoke_runs["full"]["rlhf"]


def test_smoke_run_does_rlhf_on_image_prompts(smoke_runs):
  full, root = smoke_runs["full"], smoke_runs["root"]
  rm, ppo_s = full["stages"]["rm"], full["stages"]["ppo"]
  assert rm["train_comparisons"] > 0 and rm["eval_pairs"] > 0 and 0 <= rm["eval_pairwise_accuracy"] <= 1
  assert rm["blank_fraction"] > 0 and (rm["on_policy_pair_accuracy"] is None) == (rm["on_policy_pairs"] == 0)
  recs = [json.loads(line) for line in (root / "full" / "rm" / "comparisons_train.jsonl").read_text().splitlines()]
  assert len(recs) == rm["train_comparisons"]
  for rec in recs:   # gold-ranked: the ranks order the image checker's scores
    s = [iw.score(rec["task"], r) for r in rec["responses"]]
    assert all((a < b) == (x > y) for a, x in zip(rec["ranks"], s) for b, y in zip(rec["ranks"], s))
  assert [t["step"] for t in ppo_s["trace"]] == [1, 2, 3] and ppo_s["episodes"] == 3 * 8
  saved = json.loads((root / "full" / "results.json").read_text())
  for mode in ("greedy", "sampled"):
    res = saved["rlhf"][mode]
    assert set(res) == {"sft", "ppo"} and set(iw.FAMILIES) <= set(res["ppo"])
    w = res["ppo"]["vs_sft_gold"]
    assert w["wins"] + w["ties"] + w["losses"] == saved["rlhf"]["n"] == 4 * len(iw.FAMILIES)
    assert w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
  assert "rm_score" in saved["rlhf"]["sampled"]["ppo"]
  assert "| PPO vs SFT |" in (root / "full" / "results.md").read_text()
  # the PPO stage is a vision stage too (chat --workdir <run>/ppo --image ...): SFT's encoder, PPO's decoder
  info, _, _, ppo_params = vision.load_vision_stage(str(root / "full" / "ppo"))
  _, _, _, sft_params = vision.load_vision_stage(str(root / "full" / "sft"))
  assert info["stage"] == "vision_ppo" and list(info["trained"]) == ["align", "sft", "ppo"]
  policy = checkpoint.load_params(str(root / "full" / "ppo" / "checkpoints"))
  same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a),
                                                                                           jax.tree.leaves(b)))
  assert same(ppo_params["gpt"], policy) and same(ppo_params["vit"], sft_params["vit"])
  assert same(ppo_params["projector"], sft_params["projector"]) and not same(ppo_params["gpt"], sft_params["gpt"])
  assert sorted(Path(p).name for p in full["plots"]) == ["families.png", "ppo_trust_region.png", "rlhf_families.png"]
  # the cached comparisons are only reused with the settings that made them
  from rlhf_jax.recipes import vision_rlhf
  exp, c = _config(**{"rm.temperature": 0.5})
  c = rcfg.apply_preset(c, exp.PRESETS)
  with pytest.raises(ValueError, match="labelled with other settings.*temperature=1.0.*now temperature=0.5"):
    vision_rlhf.label(c, str(root / "full"), None, None, None, "train")
  exp, c = _config(**{"data.ppo_seed": 2})
  with pytest.raises(ValueError, match="every sample stream needs its own seed"):
    exp.train(c, str(root / "seeds"))
  assert all(Path(p).stat().st_size > 10_000 for p in full["plots"])


def test_recipe_rejects_shared_streams_and_cut_eval_prompts(tmp_path):
  exp, c = _config(**{"data.eval_seed": 0})
  with pytest.raises(ValueError, match="eval_seed must differ"):
    exp.train(c, str(tmp_path))
  with pytest.raises(ValueError, match="raise config.max_len"):
    vision.answers(None, CFG, TOK, [iw.sample_at(0, 3)], blank=False, batch_size=1, max_prompt_len=20,
                   max_new_tokens=4)


def test_chat_with_an_image_answers_as_vlm_generate_and_refuses_bad_inputs(smoke_runs, tmp_path):
  import io
  from rlhf_jax import chat
  from rlhf_jax.model import gpt
  from rlhf_jax.train import stages
  run = smoke_runs["root"] / "full"
  info, cfg, tok, params = vision.load_vision_stage(str(run))      # the run's workdir -> its sft stage
  assert info["stage"] == "vision_sft" and cfg.vit.image_size == iw.SIZE and info["max_new_tokens"] == 8
  sft = checkpoint.load_params(str(run / "sft" / "checkpoints"))   # "all" trained: the checkpoint is the model
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves({k: sft[k] for k in params})):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  s = iw.sample_at(5, 0)                                           # a shape image
  png = tmp_path / "q.png"
  iw.save_png(png, s["image"])
  questions = [iw.sample_at(5, i)["task"]["question"] for i in range(len(iw.FAMILIES))]   # one per family
  lines = "".join(q + "\n" for q in questions) + "/exit\nnot asked\n"
  budget = cfg.gpt.max_len - cfg.num_image_tokens - 8 + 1
  for temperature in (0.0, 1.0):   # greedy, then sampled (rng fold_in(seed, answer index))
    out = io.StringIO()
    chat.main(["--workdir", str(run), "--image", str(png), "--temperature", str(temperature), "--seed", "3"],
              stdin=io.StringIO(lines), stdout=out)
    replies = [r.rstrip("\n") for r in out.getvalue().split("Assistant: ")[1:]]
    refs = []
    for i, q in enumerate(questions):   # vlm.generate on the training prompt format [user: <image>\n question]
      msgs = [{"role": "user", "content": iw.prompt_text({"question": q})}]
      assert chat.image_prompt(q) == msgs
      toks, mask = pipeline.encode_prompt_left_padded(tok, msgs, budget)
      gen = vlm.generate(params, cfg, iw.to_float(s["image"])[None], toks[None], mask[None],
                         jax.random.fold_in(jax.random.PRNGKey(3), i), max_new_tokens=8, temperature=1.0,
                         eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=temperature == 0)
      ids = [int(t) for t in np.asarray(gen["tokens"])[0]]
      refs.append(tok.decode(ids[:next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))]))
    assert replies == refs, temperature   # one answer per question (nothing after /exit), generate's words
  # the smoke model's greedy answer is EOS at once (its eval scores 0); sampled answers have words
  assert any(refs)
  assert iw.demonstration(s)["messages"] == [{"role": "user", "content": iw.prompt_text(s["task"])}]
  # a corrupt PNG, a wrong-size PNG: load_png's errors
  bad = tmp_path / "bad.png"
  bad.write_bytes(png.read_bytes()[:40])
  with pytest.raises(SystemExit, match="not a readable PNG"):
    chat.main(["--workdir", str(run), "--image", str(bad)], stdin=io.StringIO(""), stdout=io.StringIO())
  iw.save_png(tmp_path / "big.png", np.zeros((40, 40, 3), np.uint8))
  with pytest.raises(SystemExit, match="must be 32x32"):
    chat.main(["--workdir", str(run), "--image", str(tmp_path / "big.png")], stdin=io.StringIO(""),
              stdout=io.StringIO())
  # --image on a text-only stage; a vision stage without --image
  text = tmp_path / "text" / "sft"
  stages.write_stage(str(text), "sft", CFG.gpt, TOK)
  ckpt = checkpoint.Checkpointer(str(text / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": gpt.init(CFG.gpt, jax.random.PRNGKey(0)), "step": np.int32(1)})
  ckpt.close()
  with pytest.raises(SystemExit, match="text-only model"):
    chat.main(["--workdir", str(tmp_path / "text"), "--stage", "sft", "--image", str(png)],
              stdin=io.StringIO(""), stdout=io.StringIO())
  with pytest.raises(SystemExit, match="holds a vision stage"):
    chat.main(["--workdir", str(run)], stdin=io.StringIO(""), stdout=io.StringIO())
  with pytest.raises(ValueError, match="not a vision stage"):
    vision.load_vision_stage(str(tmp_path))
