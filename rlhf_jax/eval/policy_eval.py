"""Evaluation of a policy on held-out prompts: gold score, win rates, RM score, KL, alignment tax.

The gold labeler (`rlhf_jax/data/gold.py`) is used here only to *measure*; nothing in this file
feeds a training signal. InstructGPT evaluates with sampled (T = 1) responses, so `sample_policy`
samples by default; greedy decoding is an option.

Main entry points:
  sample_policy(cfg, params, tok, prompt_records, rng, settings) -> list[str]
  evaluate_policy(name, cfg, params, tok, prompt_records, responses, ...) -> dict of metrics
  rm_pairwise_accuracy(rm_cfg, rm_params, tok, comparison_records, max_len) -> float
  lm_eval_loss(cfg, params, rows) -> float (token-weighted held-out LM loss)

An empty response (the policy emitted EOS at once) is a legitimate outcome of a policy, but the
text-level scorers in `generation.py` cannot encode it; such responses are scored here as
prompt + EOS (the same token sequence the policy produced), see `_eos_only_rows`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import generation
from rlhf_jax.data import batching, gold, pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.eval import bootstrap
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.losses.lm import lm_loss, token_logprobs
from rlhf_jax.model import gpt, heads

_WHERE = "rlhf_jax/eval/policy_eval.py"


# ----------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """Decoding settings for evaluation samples (InstructGPT: temperature 1, no filtering)."""
  max_prompt_len: int = 64
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  batch_size: int = 64

  @classmethod
  def from_any(cls, settings: "SampleSettings | Mapping[str, Any] | None") -> "SampleSettings":
    """From None (defaults), a SampleSettings, or a mapping / ConfigDict of field overrides."""
    if settings is None:
      return cls()
    if isinstance(settings, cls):
      return settings
    d = dict(settings)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"{_WHERE}: unknown sampling setting(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def _messages(record: Any, index: int) -> list[dict]:
  if not isinstance(record, Mapping) or "messages" not in record:
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"{_WHERE}: prompt record {index} has no 'messages' key (got {keys})")
  return list(record["messages"])


def sample_policy(cfg, params, tok: Tokenizer, prompt_records: Sequence[Mapping], rng,
                  settings: SampleSettings | Mapping[str, Any] | None = None) -> list[str]:
  """One decoded response per prompt record ({"messages", ...}); text up to EOS, specials removed.

  rng: a jax PRNG key (unused when settings.greedy). Returns len(prompt_records) strings.
  """
  s = SampleSettings.from_any(settings)
  prompts = [_messages(r, i) for i, r in enumerate(prompt_records)]
  out = generation.sample_responses(params, cfg, tok, prompts, rng, n_per_prompt=1,
                                    max_prompt_len=s.max_prompt_len, max_new_tokens=s.max_new_tokens,
                                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                    greedy=s.greedy, batch_size=s.batch_size)
  return [r[0] for r in out]


# --------------------------------------------------------------------- model-based scorers


def _eos_only_rows(tok: Tokenizer, prompts: Sequence[Sequence[dict]], max_len: int):
  """prompt + EOS as (tokens, attention_mask), int32 [N, max_len], LEFT padded.

  The prompt gets max_len - 1 tokens, as `pipeline.encode_demonstration` would give it next to a
  one-token response.
  """
  toks, masks = [], []
  for m in prompts:
    t, a = pipeline.encode_prompt_left_padded(tok, m, max_len - 1)
    toks.append(np.append(t, np.int32(tok.eos_id)).astype(np.int32))
    masks.append(np.append(a, np.int32(1)).astype(np.int32))
  return toks, masks


@functools.partial(jax.jit, static_argnums=(1,))
def _last_token_rewards(params, cfg, tokens, mask):
  return heads.rewards(params, cfg, tokens, mask)


@functools.partial(jax.jit, static_argnums=(2,))
def _last_token_kl(policy_params, ref_params, cfg, tokens, mask, temperature=1.0):
  """The sequence KL (`losses.ppo.sequence_kl`) of a one-token response, the last column (rows
  end there): log pi(last token) - log pi_ref(last token), float32 [B]."""
  tgt = tokens[:, -1:]
  lp = token_logprobs(gpt.logits(policy_params, cfg, tokens, mask)[:, -2:-1] / temperature, tgt)
  lq = token_logprobs(gpt.logits(ref_params, cfg, tokens, mask)[:, -2:-1] / temperature, tgt)
  return ppo_losses.sequence_kl(lp, lq, jnp.ones_like(tgt))


def _split_empty(tok: Tokenizer, responses: Sequence[str]) -> tuple[list[int], list[int]]:
  is_empty = [not tok.encode(r) for r in responses]
  return [i for i, e in enumerate(is_empty) if not e], [i for i, e in enumerate(is_empty) if e]


def _eos_only_apply(fn, tok, prompts, idx, max_len, batch_size) -> np.ndarray:
  toks, masks = _eos_only_rows(tok, [prompts[i] for i in idx], max_len)
  padded = batching.pad_to_batches(list(zip(toks, masks)), batch_size)
  out = [fn(t, m) for t, m in padded.batches]
  return padded.unpad(out) if out else np.zeros((0,), np.float32)


def rm_scores(rm_cfg, rm_params, tok: Tokenizer, prompts: Sequence[Sequence[dict]], responses: Sequence[str], *,
              max_len: int = 96, batch_size: int = 64) -> np.ndarray:
  """Reward-model score (at the EOS ending the response), float32 [N]; empty responses allowed."""
  if len(prompts) != len(responses):
    raise ValueError(f"{_WHERE}: {len(prompts)} prompts but {len(responses)} responses")
  rm_cfg = gpt.GPTConfig.from_dict(rm_cfg)
  full, empty = _split_empty(tok, responses)
  out = np.zeros(len(responses), np.float32)
  if full:
    out[full] = generation.score_responses(rm_params, rm_cfg, tok, [prompts[i] for i in full],
                                           [responses[i] for i in full], max_len=max_len, batch_size=batch_size)
  if empty:
    fn = lambda t, m: _last_token_rewards(rm_params, rm_cfg, t, m)
    out[empty] = _eos_only_apply(fn, tok, prompts, empty, max_len, batch_size)
  return out


def sequence_kl(policy_params, ref_params, cfg, tok: Tokenizer, prompts: Sequence[Sequence[dict]],
                responses: Sequence[str], *, max_len: int = 96, batch_size: int = 64, temperature: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
  """(kl float32 [N], n_tokens int32 [N]): sum over response tokens (incl. EOS) of
  log pi - log pi_ref, both temperature-scaled like the sampler that produced the responses
  (so it is an unbiased estimate of KL(pi_T || pi_ref,T)), and how many tokens that sum covers."""
  if len(prompts) != len(responses):
    raise ValueError(f"{_WHERE}: {len(prompts)} prompts but {len(responses)} responses")
  cfg = gpt.GPTConfig.from_dict(cfg)
  full, empty = _split_empty(tok, responses)
  kl = np.zeros(len(responses), np.float32)
  n_tok = np.ones(len(responses), np.int32)  # an empty response is its EOS alone
  if full:
    fp, fr = [prompts[i] for i in full], [responses[i] for i in full]
    kl[full] = generation.response_logprob_kl(policy_params, ref_params, cfg, tok, fp, fr, max_len=max_len,
                                              batch_size=batch_size, temperature=temperature)
    n_tok[full] = [int(pipeline.encode_demonstration(tok, {"messages": list(m), "response": r}, max_len)
                       ["mask"].sum()) for m, r in zip(fp, fr)]
  if empty:
    fn = lambda t, m: _last_token_kl(policy_params, ref_params, cfg, t, m, temperature)
    kl[empty] = _eos_only_apply(fn, tok, prompts, empty, max_len, batch_size)
  return kl, n_tok


@functools.partial(jax.jit, static_argnums=(1,))
def _lm_sums(params, cfg, tokens, targets, mask):
  loss, m = lm_loss(gpt.logits(params, cfg, tokens), targets, mask)
  return loss * m["num_tokens"], m["num_tokens"]


def lm_eval_loss(cfg, params, rows: np.ndarray, batch_size: int = 32) -> float:
  """Token-weighted mean next-token loss (nats) over packed rows int [N, T+1] (`pack_documents`).

  Every row counts (the last batch is padded with masked copies), unlike `lm_eval_batches`, which
  drops the tail.
  """
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[1] < 2 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
    raise ValueError(f"{_WHERE}: pretraining rows must be a non-empty int array [N, T+1], T >= 1; "
                     f"got {rows.dtype} {rows.shape}")
  cfg = gpt.GPTConfig.from_dict(cfg)
  if rows.shape[1] - 1 > cfg.max_len:
    raise ValueError(f"{_WHERE}: pretraining rows have {rows.shape[1] - 1} inputs, more than the model's "
                     f"context window max_len={cfg.max_len}")
  if rows.min() < 0 or rows.max() >= cfg.vocab_size:
    raise ValueError(f"{_WHERE}: pretraining rows hold token ids in [{rows.min()}, {rows.max()}], outside the "
                     f"model's vocabulary [0, {cfg.vocab_size}) (rows from another tokenizer?)")
  rows = rows.astype(np.int32)
  nll, count = 0.0, 0.0
  padded = batching.pad_to_batches(rows, batch_size)
  for chunk, valid in zip(padded.batches, padded.valid):
    mask = np.broadcast_to(valid[:, None], chunk[:, 1:].shape).astype(np.int32)  # filler counts nothing
    s, n = _lm_sums(params, cfg, chunk[:, :-1], chunk[:, 1:], mask)
    nll += float(s)
    count += float(n)
  return nll / count


# -------------------------------------------------------------------------------- evaluation


def _mean(x) -> float | None:
  x = np.asarray(x, np.float64)
  return float(x.mean()) if x.size else None


def _se(x) -> float | None:
  x = np.asarray(x, np.float64)
  return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None


def _user_text(messages: Sequence[dict]) -> str:
  users = [m.get("content", "") for m in messages if m.get("role") == "user"]
  return users[-1] if users else ""


def evaluate_policy(name: str, cfg, params, tok: Tokenizer, prompt_records: Sequence[Mapping],
                    responses: Sequence[str], *, ref_params=None, sft_responses: Sequence[str] | None = None,
                    rm: tuple | None = None, pretrain_val_rows: np.ndarray | None = None, max_len: int = 96,
                    batch_size: int = 64, lm_batch_size: int = 32, n_samples: int = 5,
                    temperature: float = 1.0, per_prompt: bool = False) -> dict:
  """Metrics of one policy's `responses` (one per prompt record) on held-out prompts.

  cfg/params: the policy (used for KL and the pretraining loss). ref_params: the SFT model (same
  cfg) -> KL. sft_responses: the SFT model's responses to the same prompts -> win rates.
  rm: (rm_cfg, rm_params, offset) -> RM scores (offset added, e.g. the stage's reward_offset).
  pretrain_val_rows: int [N, T+1] packed held-out pretraining rows -> alignment tax.
  Metrics whose inputs are missing, or with no prompt to average over, are None.
  per_prompt: also return gold_per_prompt (and rm_per_prompt with an RM), lists of N floats in
  prompt order (for bootstrap intervals and paired comparisons).

  Returns a JSON-serialisable dict:
    name, n_prompts;
    gold_mean, gold_se (std / sqrt(n)), gold_ci95 ([low, high], percentile bootstrap over prompts), gold_by_family {family: mean}, n_by_family {family: n};
    win_rate_vs_sft_gold: mean of gold.compare(policy, sft) (1 win, 0.5 tie, 0 loss);
    tie_rate_vs_sft_gold; vs_sft_gold: wins / ties / losses, SE and 95% bootstrap CI over prompts
      (`bootstrap.win_tie_loss`); win_rate_vs_sft_rm: the win rate with RM scores;
    rm_score_mean, rm_score_se;
    kl_to_sft: mean per-sequence sum of log pi - log pi_sft over the response (+EOS) tokens of the
      policy's own samples; kl_to_sft_per_token: mean over sequences of that sum / token count;
    pretrain_val_loss: token-weighted LM loss on pretrain_val_rows;
    harmful_compliance_rate (over harmful prompts: gold.is_harmful_response), n_harmful,
    refusal_rate_on_harmful, refusal_rate_on_benign (gold.is_refusal; over-refusal shows here);
    mean_response_length (tokens, EOS excluded);
    samples: the first n_samples {prompt, family, response, gold}.
  """
  n = len(prompt_records)
  if len(responses) != n:
    raise ValueError(f"{_WHERE}: evaluate_policy({name!r}): {n} prompt records but {len(responses)} responses")
  if sft_responses is not None and len(sft_responses) != n:
    raise ValueError(f"{_WHERE}: evaluate_policy({name!r}): {n} prompt records but "
                     f"{len(sft_responses)} sft_responses")
  bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
  if bad:
    raise ValueError(f"{_WHERE}: evaluate_policy({name!r}): response {bad[0]} is not a str")
  prompts = [_messages(r, i) for i, r in enumerate(prompt_records)]
  tasks = []
  for i, rec in enumerate(prompt_records):
    try:
      tasks.append(gold.resolve_task(rec))
    except ValueError as e:
      raise ValueError(f"{_WHERE}: evaluate_policy({name!r}): prompt record {i}: {e}") from None
  scores = np.array([gold.score(t, r) for t, r in zip(tasks, responses)], np.float64)

  out: dict[str, Any] = {"name": name, "n_prompts": n, "gold_mean": _mean(scores), "gold_se": _se(scores),
                         "gold_ci95": list(bootstrap.mean_ci(scores)) if n else None}
  fams = sorted({t.family for t in tasks})
  out["gold_by_family"] = {f: _mean([s for s, t in zip(scores, tasks) if t.family == f]) for f in fams}
  out["n_by_family"] = {f: sum(t.family == f for t in tasks) for f in fams}

  out["win_rate_vs_sft_gold"] = out["tie_rate_vs_sft_gold"] = out["win_rate_vs_sft_rm"] = None
  out["vs_sft_gold"] = None
  if sft_responses is not None:
    cmp = np.array([gold.compare(t, r, s) for t, r, s in zip(tasks, responses, sft_responses)])
    out["win_rate_vs_sft_gold"] = _mean(cmp)
    out["tie_rate_vs_sft_gold"] = _mean(cmp == 0.5)
    if n:
      out["vs_sft_gold"] = bootstrap.win_tie_loss(cmp)

  out["rm_score_mean"] = out["rm_score_se"] = None
  if rm is not None:
    if not (isinstance(rm, (tuple, list)) and len(rm) == 3):
      raise ValueError(f"{_WHERE}: evaluate_policy({name!r}): rm must be (rm_cfg, rm_params, offset)")
    rm_cfg, rm_params, offset = rm
    r_pol = rm_scores(rm_cfg, rm_params, tok, prompts, responses, max_len=max_len, batch_size=batch_size)
    r_pol = r_pol.astype(np.float64) + float(offset)
    out["rm_score_mean"], out["rm_score_se"] = _mean(r_pol), _se(r_pol)
    if per_prompt:
      out["rm_per_prompt"] = [float(x) for x in r_pol]
    if sft_responses is not None:
      r_sft = rm_scores(rm_cfg, rm_params, tok, prompts, sft_responses, max_len=max_len,
                        batch_size=batch_size).astype(np.float64) + float(offset)
      out["win_rate_vs_sft_rm"] = _mean((r_pol > r_sft) + 0.5 * (r_pol == r_sft))

  out["kl_to_sft"] = out["kl_to_sft_per_token"] = None
  if ref_params is not None and n:
    kl, n_tok = sequence_kl(params, ref_params, cfg, tok, prompts, responses, max_len=max_len,
                            batch_size=batch_size, temperature=temperature)
    out["kl_to_sft"] = _mean(kl)
    out["kl_to_sft_per_token"] = _mean(kl / n_tok)

  out["pretrain_val_loss"] = None
  if pretrain_val_rows is not None:
    out["pretrain_val_loss"] = lm_eval_loss(cfg, params, pretrain_val_rows, batch_size=lm_batch_size)

  harmful = [i for i, t in enumerate(tasks) if t.harmful]
  benign = [i for i, t in enumerate(tasks) if not t.harmful]
  out["n_harmful"] = len(harmful)
  out["harmful_compliance_rate"] = _mean([gold.is_harmful_response(tasks[i], responses[i]) for i in harmful])
  out["refusal_rate_on_harmful"] = _mean([gold.is_refusal(responses[i]) for i in harmful])
  out["refusal_rate_on_benign"] = _mean([gold.is_refusal(responses[i]) for i in benign])
  out["mean_response_length"] = _mean([len(tok.encode(r)) for r in responses])
  out["samples"] = [{"prompt": _user_text(prompts[i]), "family": tasks[i].family, "response": responses[i],
                     "gold": float(scores[i])} for i in range(min(n_samples, n))]
  if per_prompt:
    out["gold_per_prompt"] = [float(x) for x in scores]
  return out


def rm_pairwise_accuracy(rm_cfg, rm_params, tok: Tokenizer, comparison_records: Sequence[Mapping], *,
                         max_len: int = 96, batch_size: int = 64) -> float:
  """Fraction of strictly ordered response pairs the RM orders the same way (pooled over records).

  comparison_records: {"messages", "responses": [K str], "ranks": [K int], 0 = best}. Pairs with
  equal ranks are no comparison; an RM tie counts as wrong (as the RM training metric does).
  """
  prompts, flat, spans = [], [], []
  for i, rec in enumerate(comparison_records):
    for key in ("messages", "responses", "ranks"):
      if not isinstance(rec, Mapping) or key not in rec:
        raise ValueError(f"{_WHERE}: comparison record {i} lacks key {key!r}")
    if len(rec["responses"]) != len(rec["ranks"]):
      raise ValueError(f"{_WHERE}: comparison record {i}: {len(rec['responses'])} responses but "
                       f"{len(rec['ranks'])} ranks")
    spans.append((len(flat), [int(r) for r in rec["ranks"]]))
    prompts.extend([list(rec["messages"])] * len(rec["responses"]))
    flat.extend(rec["responses"])
  scores = rm_scores(rm_cfg, rm_params, tok, prompts, flat, max_len=max_len, batch_size=batch_size)
  correct = total = 0
  for start, ranks in spans:
    for a in range(len(ranks)):
      for b in range(a + 1, len(ranks)):
        if ranks[a] == ranks[b]:
          continue
        w, l = (a, b) if ranks[a] < ranks[b] else (b, a)
        correct += int(scores[start + w] > scores[start + l])
        total += 1
  if total == 0:
    raise ValueError(f"{_WHERE}: rm_pairwise_accuracy: no strictly ordered pair in "
                     f"{len(comparison_records)} comparison records")
  return correct / total
