"""Image input (issue 15): a tiny LLaVA-style VLM on the numpy-rendered image world.

  python -m rlhf_jax.main --config experiments/vision_tiny.py --workdir runs/vision
  python -m rlhf_jax.main --config experiments/vision_tiny.py --workdir runs/vision_smoke --config.preset=smoke

Stages (`recipes/vision.py`): alignment (projector only, ViT and decoder frozen, on captions),
then multimodal SFT (`sft.trainable`: all | decoder_projector), then the accuracy (mean gold
score, `image_world.score`) per task family on held-out samples, with the image and with the
image blanked (all zeros: the text-only baseline); then (`rlhf`, on by default) RLHF on image
prompts (`recipes/vision_rlhf.py`): a K-wise RM on gold-ranked SFT answers, PPO against it, and
SFT vs PPO on the same held-out samples (W/T/L, bootstrap CI). Writes results.json, results.md
(the tables) and plots/. The ViT and the decoder start random (`vit_from`: an HF SigLIP tower).

  # accuracy against model size (small, default without RLHF, large):
  python -m rlhf_jax.main --config experiments/vision_tiny.py --workdir runs/vision_sizes --sweep
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.data import image_world as iw
from rlhf_jax.recipes import vision
from rlhf_jax.train import ppo

_SMOKE_STAGE = {"n_train": 96, "batch_size": 8, "eval_batches": 1, "loop.log_every": 5, "loop.ckpt_every": 10,
                "optim.warmup_steps": 2}
PRESETS = {
    # Sized for ~10 minutes on 2 CPU cores.
    "default": {},
    # Model size (issue 15): the same recipe and data at 1/4 and ~3x the default's parameters
    # (`get_sweep`: small, default, large; RLHF off there, it is the default run's).
    "small": {"vit.d_model": 32, "vit.n_layer": 1, "vit.n_head": 2, "gpt.d_model": 32, "gpt.n_layer": 1,
              "gpt.n_head": 2, "rlhf": False},
    "large": {"vit.d_model": 96, "vit.n_layer": 3, "vit.n_head": 4, "gpt.d_model": 96, "gpt.n_layer": 3,
              "gpt.n_head": 4, "rlhf": False},
    # < 60 s on one core: what the tests run.
    "smoke": {"vit.d_model": 32, "vit.n_layer": 1, "vit.n_head": 2, "gpt.d_model": 32, "gpt.n_layer": 1,
              "gpt.n_head": 2, "data.tokenizer_n": 300,
              **{f"align.{k}": v for k, v in _SMOKE_STAGE.items()}, "align.loop.num_steps": 10,
              **{f"sft.{k}": v for k, v in _SMOKE_STAGE.items()}, "sft.loop.num_steps": 20,
              "eval.n_per_family": 4, "eval.batch_size": 8,
              "rm.n_train": 320, "rm.n_eval": 160, "rm.k_max": 4, "rm.sample_batch_size": 320, "rm.n_norm_demos": 8,
              "rm.batch_size": 8, "rm.loop.num_steps": 4, "rm.loop.log_every": 2, "rm.optim.warmup_steps": 1,
              "ppo.batch_size": 8, "ppo.n_prompts": 32, "ppo.loop.num_steps": 3, "ppo.loop.log_every": 1,
              "ppo.loop.ckpt_every": 2, "ppo.ppo.num_minibatches": 2, "ppo.ppo.value_warmup_iters": 1},
}


def _stage(trainable: str, families: str, n_train: int, steps: int, lr: float) -> mlc.ConfigDict:
  loop = rcfg.loop(num_steps=steps, log_every=25, ckpt_every=200, progress=False)
  loop.tensorboard = False
  return mlc.ConfigDict(dict(trainable=trainable, families=families, n_train=n_train, batch_size=32,
                             eval_batches=4, loop=loop,
                             optim=rcfg.optim(lr=lr, total_steps=steps, warmup_steps=20, weight_decay=0.01)))


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.max_len = 52            # text tokens per row (the longest prompt, a relation question, is ~41; PPO
                            # prompts get max_len - ppo.max_new_tokens)
  c.vit = mlc.ConfigDict(dict(image_size=32, patch_size=8, channels=3, d_model=64, n_layer=2, n_head=4,
                              mlp_ratio=2, pool="none"))   # 16 image tokens
  c.vit_from = ""           # an HF SigLIP directory (hf_vision.load_vision_tower) for 32x32 images; "" = vit
  c.gpt = mlc.ConfigDict(dict(n_layer=2, n_head=4, d_model=64, dropout=0.0))
  c.data = mlc.ConfigDict(dict(vocab_size=360, tokenizer_n=600, train_seed=0, eval_seed=1))
  c.mesh = rcfg.mesh()
  c.align = _stage("projector", "caption", n_train=2000, steps=150, lr=3e-3)
  c.sft = _stage("all", ",".join(iw.FAMILIES), n_train=40000, steps=4000, lr=2e-3)
  c.eval = mlc.ConfigDict(dict(n_per_family=50, batch_size=50, max_new_tokens=8))
  # RLHF on image prompts (recipes/vision_rlhf.py): the K-wise RM on gold-ranked SFT samples, then PPO.
  c.rlhf = True
  c.data.rm_seed, c.data.ppo_seed = 2, 3
  # Chosen on dev samples (data.eval_seed=5, never the eval stream): lr 1e-4 x 150 steps on 2,000 prompts
  # of T = 0.7 SFT answers left the RM at chance (held-out pair accuracy 0.48); a third of each prompt's
  # K from the image-blanked SFT model (answers that ignore the image), T = 1, 4,000 prompts, lr 1e-3
  # x 400 steps: held-out 0.74, on SFT-with-image pairs 0.59 (8,000 prompts x 800 steps: the same 0.59).
  rm_loop = rcfg.loop(num_steps=400, log_every=25, ckpt_every=100, progress=False)
  rm_loop.tensorboard = False
  c.rm = mlc.ConfigDict(dict(n_train=4000, n_eval=300, k_min=4, k_max=9, temperature=1.0, blank_fraction=0.34,
                             max_new_tokens=8, sample_batch_size=256, n_norm_demos=256, batch_size=32, loop=rm_loop,
                             optim=rcfg.optim(lr=1e-3, total_steps=400, warmup_steps=10, weight_decay=0.0)))
  # PPO on dev: lr 5e-5, beta 0.1, 60 x 64 rollouts moved greedy gold 0.607 -> 0.640 (sampled 0.608 -> 0.566);
  # lr 1e-4 / beta 0.2: 0.597 / 0.539; lr 3e-4 / beta 0.05: the RM was over-optimised (RM score -0.14 -> 0.17,
  # gold 0.61 -> 0.37 by iteration 80).
  ppo_sec = ppo.default_config()
  ppo_sec.update(dict(max_new_tokens=8, temperature=0.7, kl_target=0.0, init_kl_beta=0.1, ppo_epochs=2,
                      num_minibatches=4, value_warmup_iters=3))
  ppo_loop = rcfg.loop(num_steps=60, log_every=5, ckpt_every=20, progress=False)
  ppo_loop.tensorboard = False
  c.ppo = mlc.ConfigDict(dict(
      batch_size=64, n_prompts=4000, ppo=ppo_sec, loop=ppo_loop,
      optim=rcfg.optim(lr=5e-5, warmup_steps=0, weight_decay=0.0, schedule="constant", grad_clip=1.0),
      value_optim=rcfg.optim(lr=1e-4, warmup_steps=0, weight_decay=0.0, schedule="constant", grad_clip=1.0)))
  return c


def get_sweep():
  """Accuracy against model size: small, default (without RLHF), large."""
  return [{"preset": "small"}, {"rlhf": False}, {"preset": "large"}]


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  return vision.run(config, workdir)
