"""Image input (issue 15), RLHF on multimodal prompts: InstructGPT's steps 2 and 3 after the
vision recipe's SFT (`recipes/vision.py`), with the image world's gold checker as the labeller.

  stage "rm"   (workdir/rm):  K ~ U[k_min, k_max] answers per training image prompt, sampled at
               `rm.temperature` from the SFT model, a `rm.blank_fraction` of them with the image
               blanked (`label`), ranked by `image_world.score` (ties share a rank;
               all-tied prompts are skipped and counted: `comparisons.label_comparisons`), cached
               as JSONL (comparisons_{train,eval,eval_on_policy}.jsonl: messages, responses, ranks,
               task; the image is redrawn from the task). The RM is the SFT decoder with a scalar head
               (`heads.from_lm`), trained with the K-wise loss (`steps.kwise_rm_loss_fn` with the
               image prefix) through `supervised.fit`; its bias is then shifted so the gold answers
               of `rm.n_norm_demos` prompts score mean 0 (InstructGPT).
  stage "ppo"  (workdir/ppo): PPO (`train.rl.fit_rl`) on image prompts of their own stream: the
               policy and the frozen reference start from the SFT decoder, the value model from
               the RM, the scorer is the RM; per-token KL penalty to SFT.

The image encoder (ViT + projector) is frozen after SFT and shared by the four models (LLaVA-RLHF
freezes its vision tower too): every decoder reads the same image tokens, computed once per batch
inside the jitted step (`ppo.make_rl_step(prefix_fn=...)`, state["vision"]).

Evaluation (`compare`): SFT and PPO answer the same held-out samples (the vision recipe's eval
stream), greedy and sampled at the PPO temperature; mean gold score per family, and PPO vs SFT
wins / ties / losses on the per-sample gold score with a bootstrap CI (`bootstrap.win_tie_loss`).

Config sections (`experiments/vision_tiny.py`): rm {n_train, n_eval, k_min, k_max, temperature, blank_fraction,
max_new_tokens, sample_batch_size, n_norm_demos, batch_size, optim, loop}, ppo
{batch_size, n_prompts, ppo (`train.ppo.default_config` keys), optim, value_optim, loop}; data
{rm_seed, ppo_seed} name the sample streams (the eval stream is the vision recipe's); train_seed,
eval_seed, rm_seed and ppo_seed must differ.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from rlhf_jax.data import batching, chat_format, comparisons, image_world as iw, pipeline
from rlhf_jax.eval import bootstrap
from rlhf_jax.model import heads, vlm
from rlhf_jax.recipes import vision
from rlhf_jax.train import loop, rl, rm_data, rollout, steps, supervised

_WHERE = "rlhf_jax/recipes/vision_rlhf.py"


def vision_params(params: dict) -> dict:
  """The frozen image encoder of VLM params: {"vit", "projector"}."""
  return {"vit": params["vit"], "projector": params["projector"]}


def _prefix_fn(cfg: vlm.VLMConfig, frozen: dict):
  frozen = jax.tree.map(jnp.asarray, frozen)
  return lambda images: vlm.image_tokens(frozen, cfg, images)


# ------------------------------------------------------------------ labelling
def _samples(seed: int, n: int, families) -> list[dict]:
  return [iw.sample_at(seed, i, families) for i in range(n)]


SPLITS = {"train": (0, None), "eval": (1, None), "eval_on_policy": (1, 0.0)}   # (stream, blank_fraction)


def label(config, workdir: str, cfg: vlm.VLMConfig, tok, params: dict, split: str) -> list[dict]:
  """Gold-ranked K-way comparisons of answers to `rm.n_{train,eval}` image prompts (cached as JSONL).

  Stream: data.rm_seed * 10 + (0 train, 1 eval). Per prompt K ~ U[k_min, k_max] answers (its own
  rng), from two policies as InstructGPT's comparisons came from several: round(K *
  rm.blank_fraction) from the SFT model with the image blanked (plausible answers that ignore the
  image), the rest from the SFT model with the image, shuffled. Split "eval_on_policy": the eval
  prompts with every answer from the SFT model with the image, at rm.temperature (the kind of pairs
  PPO's RM must judge; PPO samples at ppo.temperature). A cached file is reused only with the
  settings that made it (comparisons_<split>.jsonl.settings.json); other settings raise."""
  path = os.path.join(workdir, "rm", f"comparisons_{split}.jsonl")
  r = config.rm
  stream, blank_fraction = SPLITS[split]
  blank_fraction = float(r.blank_fraction) if blank_fraction is None else blank_fraction
  settings = {"split": split, "seed": int(config.seed), "rm_seed": int(config.data.rm_seed),
              "families": list(vision._families(config.sft.families)), "blank_fraction": blank_fraction,
              **{k: r[k] for k in ("n_train", "n_eval", "k_min", "k_max", "temperature", "max_new_tokens",
                                   "sample_batch_size")}}
  if os.path.exists(path):   # the cache is only valid for the settings that made it
    if not os.path.exists(path + ".settings.json"):
      raise ValueError(f"{_WHERE}: {path} has no {os.path.basename(path)}.settings.json (labelled before settings "
                       "were recorded): use a new workdir, or delete it and the rm/ stage to relabel")
    with open(path + ".settings.json") as f:
      cached = json.load(f)
    if cached != settings:
      diff = sorted(k for k in settings if cached.get(k) != settings[k])
      raise ValueError(f"{_WHERE}: {path} was labelled with other settings ({', '.join(f'{k}={cached.get(k)}' for k in diff)}; "
                       f"now {', '.join(f'{k}={settings[k]}' for k in diff)}): use a new workdir, or delete it and "
                       "the rm/ stage to relabel")
    with open(path) as f:
      return [json.loads(line) for line in f]
  if not 0.0 <= blank_fraction <= 1.0 or not 2 <= int(r.k_min) <= int(r.k_max):
    raise ValueError(f"{_WHERE}: need 0 <= rm.blank_fraction <= 1 and 2 <= rm.k_min <= rm.k_max, got "
                     f"{blank_fraction}, {r.k_min}, {r.k_max}")
  n = int(r.n_train if stream == 0 else r.n_eval)
  samples = _samples(int(config.data.rm_seed) * 10 + stream, n, vision._families(config.sft.families))
  k_max = int(r.k_max)
  flat = [s for s in samples for _ in range(k_max)]
  kw = dict(batch_size=int(r.sample_batch_size), max_prompt_len=int(config.max_len) - int(r.max_new_tokens) + 1,
            max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature))
  key = jax.random.PRNGKey(int(config.seed) * 2 + 11 + stream)
  texts = {blank: vision.answers(params, cfg, tok, flat, blank=blank, rng=jax.random.fold_in(key, blank), **kw)
           for blank in ((False, True) if blank_fraction > 0 else (False,))}
  rng = np.random.default_rng([int(config.seed), 15, stream])
  ks = rng.integers(int(r.k_min), k_max + 1, size=n)
  per = []
  for i, k in enumerate(ks):
    n_blank = int(round(int(k) * blank_fraction))
    mixed = texts[False][i * k_max:i * k_max + int(k) - n_blank]
    if n_blank:
      mixed = mixed + texts[True][i * k_max:i * k_max + n_blank]
    per.append([mixed[j] for j in rng.permutation(len(mixed))])
  records = comparisons.label_comparisons([iw.prompt_record(s) for s in samples], per, None, scorer=iw.score)
  print(f"vision rm: labelled {split}: {len(records)} of {n} prompts; {records.stats.summary()} "
        f"{records.stats.extra}")
  if jax.process_index() == 0:   # written whole, then renamed: a crash leaves no half file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for name, text in ((path + ".settings.json", json.dumps(settings)),
                       (path, "".join(json.dumps(rec) + "\n" for rec in records))):
      with open(name + ".tmp", "w") as f:
        f.write(text)
      os.replace(name + ".tmp", name)
  return list(records)


# ------------------------------------------------------------------ reward model
_REWARD_JIT = {}


def _rm_row(tok, s: dict, text: str, max_len: int) -> dict:
  """One RM row: the sample's image and its prompt + response + end of turn, right-padded to max_len."""
  prompt = chat_format.encode_prompt(tok, iw.demonstration(s)["messages"])
  resp = tok.chat.response_ids(text)
  ids = prompt + resp if len(prompt) + len(resp) <= max_len else prompt + resp[:max_len - len(prompt) - 1] + resp[-1:]
  if len(ids) > max_len:
    raise ValueError(f"{_WHERE}: a {s['task']['family']} prompt has {len(prompt)} tokens; the RM rows hold "
                     f"{max_len} (config.max_len)")
  tokens = np.full(max_len, tok.pad_id, np.int32)
  mask = np.zeros(max_len, np.int32)
  tokens[:len(ids)], mask[:len(ids)] = ids, 1
  return {"images": iw.stack_images([s["image"]])[0], "tokens": tokens, "mask": mask}


def rm_scores(rm_params, frozen: dict, cfg: vlm.VLMConfig, tok, samples, responses, batch_size: int = 64):
  """RM rewards float32 [N] of each sample's prompt + response + end of turn (read there), with the
  sample's image as the prefix; rows right-padded, a response that does not fit is cut before its
  end-of-turn token (an empty response is the end-of-turn token alone). Fixed batch shapes."""
  if cfg not in _REWARD_JIT:
    def fn(p, v, images, tokens, mask):
      return heads.rewards(p, cfg.gpt, tokens, mask, prefix_embeds=vlm.image_tokens(v, cfg, images))
    _REWARD_JIT[cfg] = jax.jit(fn)
  fn = _REWARD_JIT[cfg]
  max_len = cfg.gpt.max_len - cfg.num_image_tokens
  padded = batching.pad_to_batches([_rm_row(tok, s, r, max_len) for s, r in zip(samples, responses)], batch_size)
  out = [fn(rm_params, frozen, b["images"], b["tokens"], b["mask"]) for b in padded.batches]
  return padded.unpad(out) if out else np.zeros((0,), np.float32)


def check_seeds(config) -> None:
  """The sample streams (SFT train / eval, RM prompts, PPO prompts) must not share a seed."""
  seeds = {k: int(config.data[k]) for k in ("train_seed", "eval_seed", "rm_seed", "ppo_seed")}
  if len(set(seeds.values())) < len(seeds):
    raise ValueError(f"{_WHERE}: config.data {seeds}: every sample stream needs its own seed")


def train_rm(config, workdir: str, cfg: vlm.VLMConfig, tok, params: dict):
  """Labels, trains and centres the RM on image prompts; returns (RM params with the demonstration
  offset folded into the bias, host numpy; summary dict)."""
  t0 = time.perf_counter()
  r = config.rm
  train_recs = label(config, workdir, cfg, tok, params, "train")
  eval_recs = label(config, workdir, cfg, tok, params, "eval")
  on_policy = label(config, workdir, cfg, tok, params, "eval_on_policy")
  frozen = jax.device_get(vision_params(params))
  k_max, max_len = int(r.k_max), int(config.max_len)
  batches = pipeline.comparison_batches(train_recs, tok, int(r.batch_size), max_len, k_max, seed=int(config.seed),
                                        extra=iw.record_image)
  evals = pipeline.comparison_eval_batches(eval_recs, tok, int(r.batch_size), max_len, k_max, extra=iw.record_image)
  on_policy_evals = pipeline.comparison_eval_batches(on_policy, tok, int(r.batch_size), max_len, k_max,
                                                     extra=iw.record_image)
  loss_fn = steps.kwise_rm_loss_fn(cfg.gpt, _prefix_fn(cfg, frozen))
  eval_step = jax.jit(steps.make_eval_step(loss_fn))
  start = heads.from_lm(params["gpt"], cfg.gpt, jax.random.PRNGKey(int(config.seed) + 7))
  stage_dir = os.path.join(workdir, "rm")
  state, last, _ = supervised.fit(
      vision.stage_config(config, "rm"), stage_dir, loss_fn=loss_fn,
      param_axes=heads.param_axes(cfg.gpt), params=start, host_batches=batches, eval_batches=list(evals),
      eval_weight_key="num_pairs", name="rm")
  rm = jax.device_get(state["params"])
  hits = pairs = 0.0
  for b in on_policy_evals:   # pooled pair accuracy on SFT-with-image answers only
    m = eval_step(rm, b)
    hits, pairs = hits + float(m["accuracy"]) * float(m["num_pairs"]), pairs + float(m["num_pairs"])
  demos = _samples(int(config.data.rm_seed) * 10 + 2, int(r.n_norm_demos), vision._families(config.sft.families))
  demo_scores = rm_scores(rm, frozen, cfg, tok, demos, [s["answer"] for s in demos])
  offset = -float(np.mean(demo_scores))
  summary = {"train_comparisons": len(train_recs), "eval_comparisons": len(eval_recs),
             "train_pipeline": batches.stats.as_dict(), "eval_pairs": sum(rm_data.batch_pairs(b) for b in evals),
             "eval_pairwise_accuracy": last.get("eval/accuracy"), "eval_loss": last.get("eval/loss"),
             "on_policy_comparisons": len(on_policy), "on_policy_pairs": int(pairs),
             "on_policy_pair_accuracy": hits / pairs if pairs else None,
             "blank_fraction": float(r.blank_fraction),
             "train_loss": last.get("loss", _last_logged(stage_dir, "rm/loss")), "steps": int(r.loop.num_steps),
             "reward_offset": offset,
             "demo_score_std": float(np.std(demo_scores)), "seconds": round(time.perf_counter() - t0, 1)}
  summary["length_baseline_eval"] = _length_baseline(eval_recs)
  summary["length_baseline_on_policy"] = _length_baseline(on_policy)
  return heads.shift_bias(rm, offset), summary


def _last_logged(stage_dir: str, key: str):
  """The last logged value of `key` in a stage's metrics (a finished stage re-run logs no new step)."""
  rows = [h for h in loop.read_metrics(stage_dir) if key in h]
  return rows[-1][key] if rows else None


def _length_baseline(records) -> float:
  """Pair accuracy of 'the shorter answer is better' on the strictly ordered pairs of unequal length
  (a sanity floor for the RM; `rm_data.length_baseline` is the text world's 'longer is better')."""
  pairs = [len(w) < len(l) for _, w, l in rm_data.ordered_pairs(records) if len(w) != len(l)]
  return float(np.mean(pairs)) if pairs else float("nan")


# ------------------------------------------------------------------ PPO
def ppo_config(config) -> mlc.ConfigDict:
  """The `rl.fit_rl` config of the PPO stage: seed, mesh, batch_size, ppo, optim, value_optim, loop."""
  p = config.ppo
  return mlc.ConfigDict(dict(seed=int(config.seed), mesh=config.mesh.to_dict(), batch_size=int(p.batch_size),
                             ppo=p.ppo.to_dict(), optim=p.optim.to_dict(), value_optim=p.value_optim.to_dict(),
                             loop=p.loop.to_dict()))


def max_prompt_len(config) -> int:
  """Prompt tokens per rollout row: the text window less the answer (P + Tp + N fits the decoder)."""
  return int(config.max_len) - int(config.ppo.ppo.max_new_tokens)


def train_ppo(config, workdir: str, cfg: vlm.VLMConfig, tok, params: dict, rm_params: dict, hooks=()):
  """PPO on image prompts; returns (full VLM params with the PPO policy's decoder, summary dict)."""
  t0 = time.perf_counter()
  frozen = jax.device_get(vision_params(params))
  families = vision._families(config.sft.families)
  records = [iw.prompt_record(s) for s in _samples(int(config.data.ppo_seed) * 10, int(config.ppo.n_prompts),
                                                     families)]
  prompts = pipeline.prompt_batches(records, tok, int(config.ppo.batch_size), max_prompt_len(config),
                                    seed=int(config.seed), extra=iw.record_image)
  if prompts.stats.num_skipped:
    raise ValueError(f"{_WHERE}: {prompts.stats.summary()}: raise config.max_len (the PPO prompts get "
                     f"max_len - ppo.max_new_tokens = {max_prompt_len(config)} tokens)")
  stage_dir = os.path.join(workdir, "ppo")
  state, last, _ = rl.fit_rl(
      ppo_config(config), stage_dir, policy_cfg=cfg.gpt, value_cfg=cfg.gpt, policy_params=params["gpt"],
      ref_params=None, value_params=rm_params, score_params=None,
      score_fn=rollout.reward_model_score_fn(cfg.gpt), prompt_batches=prompts, eos_id=tok.eos_id,
      pad_id=tok.pad_id, name="ppo", hooks=hooks, vision=(cfg, frozen))
  policy = jax.device_get(state["policy"]["params"])
  vision.write_vision_stage(config, cfg, tok, "ppo", stage_dir)   # chat --workdir <run>/ppo --image ...
  keys = ("score", "kl", "approx_kl", "clip_frac", "explained_variance", "response_length")
  logged = {h["step"]: h for h in loop.read_metrics(stage_dir) if "ppo/score" in h}   # a replayed step: last wins
  trace = [{"step": s, **{k: logged[s][f"ppo/{k}"] for k in keys}} for s in sorted(logged)]
  final_keys = ("score", "kl", "approx_kl", "clip_frac", "explained_variance")
  final = {k: last[k] for k in final_keys if k in last}
  if not final and trace:   # a finished stage re-run trains nothing: its last logged iteration
    final = {k: trace[-1][k] for k in final_keys}
  summary = {"iterations": int(config.ppo.loop.num_steps),
             "episodes": int(config.ppo.loop.num_steps) * int(config.ppo.batch_size), "final": final,
             "trace": trace, "seconds": round(time.perf_counter() - t0, 1)}
  return {**params, "gpt": policy}, summary


# ------------------------------------------------------------------ evaluation
def compare(models: dict, cfg: vlm.VLMConfig, tok, config, rm_params=None) -> dict:
  """Gold per family of each model ({name: full VLM params}, "sft" first) on the held-out eval
  samples, greedy and sampled at the PPO temperature (one key per model), and each model vs SFT:
  wins / ties / losses on the per-sample gold score with a 95% bootstrap CI; with rm_params, the
  RM's mean score of each model's sampled answers too."""
  e = config.eval
  samples = vision.eval_samples(config)
  kw = dict(batch_size=int(e.batch_size), max_prompt_len=int(config.max_len) - int(e.max_new_tokens) + 1,
            max_new_tokens=int(e.max_new_tokens))
  out = {"n": len(samples), "temperature": float(config.ppo.ppo.temperature)}
  for mode in ("greedy", "sampled"):
    scores, res = {}, {}
    for m, (name, params) in enumerate(models.items()):
      temp = None if mode == "greedy" else float(config.ppo.ppo.temperature)
      resp = vision.answers(params, cfg, tok, samples, blank=False, temperature=temp,
                            rng=jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 101), m), **kw)
      scores[name] = np.asarray([iw.score(s, r) for s, r in zip(samples, resp)])
      res[name] = vision.family_means(samples, scores[name])
      res[name]["mean_length_words"] = float(np.mean([len(r.split()) for r in resp]))
      if rm_params is not None and mode == "sampled":
        res[name]["rm_score"] = float(np.mean(rm_scores(rm_params, vision_params(params), cfg, tok, samples, resp)))
      res[name]["examples"] = [{"family": s["task"]["family"], "answer": s["answer"], "response": r}
                               for s, r in zip(samples[:len(iw.FAMILIES)], resp)]
    base = scores[next(iter(models))]
    for name in list(models)[1:]:
      outcome = np.where(scores[name] > base, 1.0, np.where(scores[name] < base, 0.0, 0.5))
      res[name]["vs_sft_gold"] = bootstrap.win_tie_loss(outcome, seed=int(config.seed))
      res[name]["vs_sft_gold"]["paired_diff_se"] = float(np.std(scores[name] - base, ddof=1) / np.sqrt(len(base)))
    out[mode] = res
  return out


def table(result: dict) -> str:
  """Markdown: per family, SFT vs PPO gold (greedy and sampled), then PPO vs SFT W/T/L [CI]."""
  names = [n for n in result["greedy"]]
  head = "| family | " + " | ".join(f"{n} {m}" for m in ("greedy", "sampled") for n in names) + " |"
  rows = [head, "|---|" + "---|" * (2 * len(names))]
  for f in list(iw.FAMILIES) + ["mean"]:
    rows.append(f"| {f} | " + " | ".join(f"{result[m][n][f]:.3f}" for m in ("greedy", "sampled") for n in names)
                + " |")
  rows += ["", "| PPO vs SFT | wins / ties / losses | win rate [95% CI] |", "|---|---|---|"]
  for m in ("greedy", "sampled"):
    for n in names[1:]:
      w = result[m][n]["vs_sft_gold"]
      rows.append(f"| {n} {m} | {w['wins']} / {w['ties']} / {w['losses']} | {w['win_rate']:.3f} "
                  f"[{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] |")
  return "\n".join(rows) + "\n"
