"""Image input (issue 15): the ViT encoder, the decoder's image prefix, cached decoding, the image
world's gold checker and its input validation."""
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.data import image_world as iw
from rlhf_jax.model import gpt, vit, vlm
from rlhf_jax.model.config import GPTConfig

VIT = vit.ViTConfig(image_size=32, patch_size=8, channels=3, d_model=32, n_layer=2, n_head=4, mlp_ratio=2)
GPT = GPTConfig(vocab_size=64, max_len=48, n_layer=2, n_head=4, d_model=32, dropout=0.0)
CFG = vlm.VLMConfig(VIT, GPT)
N_IMG = VIT.num_tokens   # 16 image tokens


@functools.lru_cache(maxsize=None)
def _params():
  return vlm.init(CFG, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _images(b=4):
  return iw.stack_images([s["image"] for s in iw.dataset(b, seed=1)])


_logits = jax.jit(vlm.logits, static_argnums=(1,))
_encode = jax.jit(vit.encode, static_argnums=(1,))


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(0, GPT.vocab_size, (b, t)).astype(np.int32)


# ------------------------------------------------------------------ encoder
def test_encoder_shapes_and_param_axes():
  params, images = _params(), _images()
  feats = _encode(params["vit"], VIT, images)
  assert feats.shape == (4, 16, 32) and feats.dtype == jnp.float32
  pooled = vit.encode(params["vit"], dataclasses.replace(VIT, pool="mean"), images[:1])
  assert pooled.shape == (1, 1, 32)
  assert vit.project(params["projector"], feats).shape == (4, 16, GPT.d_model)
  # patchify: patch k = row-major (k // 4, k % 4) 8x8 block, flattened (row, column, channel)
  patches = vit.patchify(images, 8)
  assert patches.shape == (4, 16, 8 * 8 * 3)
  np.testing.assert_array_equal(patches[2, 6], images[2, 8:16, 16:24].reshape(-1))
  # param_axes mirrors init: same tree, one name per dimension
  axes = vlm.param_axes(CFG)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_a = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
  assert len(flat_p) == len(flat_a)
  for path, leaf in flat_p:
    assert len(flat_a[path]) == leaf.ndim, path


def test_sharded_vlm_on_2x2x2_mesh_matches_single_device():
  params, images = _params(), _images()
  tokens = _tokens(4, 6)
  mesh = parallel.make_mesh((2, 2, 2), jax.devices()[:8])
  shardings = parallel.tree_shardings(params, vlm.param_axes(CFG), mesh)
  sharded = jax.device_put(params, shardings)
  blk = sharded["vit"]["blocks"]
  assert blk["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert blk["attn"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert sharded["vit"]["patch_kernel"].sharding.spec == P(None, "fsdp")
  assert sharded["projector"]["fc_kernel"].sharding.spec == P("fsdp", "tensor")
  assert sharded["projector"]["proj_kernel"].sharding.spec == P("tensor", "fsdp")
  with parallel.sharding_context(mesh):
    out = jax.jit(vlm.logits, static_argnums=(1,))(sharded, CFG, parallel.put_batch(images, mesh),
                                                   parallel.put_batch(tokens, mesh))
  ref = _logits(params, CFG, images, tokens)
  assert out.shape == (4, 6, GPT.vocab_size)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ image prefix in the decoder
def test_image_prefix_under_left_padding_equals_unpadded():
  params, images = _params(), _images()
  tokens = _tokens(2, 7, seed=3)
  mask = np.ones((2, 7), np.int32)
  mask[1, :3] = 0                       # row 1: 3 pads, then 4 real tokens
  padded = _logits(params, CFG, images[:2], tokens, mask)
  alone = _logits(params, CFG, images[1:2], tokens[1:, 3:])
  np.testing.assert_allclose(np.asarray(padded[1, 3:]), np.asarray(alone[0]), atol=1e-5, rtol=0)
  full = _logits(params, CFG, images[:1], tokens[:1])
  np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(full[0]), atol=1e-5, rtol=0)
  # the layout: [image | pads | text]; positions count the image, skip the pads
  m = vlm.full_mask(CFG, jnp.asarray(mask))
  pos = np.asarray(gpt.positions_from_mask(m))
  assert m.shape == (2, N_IMG + 7)
  assert pos[1, :N_IMG].tolist() == list(range(N_IMG))
  assert pos[1, N_IMG + 3:].tolist() == list(range(N_IMG, N_IMG + 4))
  # the image changes the logits (the decoder reads it)
  other = _logits(params, CFG, images[2:4], tokens, mask)
  assert float(jnp.max(jnp.abs(other - padded))) > 1e-4


def test_cached_decoding_with_image_prefix_equals_uncached():
  params, images = _params(), _images()
  prompt = _tokens(2, 5, seed=4)
  pmask = np.ones((2, 5), np.int32)
  pmask[0, :2] = 0
  n = 6
  out = vlm.generate(params, CFG, images[:2], prompt, pmask, jax.random.PRNGKey(7), max_new_tokens=n,
                     temperature=1.0, eos_id=None, pad_id=0)
  assert out["tokens"].shape == (2, n) and bool(jnp.all(out["mask"] == 1))
  seq = np.concatenate([prompt, np.asarray(out["tokens"])], axis=1)
  smask = np.concatenate([pmask, np.ones((2, n), np.int32)], axis=1)
  lg = _logits(params, CFG, images[:2], seq, smask)[:, 4:-1]          # predicts generated tokens 0..n-1
  ref = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), out["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref), atol=1e-5, rtol=0)
  # the greedy path follows the uncached argmax
  greedy = vlm.generate(params, CFG, images[:2], prompt, pmask, jax.random.PRNGKey(7), max_new_tokens=n,
                        eos_id=None, pad_id=0, greedy=True)
  seq = np.concatenate([prompt, np.asarray(greedy["tokens"])], axis=1)
  lg = _logits(params, CFG, images[:2], seq, smask)[:, 4:-1]
  np.testing.assert_array_equal(np.asarray(jnp.argmax(lg, -1)), np.asarray(greedy["tokens"]))


def test_no_prefix_path_is_unchanged():
  """prefix_embeds=None is the old token path; a prefix made of the tokens' own embeddings gives
  the same hidden states bit for bit (concat + position add == gather + position add)."""
  p = _params()["gpt"]
  tokens = jnp.asarray(_tokens(2, 8, seed=5))
  mask = jnp.asarray(np.array([[1] * 8, [0, 0] + [1] * 6], np.int32))
  plain, _ = gpt.forward(p, GPT, tokens, mask)
  np.testing.assert_array_equal(np.asarray(gpt.logits(p, GPT, tokens, mask)),
                                np.asarray(gpt.unembed(p, GPT, plain)))
  prefix = p["wte"][tokens[:, :3]]
  split, _ = gpt.forward(p, GPT, tokens[:, 3:], mask, prefix_embeds=prefix)
  np.testing.assert_array_equal(np.asarray(split), np.asarray(plain))


# ------------------------------------------------------------------ image world and gold checker
def test_image_world_renders_its_tasks():
  ds = iw.dataset(24, seed=2)
  assert [s["task"]["family"] for s in ds[:6]] == list(iw.FAMILIES)
  for s in ds:
    assert s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
    np.testing.assert_array_equal(iw.render(s["task"]), s["image"])
    assert s["prompt"].startswith(iw.IMAGE_TOKEN) and iw.score(s, s["answer"]) == 1.0
    t = s["task"]
    if t["family"] == "digit":   # the digit's ink is its font bitmap, scaled 3x
      o = t["objects"][0]
      ink = s["image"][o["y"]:o["y"] + 21, o["x"]:o["x"] + 15].any(-1)
      np.testing.assert_array_equal(ink, np.kron(iw.FONT[o["digit"]], np.ones((3, 3), bool)))
    if t["family"] == "count":
      colours = [o["colour"] for o in t["objects"]]
      assert colours.count(t["colour"]) == int(t["answer"])
      assert (s["image"] == iw.COLOURS[t["colour"]]).all(-1).any()
    if t["family"] == "relation":
      a, b = t["objects"]
      dx, dy = b["x"] - a["x"], b["y"] - a["y"]
      want = {"left": dx, "right": -dx, "above": dy, "below": -dy}[t["answer"]]
      assert want >= 14 and min(abs(dx), abs(dy)) <= 4
  assert iw.dataset(5, seed=2)[4]["answer"] == ds[4]["answer"]


def test_gold_checker_hand_cases():
  shape = {"family": "shape", "answer": "circle", "objects": []}
  assert iw.score(shape, "circle") == 1.0
  assert iw.score(shape, " Circle. ") == 1.0
  assert iw.score(shape, "circle<|endoftext|> junk") == 1.0
  assert iw.score(shape, "it is a circle") == pytest.approx(math.exp(-3 / 20))    # 3 filler words
  assert iw.score(shape, "circle or square") == pytest.approx(math.exp(-1 / 20) * 0.5)   # a hedge
  assert iw.score(shape, "square") == iw.FORMAT_CREDIT                              # answer-shaped, wrong
  assert iw.score(shape, "hello there") == 0.0 and iw.score(shape, "") == 0.0
  count = {"family": "count", "answer": "3", "objects": []}
  assert iw.score(count, "3") == 1.0
  assert iw.score(count, "4") == pytest.approx(0.2) and iw.score(count, "5") == pytest.approx(0.1)
  assert iw.score(count, "there are 4") == pytest.approx(0.2 * math.exp(-2 / 20))
  digit = {"family": "digit", "answer": "7", "objects": []}
  assert iw.score(digit, "8") == iw.FORMAT_CREDIT                                   # no numeric credit
  cap = {"family": "caption", "answer": "red circle blue square", "objects": []}
  assert iw.score(cap, "red circle blue square") == 1.0
  assert iw.score(cap, "red circle") == pytest.approx(0.25)                         # half the caption
  assert iw.score(cap, "blue square red circle") == pytest.approx(0.5 * 2 / 4 * 0.25)
  assert iw.score(cap, "a red circle and a blue square") == pytest.approx(0.5 * 4 / 4 * math.exp(-3 / 20))
  rel = {"family": "relation", "answer": "left", "objects": []}
  assert iw.score(rel, "left") == 1.0 and iw.score(rel, "right") == iw.FORMAT_CREDIT
  assert iw.score({"task": json.dumps(rel)}, "left") == 1.0
  with pytest.raises(ValueError, match="unknown family"):
    iw.score({"family": "colour", "answer": "red"}, "red")


# ------------------------------------------------------------------ bad input
def test_bad_images_raise_one_clear_error(tmp_path):
  good = iw.dataset(1)[0]["image"]
  for bad, msg in [(good[..., 0], r"must be \[H,W,C\]"), (np.zeros((32, 32, 4), np.uint8), "3 channels"),
                   (np.zeros((16, 16, 3), np.uint8), "must be 32x32"),
                   (good.astype(np.int32), "dtype must be uint8"),
                   (good.astype(np.float32), r"lie in \[0, 1\]")]:
    with pytest.raises(ValueError, match=msg):
      iw.check_image(bad)
  with pytest.raises(ValueError, match="must be float"):
    vit.encode(_params()["vit"], VIT, jnp.asarray(good[None]))
  with pytest.raises(ValueError, match=r"must be \[B,32,32,3\]"):
    vit.encode(_params()["vit"], VIT, jnp.zeros((1, 32, 32, 1)))
  # PNGs: a round trip, a corrupt file, a truncated file, a JPEG
  path = tmp_path / "ok.png"
  iw.save_png(path, good)
  np.testing.assert_array_equal(iw.load_png(path), good)
  (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  data = path.read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  for name in ("junk.png", "cut.png"):
    with pytest.raises(ValueError, match=f"{name} is not a readable PNG"):
      iw.load_png(tmp_path / name)
  from PIL import Image
  Image.fromarray(good).save(tmp_path / "a.jpg", format="JPEG")
  with pytest.raises(ValueError, match="not a PNG"):
    iw.load_png(tmp_path / "a.jpg")
  iw.save_png(tmp_path / "small.png", good[:16, :16])
  with pytest.raises(ValueError, match="small.png: image must be 32x32"):
    iw.load_png(tmp_path / "small.png")


def test_bad_prompts_and_prefixes_raise():
  assert iw.check_prompt_images("<image> what is it?", 1) == 1
  assert iw.check_prompt_images("no marker", 1) == 0
  with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but only 1 image"):
    iw.check_prompt_images("<image> and <image>", 1)
  p = _params()
  with pytest.raises(ValueError, match="prefix_embeds"):
    gpt.forward(p["gpt"], GPT, jnp.zeros((1, 3), jnp.int32), prefix_embeds=jnp.zeros((1, 2, 16)))
  with pytest.raises(ValueError, match="one image per row"):
    vlm.logits(p, CFG, _images()[:1], jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="exceed the decoder's max_len"):
    vlm.logits(p, CFG, _images()[:1], jnp.zeros((1, 40), jnp.int32))
  with pytest.raises(ValueError, match="vit.py: ViTConfig.patch_size=5 must divide"):
    vit.ViTConfig(image_size=32, patch_size=5)


def test_rope_gqa_decoder_with_image_prefix_padding_and_cache():
  """Llama-style decoder (RoPE, RMSNorm, SwiGLU, 2 K/V heads): left padding and the KV cache."""
  cfg = vlm.VLMConfig(VIT, GPTConfig(vocab_size=64, max_len=48, n_layer=2, n_head=4, d_model=32, dropout=0.0,
                                     position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                                     qkv_bias=False))
  params, images = vlm.init(cfg, jax.random.PRNGKey(1)), _images()[:2]
  prompt = _tokens(2, 5, seed=6)
  pmask = np.ones((2, 5), np.int32)
  pmask[1, :3] = 0
  n = 4
  out = vlm.generate(params, cfg, images, prompt, pmask, jax.random.PRNGKey(3), max_new_tokens=n,
                     eos_id=None, pad_id=0)
  seq = np.concatenate([prompt, np.asarray(out["tokens"])], axis=1)
  smask = np.concatenate([pmask, np.ones((2, n), np.int32)], axis=1)
  lg = _logits(params, cfg, images, seq, smask)
  ref = jnp.take_along_axis(jax.nn.log_softmax(lg[:, 4:-1], -1), out["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref), atol=1e-5, rtol=0)
  alone = _logits(params, cfg, images[1:], seq[1:, 3:])
  np.testing.assert_allclose(np.asarray(lg[1, 3:]), np.asarray(alone[0]), atol=1e-5, rtol=0)
