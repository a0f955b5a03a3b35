"""Image input (issue 15), the training recipe: LLaVA's two stages on the image world, then the
accuracy per task family with the image and with the image blanked (the text-only baseline).

  stage "align"  (workdir/align): the projector only (ViT and decoder frozen), on `align.families`
                 (default: captions), response-only LM loss (`steps.vlm_loss_fn`)
  stage "sft"    (workdir/sft):   multimodal SFT on `sft.families` (default: all six), training
                 `sft.trainable`: "all" (ViT + projector + decoder; the default here, the ViT is
                 random, not a pretrained CLIP/SigLIP) or "decoder_projector" (LLaVA's stage 2)
  eval:          greedy answers (`vlm.generate`) to `eval.n_per_family` held-out samples per family
                 (their own stream, `data.eval_seed`), mean gold score (`image_world.score`) per
                 family, once with the image and once with an all-zero image ("blank")
  rlhf (config.rlhf): the K-wise RM and PPO on image prompts, then SFT vs PPO on the same held-out
                 samples (`recipes/vision_rlhf.py`: stages workdir/rm and workdir/ppo)
The encoder starts random, or from an HF SigLIP tower for 32x32 images (`config.vit_from`,
`model/hf_vision.py`).

Both stages run through `supervised.fit` (the shared loop: exact resume from the stage's
checkpoints, including the data iterator's position). Frozen subtrees are not in the train
state: `steps.vlm_loss_fn(cfg, frozen)` closes over them, so they get no gradients, no Adam
moments and no weight decay and stay bit-identical; a resumed run re-creates them from the seed
(the init) and from the align stage's checkpoint.

Config (`experiments/vision_tiny.py`): seed, max_len (text tokens per row, after the image
tokens), vit (`vit.ViTConfig` fields), gpt (`GPTConfig` fields; vocab_size and max_len are
derived), data {vocab_size, tokenizer_n, train_seed, eval_seed}, mesh, align / sft {trainable,
families, n_train, batch_size, optim, loop, eval_batches}, eval {n_per_family, batch_size,
max_new_tokens}.
Writes workdir/results.json, workdir/results.md (the tables) and workdir/plots/*.png; returns the
results dict.
Each finished stage also records itself for `load_vision_stage` (e.g. `python -m rlhf_jax.chat
--workdir runs/vision --image x.png`): workdir/<stage>/stage.json (stage "vision_align" /
"vision_sft", the decoder's GPTConfig as "model", the ViT's as "vit", the seed, the trained
subtrees of each stage so far, eval.max_new_tokens) and the tokenizer in workdir/<stage>/tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import jax
import ml_collections as mlc
import numpy as np

from rlhf_jax.data import batching, chat_format
from rlhf_jax.data import image_world as iw
from rlhf_jax.data import pipeline
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model import vit, vlm
from rlhf_jax.model.config import GPTConfig
from rlhf_jax.train import checkpoint, loop, stages, steps, supervised

_WHERE = "rlhf_jax/recipes/vision.py"
TRAINABLE = {"projector": ("projector",), "decoder_projector": ("projector", "gpt"),
             "all": ("vit", "projector", "gpt")}
STAGES = ("align", "sft")
# stage.json "stage" of each sub-stage that holds a policy, in the order load_vision_stage rebuilds them
# ("ppo": recipes/vision_rlhf.py; its checkpoint's policy is the decoder)
STAGE_KINDS = {name: f"vision_{name}" for name in STAGES + ("ppo",)}


# ------------------------------------------------------------------ model and tokenizer
def tokenizer(config) -> tok_lib.Tokenizer:
  """A byte-level BPE trained on the prompts and answers of `data.tokenizer_n` samples (a pure
  function of the config, so a resumed run gets the same vocabulary)."""
  return tok_lib.train_bpe(iw.text_corpus(int(config.data.tokenizer_n), int(config.data.train_seed)),
                           int(config.data.vocab_size))


def vision_tower(config):
  """(ViTConfig, ViT params or None): `config.vit_from` (an HF SigLIP directory, `hf_vision`; its
  pooling head, if any, dropped) when set, else the `vit` section and None (random init)."""
  if config.get("vit_from"):
    from rlhf_jax.model import hf_vision
    vcfg, vparams = hf_vision.load_vision_tower(config.vit_from, drop_head=True)
    if vcfg.image_size != iw.SIZE or vcfg.channels != iw.CHANNELS:
      raise ValueError(f"{_WHERE}: config.vit_from={config.vit_from} takes {vcfg.image_size}x{vcfg.image_size}x"
                       f"{vcfg.channels} images; the image world draws {iw.SIZE}x{iw.SIZE}x{iw.CHANNELS}")
    return vcfg, jax.device_get(vparams)
  return vit._as_config(config.vit.to_dict()), None


def model_config(config, tok, vit_config=None) -> vlm.VLMConfig:
  """VLMConfig from the `vit` (or `vit_from`) and `gpt` sections; the decoder's window = image
  tokens + max_len. vit_config: the encoder's config when the caller already has it (`vision_tower`)."""
  vcfg = vit_config or vision_tower(config)[0]
  g = config.gpt.to_dict()
  derived = sorted({"vocab_size", "max_len"} & set(g))
  if derived:
    raise ValueError(f"{_WHERE}: config.gpt.{derived[0]} is derived (tokenizer size, image tokens + "
                     "config.max_len); do not set it")
  gcfg = GPTConfig.from_dict({**g, "vocab_size": tok.vocab_size, "max_len": vcfg.num_tokens + int(config.max_len)})
  return vlm.VLMConfig(vcfg, gcfg)


def split_params(params: dict, trainable: str) -> tuple[dict, dict]:
  """(trained subtrees, frozen subtrees) of VLM params for `trainable` (a key of TRAINABLE)."""
  if trainable not in TRAINABLE:
    raise ValueError(f"{_WHERE}: trainable={trainable!r}; choose from {sorted(TRAINABLE)}")
  keys = TRAINABLE[trainable]
  return {k: v for k, v in params.items() if k in keys}, {k: v for k, v in params.items() if k not in keys}


# ------------------------------------------------------------------ stages
def _families(value) -> tuple[str, ...]:
  items = [value] if isinstance(value, str) else list(value)
  fams = tuple(f.strip() for item in items for f in str(item).split(",") if f.strip())
  bad = [f for f in fams if f not in iw.FAMILIES]
  if bad or not fams:
    raise ValueError(f"{_WHERE}: families {list(fams)}: unknown {bad}; choose from {list(iw.FAMILIES)}")
  return fams


def stage_config(config, name: str) -> mlc.ConfigDict:
  """The `supervised.fit` config of stage `name`: seed, mesh, and the stage's batch_size, optim,
  loop (optim.total_steps tied to loop.num_steps, which must be set: no epochs here)."""
  s = config[name]
  if int(s.loop.num_steps) < 1:
    raise ValueError(f"{_WHERE}: config.{name}.loop.num_steps must be >= 1, got {s.loop.num_steps}")
  c = mlc.ConfigDict(dict(seed=int(config.seed), batch_size=int(s.batch_size), mesh=config.mesh.to_dict(),
                          optim=s.optim.to_dict(), loop=s.loop.to_dict()))
  c.optim.total_steps = int(s.loop.num_steps)
  return c


def train_stage(config, name: str, workdir: str, cfg: vlm.VLMConfig, tok, params: dict, hooks=()):
  """Trains stage `name` ("align" / "sft") from full VLM params; returns (full params after the
  stage, host numpy; a summary dict with the logged train losses and the held-out loss)."""
  s = config[name]
  families = _families(s.families)
  train, frozen = split_params(params, str(s.trainable))
  stage_dir = os.path.join(workdir, name)
  # Each stage its own sample stream (seeded by the stage's index), held-out loss on the eval stream.
  seed = int(config.data.train_seed) * 10 + STAGES.index(name)
  batches = iw.image_batches(tok, int(s.batch_size), int(config.max_len), n=int(s.n_train), seed=seed,
                             shuffle_seed=int(config.seed), families=families)
  held = iw.image_batches(tok, int(s.batch_size), int(config.max_len), n=int(s.batch_size) * int(s.eval_batches),
                          seed=int(config.data.eval_seed) * 10 + STAGES.index(name), families=families)
  evals = [next(held) for _ in range(int(s.eval_batches))]
  axes = vlm.param_axes(cfg)
  t0 = time.perf_counter()
  state, last, _ = supervised.fit(
      stage_config(config, name), stage_dir, loss_fn=steps.vlm_loss_fn(cfg, frozen),
      param_axes={k: axes[k] for k in train}, params=train, host_batches=batches, eval_batches=evals,
      eval_weight_key="num_tokens", name=name, hooks=hooks)
  trained = jax.device_get(state["params"])
  write_vision_stage(config, cfg, tok, name, stage_dir)
  losses = {int(h["step"]): float(h[f"{name}/loss"]) for h in loop.read_metrics(stage_dir) if f"{name}/loss" in h}
  steps_done = sorted(losses)
  summary = {"trainable": str(s.trainable), "trained_subtrees": sorted(train), "families": list(families),
             "steps": int(s.loop.num_steps), "n_train": int(s.n_train),
             "num_trained_params": vit.num_params(trained),
             "first_logged_loss": losses[steps_done[0]] if steps_done else None,
             "final_loss": losses[steps_done[-1]] if steps_done else None,
             "eval_loss": last.get("eval/loss"), "eval_token_accuracy": last.get("eval/accuracy"),
             "seconds": round(time.perf_counter() - t0, 1)}
  return {**jax.device_get(frozen), **trained}, summary


def write_vision_stage(config, cfg: vlm.VLMConfig, tok, name: str, stage_dir: str) -> None:
  """stage.json (+ tokenizer) of the finished sub-stage `name` (a key of STAGE_KINDS): the configs,
  the seed, vit_from, and the subtrees each stage up to this one trained (what `load_vision_stage`
  reads back)."""
  done = list(STAGE_KINDS)[:list(STAGE_KINDS).index(name) + 1]
  trained = {n: ["gpt"] if n == "ppo" else list(TRAINABLE[str(config[n].trainable)]) for n in done}
  stages.write_stage(stage_dir, STAGE_KINDS[name], cfg.gpt, tok, vit=dataclasses.asdict(cfg.vit),
                     seed=int(config.seed), vit_from=str(config.get("vit_from", "") or ""), trained=trained,
                     max_new_tokens=int(config.eval.max_new_tokens))


def load_vision_stage(workdir: str):
  """(stage info, VLMConfig, tokenizer, full VLM params) of a finished vision stage: workdir is
  a stage directory (workdir/align, workdir/sft, workdir/ppo) or a vision run's workdir (its sft stage).

  The params are rebuilt as the run built them: `vlm.init` from the recorded seed (and the recorded
  `vit_from` tower), then each
  stage's checkpoint (its trained subtrees) over it, in order. Raises ValueError when the
  directory is not a vision stage (a text-only stage, or nothing recorded)."""
  path = workdir
  if not stages.is_stage_dir(path) and stages.is_stage_dir(os.path.join(workdir, "sft")):
    path = os.path.join(workdir, "sft")
  if not stages.is_stage_dir(path):
    raise ValueError(f"{_WHERE}: {workdir} is not a vision stage: no stage.json there or in its sft/ "
                     "(train one with python -m rlhf_jax.main --config experiments/vision_tiny.py; a run "
                     "from before stages were recorded records them when re-run in the same workdir)")
  info = stages.read_stage(path)
  if info.get("stage") not in STAGE_KINDS.values() or "vit" not in info:
    raise ValueError(f"{_WHERE}: {path} holds a {info.get('stage')!r} stage (a text-only model); an image "
                     f"needs a vision stage ({', '.join(STAGE_KINDS.values())}: experiments/vision_tiny.py)")
  cfg = vlm.VLMConfig(vit._as_config(info["vit"]), GPTConfig(**info["model"]))
  tok = tok_lib.load(os.path.join(path, "tokenizer"))
  params = jax.device_get(vlm.init(cfg, jax.random.PRNGKey(int(info["seed"]))))
  if info.get("vit_from"):   # the pretrained encoder the run started from
    params["vit"] = vision_tower(mlc.ConfigDict({"vit_from": info["vit_from"]}))[1]
  run_dir = os.path.dirname(os.path.abspath(path))
  for name in info["trained"]:
    trained = checkpoint.load_params(os.path.join(run_dir, name, "checkpoints"))
    if name == "ppo":   # an RL state: its policy is the decoder
      trained = {"gpt": trained}
    if sorted(trained) != sorted(info["trained"][name]):
      raise ValueError(f"{_WHERE}: {run_dir}/{name}/checkpoints holds {sorted(trained)}, but stage.json "
                       f"records {sorted(info['trained'][name])} trained there")
    params = {**params, **jax.device_get(trained)}
  return info, cfg, tok, params


# ------------------------------------------------------------------ evaluation
def _prompt_row(tok, s: dict, max_prompt_len: int) -> dict:
  """A sample's generation row: its image and its chat prompt left-padded to max_prompt_len; a prompt
  that does not fit is an error (a cut prompt would lose its <image> marker or the question's start)."""
  messages = iw.demonstration(s)["messages"]
  n_ids = len(chat_format.encode_prompt(tok, messages))
  if n_ids > max_prompt_len:
    raise ValueError(f"{_WHERE}: a {s['task']['family']} prompt has {n_ids} tokens, more than the "
                     f"{max_prompt_len} left by max_len - eval.max_new_tokens + 1; raise config.max_len")
  tokens, mask = pipeline.encode_prompt_left_padded(tok, messages, max_prompt_len)
  return {"images": iw.stack_images([s["image"]])[0], "tokens": tokens, "mask": mask}


def answers(params, cfg: vlm.VLMConfig, tok, samples: Sequence[dict], *, blank: bool, batch_size: int,
            max_prompt_len: int, max_new_tokens: int, temperature: float | None = None, rng=None) -> list[str]:
  """Answers (text up to the first stop token) to samples' prompts, reading each sample's image, or
  an all-zero image when blank: greedy (temperature None), else sampled at `temperature` with
  fold_in(rng, batch index). Fixed shapes (the last batch padded): one compile. A sample listed
  several times (K answers each) is encoded once.
  Raises ValueError when a prompt does not fit max_prompt_len (it would be cut)."""
  greedy = temperature is None
  rows = {}
  for s in samples:
    if id(s) not in rows:
      rows[id(s)] = _prompt_row(tok, s, max_prompt_len)
  padded = batching.pad_to_batches([rows[id(s)] for s in samples], batch_size)
  out = []
  for i, b in enumerate(padded.batches):
    images = np.zeros_like(b["images"]) if blank else b["images"]
    key = jax.random.PRNGKey(0) if greedy else jax.random.fold_in(rng, i)
    gen = vlm.generate(params, cfg, images, b["tokens"], b["mask"], key, max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=greedy,
                       temperature=1.0 if greedy else float(temperature))
    out.append(np.asarray(gen["tokens"]))
  texts = []
  for row in (padded.unpad(out) if out else []):
    ids = [int(t) for t in row]
    cut = next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))
    texts.append(tok.decode(ids[:cut]))
  return texts


def eval_samples(config) -> list[dict]:
  """The held-out samples: `eval.n_per_family` of each family from the stream `data.eval_seed`."""
  n = int(config.eval.n_per_family) * len(iw.FAMILIES)
  return [iw.sample_at(int(config.data.eval_seed) * 10 + 7, i) for i in range(n)]   # cycles the families


def _by_family(samples, scores) -> dict:
  by = {f: np.asarray([sc for s, sc in zip(samples, scores) if s["task"]["family"] == f]) for f in iw.FAMILIES}
  by["mean"] = np.asarray(scores, np.float64)
  return by


def family_means(samples, scores) -> dict:
  """{family (and "mean"): mean of the per-sample scores}."""
  return {f: float(v.mean()) for f, v in _by_family(samples, scores).items()}


def evaluate(params, cfg: vlm.VLMConfig, tok, config) -> dict:
  """{"with_image" / "blank_image": {family (and "mean"): mean gold score}, "se_with_image" /
  "se_blank_image": their standard errors, "n_per_family", "examples_*"} on `eval_samples`, greedy."""
  e = config.eval
  samples = eval_samples(config)
  kw = dict(batch_size=int(e.batch_size), max_prompt_len=int(config.max_len) - int(e.max_new_tokens) + 1,
            max_new_tokens=int(e.max_new_tokens))
  result = {"n_per_family": int(e.n_per_family)}
  for key, blank in (("with_image", False), ("blank_image", True)):
    resp = answers(params, cfg, tok, samples, blank=blank, **kw)
    scores = [iw.score(s, r) for s, r in zip(samples, resp)]
    by = _by_family(samples, scores)
    result[key] = {f: float(v.mean()) for f, v in by.items()}
    result[f"se_{key}"] = {f: float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for f, v in by.items()}
    result[f"examples_{key}"] = [{"family": s["task"]["family"], "answer": s["answer"], "response": r}
                                 for s, r in zip(samples[:len(iw.FAMILIES)], resp)]
  return result


def table(result: dict) -> str:
  """Markdown table: family | with image | blank image | gain (mean gold score +- its standard error)."""
  rows = ["| family | with image | blank image | gain |", "|---|---|---|---|"]
  for f in list(iw.FAMILIES) + ["mean"]:
    a, b = result["with_image"][f], result["blank_image"][f]
    sa, sb = result["se_with_image"][f], result["se_blank_image"][f]
    rows.append(f"| {f} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} | {a - b:+.3f} |")
  return "\n".join(rows) + "\n"


def write_plots(result: dict, workdir: str) -> list[str]:
  """workdir/plots/: families.png (gold per family with vs blank image) and, after RLHF,
  rlhf_families.png (SFT vs PPO, greedy and sampled) and ppo_trust_region.png (the PPO traces)."""
  from rlhf_jax.eval import plots
  cats = list(iw.FAMILIES) + ["mean"]
  ev = result["eval"]
  out = [plots.plot_grouped_bars({"with image": ev["with_image"], "blank image": ev["blank_image"]},
                                 os.path.join(workdir, "plots", "families.png"), categories=cats,
                                 ylabel="mean gold score", title="image world: SFT model, greedy answers")]
  if result.get("rlhf"):
    r = result["rlhf"]
    groups = {f"{n} {m}": r[m][n] for m in ("greedy", "sampled") for n in r[m]}
    out.append(plots.plot_grouped_bars(groups, os.path.join(workdir, "plots", "rlhf_families.png"), categories=cats,
                                       ylabel="mean gold score", title="RLHF on image prompts: SFT vs PPO"))
    out.append(plots.plot_ppo_curves({"ppo": loop.read_metrics(os.path.join(workdir, "ppo"))},
                                     os.path.join(workdir, "plots", "ppo_trust_region.png"),
                                     panels=(("ppo/score", "RM reward"), ("ppo/kl", "KL to SFT"),
                                             *plots.TRUST_PANELS[:3])))
  return out


def size_table(runs: dict) -> str:
  """Markdown: accuracy per family (with the image; blank in parentheses) for runs of several
  sizes. runs: {label: results.json dict of a vision run}."""
  rows = ["| model | params (ViT + projector + decoder) | " + " | ".join(iw.FAMILIES) + " | mean |",
          "|---|---|" + "---|" * (len(iw.FAMILIES) + 1)]
  for label, r in runs.items():
    ev = r["eval"]
    n = sum(r["num_params"].values())
    rows.append(f"| {label} | {n:,} | " + " | ".join(f"{ev['with_image'][f]:.3f} ({ev['blank_image'][f]:.2f})"
                                                     for f in list(iw.FAMILIES) + ["mean"]) + " |")
  return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ the recipe
def run(config, workdir: str, hooks: dict | None = None) -> dict:
  """Alignment, multimodal SFT, evaluation; writes results.json and results.md in workdir.

  hooks: optional {stage name: loop hooks} (`loop.run`'s hook(step, state, metrics)).
  Re-running in the same workdir resumes each stage from its latest checkpoint."""
  t0 = time.perf_counter()
  if int(config.data.train_seed) == int(config.data.eval_seed):
    raise ValueError(f"{_WHERE}: config.data.eval_seed must differ from data.train_seed "
                     f"({config.data.train_seed}): the held-out samples need their own stream")
  do_rlhf = bool(config.get("rlhf", False))
  from rlhf_jax.recipes import vision_rlhf   # it imports this module
  if do_rlhf:
    vision_rlhf.check_seeds(config)   # before any training
  os.makedirs(workdir, exist_ok=True)
  tok = tokenizer(config)
  vcfg, tower = vision_tower(config)   # read once (an HF tower is loaded from disk)
  cfg = model_config(config, tok, vcfg)
  params = jax.device_get(vlm.init(cfg, jax.random.PRNGKey(int(config.seed))))
  if tower is not None:   # a pretrained encoder (SigLIP) instead of the random ViT
    params["vit"] = tower
  summaries = {}
  for name in STAGES:
    params, summaries[name] = train_stage(config, name, workdir, cfg, tok, params,
                                                 hooks=(hooks or {}).get(name, ()))
    print(f"{name}: {summaries[name]}")
  t_eval = time.perf_counter()
  ev = evaluate(params, cfg, tok, config)
  eval_seconds = round(time.perf_counter() - t_eval, 1)
  rlhf = None
  if do_rlhf:
    rm_params, summaries["rm"] = vision_rlhf.train_rm(config, workdir, cfg, tok, params)
    print(f"rm: { {k: v for k, v in summaries['rm'].items() if not isinstance(v, dict)} }")
    ppo_params, summaries["ppo"] = vision_rlhf.train_ppo(config, workdir, cfg, tok, params, rm_params,
                                                         hooks=(hooks or {}).get("ppo", ()))
    print(f"ppo: {summaries['ppo']['final']}")
    rlhf = vision_rlhf.compare({"sft": params, "ppo": ppo_params}, cfg, tok, config, rm_params=rm_params)
  result = {"stages": summaries, "eval": ev, "rlhf": rlhf, "vocab_size": tok.vocab_size,
            "image_tokens": cfg.num_image_tokens, "decoder_max_len": cfg.gpt.max_len,
            "num_params": {k: vit.num_params(v) for k, v in params.items()},
            "eval_seconds": eval_seconds,
            "total_seconds": round(time.perf_counter() - t0, 1)}
  md = table(ev)
  if rlhf is not None:
    md += "\nRLHF on image prompts (gold score per family; PPO vs SFT):\n\n" + vision_rlhf.table(rlhf)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(result, f, indent=2)
    result["plots"] = write_plots(result, workdir)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(md)
  print(md)
  return result
