"""InstructGPT step 1 — supervised fine-tuning on demonstrations (loss on response tokens only).

  python -m rlhf_jax.main --config experiments/sft_tiny.py --workdir runs/sft --config.init_from=runs/pretrain

Starts from a pretraining workdir (its params, model config and tokenizer). InstructGPT trained
16 epochs on ~13k demonstrations and saw validation loss overfit after 1 epoch while RM and RL
init kept improving; `epochs` is a config value, and the sweep runs 1 vs 4 vs 16.
"""
import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax.data import pipeline, synthetic
from rlhf_jax.data import builders
from rlhf_jax.model import gpt
from rlhf_jax.train import stages, steps, supervised

PRESETS = {
    "default": {},
    "smoke": {"data.n_train": 256, "data.n_eval": 64, "epochs": 1, "batch_size": 16, "loop.log_every": 4,
              "loop.ckpt_every": 8},
}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.init_from = "runs/pretrain"
  c.dropout = 0.0           # overrides the pretrained model's dropout for this stage
  # source: synthetic (built-in world) or a TFDS builder name (e.g. "oasst_rankings/sft",
  # "jsonl_demonstrations") read with builders.load(name, split, data_dir, manual_dir, data_files=...)
  # filler_rate (synthetic only): fraction of demonstrations wrapped in polite filler (imperfect labelers)
  c.data = mlc.ConfigDict(dict(source="synthetic", n_train=2000, n_eval=256, seed=0, filler_rate=0.0, data_dir="",
                               manual_dir="", data_files="", train_split="train", eval_split="eval"))
  c.max_len = 96
  c.epochs = 4
  c.batch_size = 32
  c.optim = rcfg.optim(lr=5e-4, warmup_steps=20, weight_decay=0.0, schedule="cosine")
  c.loop = rcfg.loop(num_steps=-1, log_every=20, ckpt_every=100)  # -1: epochs x records / batch
  c.mesh = rcfg.mesh()
  return c


def get_sweep():
  return [{"epochs": e} for e in (1, 4, 16)]


def load_records(data, split: str, n: int):
  if data.source == "synthetic":
    return synthetic.demonstrations(n, data.seed, split="eval" if split == data.eval_split else "train",
                                    filler_rate=data.get("filler_rate", 0.0))
  kwargs = {"data_files": data.data_files} if data.data_files else {}
  return builders.load(data.source, split, data.data_dir, manual_dir=data.manual_dir or None, **kwargs)


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  _, model_cfg, tok, params = stages.load_stage(config.init_from, expect=("pretrain", "sft"))
  model_cfg = model_cfg.__class__(**{**model_cfg.__dict__, "dropout": float(config.dropout)})
  stages.copy_tokenizer(config.init_from, workdir)
  train_recs = load_records(config.data, config.data.train_split, config.data.n_train)
  eval_recs = load_records(config.data, config.data.eval_split, config.data.n_eval)
  batches = pipeline.sft_batches(train_recs, tok, config.batch_size, config.max_len, seed=config.seed)
  if config.loop.num_steps < 0:
    with config.unlocked():
      config.loop.num_steps = max(1, config.epochs * batches.stats.kept // config.batch_size)
      config.optim.total_steps = config.loop.num_steps
  stages.write_stage(workdir, "sft", model_cfg, init_from=config.init_from, epochs=config.epochs,
                     train_stats=batches.stats.as_dict())
  state, last, _ = supervised.fit(
      config, workdir, loss_fn=steps.lm_loss_fn(model_cfg), param_axes=gpt.param_axes(model_cfg), params=params,
      host_batches=batches, eval_weight_key="num_tokens", name="sft",
      eval_batches=pipeline.sft_eval_batches(eval_recs, tok, config.batch_size, config.max_len))
  result = {"final_train_loss": last.get("loss"), "final_eval_loss": last.get("eval/loss"),
            "eval_token_accuracy": last.get("eval/accuracy"), "steps": config.loop.num_steps}
  print(result)
  return result

