"""Autoregressive generation on the KV cache: sampling, greedy decoding and beam search.

Everything numeric is a pure function; each public entry point is one jitted
program with static shapes (the decode loop is a `lax.while_loop`, so there is
no host round trip per token).

Conventions shared by all entry points:
  * Prompts are LEFT-padded: prompt_tokens int32 [B,Tp], prompt_mask [B,Tp] with
    1 on real tokens; the last column must be real for every row.
  * The KV cache has Tp + max_new_tokens - 1 slots: the prompt fills slots
    [0,Tp), generated token i is fed back at slot Tp+i (the last generated token
    is never fed back). Positions continue from each row's real prompt length,
    so a row's positions match an unpadded run of the same prompt.
  * Outputs are [B, max_new_tokens]; after a row's EOS the tokens are pad_id,
    the log-probs 0 and the mask 0.

Log-prob convention (`generate` and `sequence_logprobs`): the log-prob of a
sampled token is taken under the TEMPERATURE-SCALED distribution
log_softmax(logits / temperature), BEFORE top-k/top-p filtering. The training
code recomputes log-probs of a rollout with exactly this definition
(`sequence_logprobs`), so old/new/reference log-probs in the PPO ratio and KL are
all measured on the same distribution. (The filtered distribution would give a
ratio against a distribution the learner never evaluates.)

Public API:
  generate(params, config, prompt_tokens, prompt_mask, rng, *, max_new_tokens, temperature=1.0,
           top_k=0, top_p=1.0, eos_id, pad_id, greedy=False) -> dict
  sequence_logprobs(params, config, tokens, mask, temperature=1.0, dropout_rng=None) -> [B,T-1]
  beam_search(params, config, prompt_tokens, prompt_mask, *, beam_width, max_new_tokens, eos_id,
              pad_id, length_penalty=1.0) -> dict
  Building blocks for streaming: SamplingSpec, decode_layout(params) (once per stream), prefill(...) -> state,
  decode_step(...) -> state, outputs(state) -> dict, filter_logits(logits, top_k, top_p).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import decode_kernels
from rlhf_jax.model import gpt
from rlhf_jax.model.config import GPTConfig

_WHERE = "rlhf_jax/sampling.py"
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """Static sampling settings (hashable, so a jit static argument).

  top_k: keep the k most likely tokens (0 = off; ties at the k-th value are kept).
  top_p: nucleus sampling, keep the smallest most-likely set whose probability
    reaches top_p (the most likely token is always kept); 1.0 = off. Applied
    after top-k, on the temperature-scaled distribution renormalised over the
    top-k survivors.
  greedy: argmax of the logits instead of sampling (top_k/top_p/rng unused).
  (eos_id, pad_id and temperature are traced values in the decode state, so changing
  them does not recompile.)
  """
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False


# ----------------------------------------------------------------- validation
def _config(config) -> GPTConfig:
  return GPTConfig.from_dict(config)


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_prompt(cfg: GPTConfig, prompt_tokens, prompt_mask, max_new_tokens: int, fn: str) -> None:
  """Shape checks always; value checks (left padding, id range) when the arrays are concrete."""
  if prompt_tokens.ndim != 2 or tuple(prompt_mask.shape) != tuple(prompt_tokens.shape):
    raise ValueError(f"{_WHERE}:{fn}: prompt_tokens {tuple(prompt_tokens.shape)} and prompt_mask "
                     f"{tuple(prompt_mask.shape)} must both be [B,Tp]")
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"{_WHERE}:{fn}: prompt_tokens must be integer, got {prompt_tokens.dtype}")
  if int(max_new_tokens) < 1:
    raise ValueError(f"{_WHERE}:{fn}: max_new_tokens must be >= 1, got {max_new_tokens}")
  tp = prompt_tokens.shape[1]
  if tp < 1:
    raise ValueError(f"{_WHERE}:{fn}: empty prompt (Tp=0); every row needs at least one real token")
  # Slots 0..Tp+N-2 are fed to the model; positions stay below that bound too.
  if tp + max_new_tokens - 1 > cfg.max_len:
    raise ValueError(f"{_WHERE}:{fn}: prompt length {tp} + max_new_tokens {max_new_tokens} - 1 exceeds "
                     f"the model's context window max_len={cfg.max_len}")
  if _concrete(prompt_mask):
    m = np.asarray(prompt_mask) > 0
    if not m[:, -1].all():
      rows = np.nonzero(~m[:, -1])[0][:5].tolist()
      raise ValueError(f"{_WHERE}:{fn}: prompts must be LEFT-padded with a real last token; rows {rows} "
                       "have prompt_mask[:, -1] == 0 (empty or right-padded prompt)")
    if (np.diff(m.astype(np.int8), axis=1) < 0).any():
      rows = np.nonzero((np.diff(m.astype(np.int8), axis=1) < 0).any(1))[0][:5].tolist()
      raise ValueError(f"{_WHERE}:{fn}: prompt_mask must be 0...0 1...1 per row (left padding); "
                       f"rows {rows} have a pad after a real token")
  gpt.check_tokens(prompt_tokens, cfg)


def _check_prefix(cfg: GPTConfig, tokens, prefix_embeds, extra: int, fn: str) -> None:
  """prefix_embeds must be None or [B,P,D] with P + T + extra <= max_len."""
  if prefix_embeds is None:
    return
  b, t = tokens.shape
  if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != b or prefix_embeds.shape[2] != cfg.d_model:
    raise ValueError(f"{_WHERE}:{fn}: prefix_embeds {tuple(prefix_embeds.shape)} must be [B={b},P,D={cfg.d_model}]")
  if prefix_embeds.shape[1] + t + extra > cfg.max_len:
    raise ValueError(f"{_WHERE}:{fn}: {prefix_embeds.shape[1]} prefix positions + {t} tokens"
                     + (f" + {extra} more generated" if extra else "") + f" exceed max_len={cfg.max_len}")


def _check_token_id(cfg: GPTConfig, name: str, value, fn: str, allow_none: bool) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < cfg.vocab_size:
    raise ValueError(f"{_WHERE}:{fn}: {name}={value!r} must be an int in [0, vocab_size={cfg.vocab_size})")


def _make_spec(cfg: GPTConfig, top_k, top_p, greedy, fn: str) -> SamplingSpec:
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"{_WHERE}:{fn}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"{_WHERE}:{fn}: top_p must be in (0, 1], got {top_p!r}")
  top_k = 0 if top_k >= cfg.vocab_size else int(top_k)  # keeping all V tokens is no filter
  return SamplingSpec(top_k=top_k, top_p=float(top_p), greedy=bool(greedy))


def _token_ids(cfg: GPTConfig, eos_id, pad_id, fn: str):
  """Validated (eos, pad) as int32 scalars; eos None -> -1, which no token equals."""
  _check_token_id(cfg, "eos_id", eos_id, fn, allow_none=True)
  _check_token_id(cfg, "pad_id", pad_id, fn, allow_none=False)
  return jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id)


def _check_temperature(temperature, fn: str) -> None:
  if _concrete(temperature):
    t = np.asarray(temperature, np.float64)
    if t.shape != () or not np.isfinite(t) or t <= 0:
      raise ValueError(f"{_WHERE}:{fn}: temperature must be a finite scalar > 0 "
                       f"(use greedy=True for argmax), got {temperature!r}")


# ----------------------------------------------------------------- sampling
def filter_logits(logits, top_k: int, top_p: float):
  """Top-k then top-p (nucleus) filtering.

  logits: float32 [..., V], already temperature-scaled. Returns the same shape
  with filtered-out entries set to -inf (so `categorical` renormalises
  over the survivors). Ties at a threshold are kept.
  """
  v = logits.shape[-1]
  if top_k == 0 and top_p >= 1.0:
    return logits
  # Descending candidate values: the top-k only (cheap) or the full sorted row.
  if 0 < top_k < v:
    vals = jax.lax.top_k(logits, top_k)[0]
  else:
    vals = -jnp.sort(-logits, axis=-1)
  thresh = vals[..., -1:]
  if top_p < 1.0:
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate; 0 for the first
    keep = before < top_p
    thresh = jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= thresh, logits, -jnp.inf)


def categorical(key, logits):
  """One draw per row from softmax(logits) (logits float32 [B,V], -inf = excluded) -> int32 [B].

  Inverse-CDF sampling: one uniform per row against the cumulative probabilities, instead of
  `jax.random.categorical`'s V Gumbel draws per row (on CPU the V random numbers per decode step
  cost more than the model's matmuls at small sizes). Exact up to float rounding of the cumsum;
  excluded tokens (probability 0) are never drawn.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
  tok = jnp.sum(cdf < u * cdf[..., -1:], axis=-1)
  return jnp.minimum(tok, logits.shape[-1] - 1).astype(jnp.int32)


def _sample(logits, temperature, key, spec: SamplingSpec):
  """logits float32 [B,V] -> (tokens int32 [B], log-probs float32 [B] under log_softmax(logits/T))."""
  scaled = logits / temperature
  logp = jax.nn.log_softmax(scaled, axis=-1)
  if spec.greedy:
    tok = jnp.argmax(logits, axis=-1)
  else:
    tok = categorical(key, filter_logits(scaled, spec.top_k, spec.top_p))
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _emit(state: State, logits, spec: SamplingSpec) -> State:
  """Samples token `state["step"]` from logits [B,V] and records it (pad for finished rows)."""
  rng, key = jax.random.split(state["rng"])
  tok, lp = _sample(logits, state["temperature"], key, spec)
  live = ~state["ended"]
  tok = jnp.where(live, tok, state["pad_id"])
  lp = jnp.where(live, lp, 0.0)
  i = state["step"]
  put = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None].astype(buf.dtype), i, axis=1)
  ended = state["ended"] | (live & (tok == state["eos_id"]))
  return {**state, "rng": rng, "tokens": put(state["tokens"], tok), "logprobs": put(state["logprobs"], lp),
          "mask": put(state["mask"], live.astype(jnp.int32)), "ended": ended}


# ----------------------------------------------------------------- cached decoding
def _prefill(params, cfg: GPTConfig, prompt_tokens, prompt_mask, rng, temperature, eos_id, pad_id,
             max_new_tokens: int, spec: SamplingSpec, prefix_embeds=None) -> State:
  """prefix_embeds: optional [B,P,D] input embeddings read before the prompt (`gpt.forward`; the image
  tokens of `model/vlm.py`): the sequence is [prefix | left pads | prompt], the prefix always real."""
  b, tp = prompt_tokens.shape
  n = max_new_tokens
  prompt_mask = prompt_mask.astype(jnp.int32)
  if prefix_embeds is not None:
    prompt_mask = gpt.prefix_mask(prompt_mask, prefix_embeds.shape[1])
  params = gpt.decode_params(params, cfg)
  cache = gpt.unstack_cache(gpt.init_cache(cfg, b, prompt_mask.shape[1] + n - 1))   # one buffer per layer
  cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n - 1), jnp.int32)], axis=1)
  hidden, cache = gpt.forward(params, cfg, prompt_tokens.astype(jnp.int32), cache_mask,
                              gpt.positions_from_mask(prompt_mask), cache, 0, prefix_embeds=prefix_embeds)
  logits = gpt.unembed(params, cfg, hidden[:, -1])
  state = {
      "cache": cache,
      "cache_mask": cache_mask,                              # [B,S] 1 = real slot
      "prompt_lengths": jnp.sum(prompt_mask, axis=1),        # [B] = position of generated token 0
      "step": jnp.zeros((), jnp.int32),                      # index of the latest sampled token
      "tokens": jnp.full((b, n), pad_id, jnp.int32),
      "logprobs": jnp.zeros((b, n), jnp.float32),
      "mask": jnp.zeros((b, n), jnp.int32),
      "ended": jnp.zeros((b,), bool),
      "rng": rng,
      "temperature": jnp.asarray(temperature, jnp.float32),
      "eos_id": jnp.asarray(eos_id, jnp.int32),              # -1 = none
      "pad_id": jnp.asarray(pad_id, jnp.int32),
  }
  return _emit(state, logits, spec)


def _decode_step(params, cfg: GPTConfig, state: State, spec: SamplingSpec) -> State:
  b, n = state["tokens"].shape
  tp = state["cache_mask"].shape[1] - n + 1
  i = state["step"]
  last = jax.lax.dynamic_slice_in_dim(state["tokens"], i, 1, axis=1)  # [B,1], pad for finished rows
  slot = tp + i
  cache_mask = jax.lax.dynamic_update_slice_in_dim(state["cache_mask"], jnp.ones((b, 1), jnp.int32), slot,
                                                   axis=1)
  positions = (state["prompt_lengths"] + i)[:, None]
  params = gpt.decode_params(params, cfg)   # no-op inside `generate` (split once, before the loop)
  hidden, cache = gpt.forward(params, cfg, last, cache_mask, positions, state["cache"], slot)
  logits = gpt.unembed(params, cfg, hidden[:, 0])
  state = {**state, "cache": cache, "cache_mask": cache_mask, "step": i + 1}
  return _emit(state, logits, spec)


def outputs(state: State) -> dict:
  """The generation result held by a decode state (see `generate` for the fields)."""
  return {"tokens": state["tokens"], "logprobs": state["logprobs"], "mask": state["mask"],
          "lengths": jnp.sum(state["mask"], axis=1).astype(jnp.int32), "ended": state["ended"]}


def _prompt_rows(params, config, prompt_tokens, *args, **kwargs) -> int:
  return prompt_tokens.shape[0]


@functools.partial(decode_kernels.jit, rows=_prompt_rows, static_argnames=("config", "max_new_tokens", "spec"))
def _generate_jit(params, config, prompt_tokens, prompt_mask, rng, temperature, eos_id, pad_id, *,
                  max_new_tokens, spec, prefix_embeds=None):
  params = gpt.decode_params(params, config)   # weights sliced per layer once, not on every decode step
  state = _prefill(params, config, prompt_tokens, prompt_mask, rng, temperature, eos_id, pad_id,
                   max_new_tokens, spec, prefix_embeds)
  # Stop when every row has ended: remaining columns already hold pad / 0 / mask 0.
  cond = lambda s: (s["step"] < max_new_tokens - 1) & ~jnp.all(s["ended"])
  state = jax.lax.while_loop(cond, lambda s: _decode_step(params, config, s, spec), state)
  return outputs(state)


def generate(params, config, prompt_tokens, prompt_mask, rng, *, max_new_tokens: int, temperature=1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None, pad_id: int, greedy: bool = False,
             prefix_embeds=None) -> dict:
  """Samples up to max_new_tokens per row from the policy, one jitted program on the KV cache.

  params: the policy's GPT params; config: GPTConfig (or its dict).
  prompt_tokens int [B,Tp], prompt_mask [B,Tp] (LEFT-padded, 1 = real); rng: PRNG key.
  temperature: float > 0; top_k (0 = off), top_p (1.0 = off): see `SamplingSpec`;
  greedy=True takes the argmax (rng unused). eos_id None = no early stop.
  prefix_embeds: optional [B,P,D] input embeddings read before the prompt (image tokens, always
  real; `model/vlm.py` computes them): the window then needs P + Tp + max_new_tokens - 1 <= max_len.
  Static (recompiling) settings: shapes, max_new_tokens, top_k, top_p, greedy; temperature,
  eos_id and pad_id are traced.
  Returns dict:
    tokens   int32 [B,N]: generated tokens, pad_id after EOS;
    logprobs float32 [B,N]: log-prob of each token under log_softmax(logits / temperature),
             before top-k/top-p filtering (the definition `sequence_logprobs` recomputes); 0 after EOS;
    mask     int32 [B,N]: 1 on generated tokens including the EOS, 0 after;
    lengths  int32 [B]: generated tokens including the EOS;
    ended    bool  [B]: the row produced eos_id.
  """
  cfg = _config(config)
  _check_prompt(cfg, prompt_tokens, prompt_mask, max_new_tokens, "generate")
  _check_prefix(cfg, prompt_tokens, prefix_embeds, max_new_tokens - 1, "generate")
  _check_temperature(temperature, "generate")
  spec = _make_spec(cfg, top_k, top_p, greedy, "generate")
  eos, pad = _token_ids(cfg, eos_id, pad_id, "generate")
  return _generate_jit(params, cfg, prompt_tokens, prompt_mask, rng, jnp.asarray(temperature, jnp.float32),
                       eos, pad, max_new_tokens=int(max_new_tokens), spec=spec, prefix_embeds=prefix_embeds)


_prefill_jit = jax.jit(_prefill, static_argnums=(1, 8, 9))
_decode_step_jit = decode_kernels.jit(_decode_step, rows=lambda params, cfg, state, spec: state["tokens"].shape[0],
                                     static_argnums=(1, 3), donate_argnums=(2,))


def prefill(params, config, prompt_tokens, prompt_mask, rng, *, max_new_tokens: int, temperature=1.0,
            eos_id: int | None, pad_id: int, spec: SamplingSpec = SamplingSpec()) -> State:
  """Streaming building block: fills the cache with the prompt and samples token 0.

  Returns a decode state (a dict of arrays): state["tokens"][:, state["step"]] is the
  latest token, state["ended"] says which rows are done. Advance with `decode_step`
  at most max_new_tokens - 1 times; `outputs(state)` gives the `generate` result.
  """
  cfg = _config(config)
  _check_prompt(cfg, prompt_tokens, prompt_mask, max_new_tokens, "prefill")
  _check_temperature(temperature, "prefill")
  spec = _make_spec(cfg, spec.top_k, spec.top_p, spec.greedy, "prefill")
  eos, pad = _token_ids(cfg, eos_id, pad_id, "prefill")
  return _prefill_jit(params, cfg, prompt_tokens, prompt_mask, rng, jnp.asarray(temperature, jnp.float32),
                      eos, pad, int(max_new_tokens), spec)


_decode_params_jit = jax.jit(gpt.decode_params, static_argnums=(1,))


def decode_layout(params, config):
  """The params in the decoding layout (`gpt.decode_params`: blocks split per layer, the unembedding
  transposed), computed once on device. Pass the result to `prefill` / `decode_step` in a streaming
  loop: with stacked params each jitted step would re-slice every weight (an idempotent no-op here)."""
  return _decode_params_jit(params, _config(config))


def decode_step(params, config, state: State, *, spec: SamplingSpec = SamplingSpec()) -> State:
  """Streaming building block: feeds the latest token and samples the next one (jitted; the
  input state's buffers are donated, so do not reuse it). params: best `decode_layout(params)`,
  computed once per stream (stacked params work too, at the cost of a per-step weight copy)."""
  n = state["tokens"].shape[1]
  if _concrete(state["step"]) and int(state["step"]) >= n - 1:
    raise ValueError(f"{_WHERE}:decode_step: state already holds all max_new_tokens={n} tokens")
  return _decode_step_jit(params, _config(config), state, spec)


# ----------------------------------------------------------------- recomputation
def sequence_logprobs(params, config, tokens, mask, temperature=1.0, dropout_rng=None, prefix_embeds=None):
  """Per-token log-probs of tokens[:, 1:] in one uncached forward (pure; jit/grad it in the caller).

  tokens int [B,T]: the full left-padded prompt + right-padded response; mask [B,T] (1 = real).
  Returns float32 [B,T-1]: out[:, t] = log_softmax(logits[:, t] / temperature)[tokens[:, t+1]],
  zeroed unless both tokens t and t+1 are real (the first real token has no context). The response of a `generate` call with prompt length Tp
  sits at out[:, Tp-1:]. prefix_embeds: optional [B,P,D] read before the tokens (image tokens;
  `gpt.hidden_states`), whose positions are not part of the output.
  """
  cfg = _config(config)
  if tokens.ndim != 2 or tuple(mask.shape) != tuple(tokens.shape):
    raise ValueError(f"{_WHERE}:sequence_logprobs: tokens {tuple(tokens.shape)} and mask "
                     f"{tuple(mask.shape)} must both be [B,T]")
  if tokens.shape[1] > cfg.max_len:
    raise ValueError(f"{_WHERE}:sequence_logprobs: sequence length {tokens.shape[1]} exceeds max_len={cfg.max_len}")
  _check_prefix(cfg, tokens, prefix_embeds, 0, "sequence_logprobs")
  _check_temperature(temperature, "sequence_logprobs")
  logits = gpt.logits(params, cfg, tokens, mask, dropout_rng, prefix_embeds)[:, :-1]
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  out = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where((mask[:, :-1] > 0) & (mask[:, 1:] > 0), out, 0.0)


# ----------------------------------------------------------------- beam search
def _beam_select(bs: State, logp, t, k: int, eos_id, alpha, n: int) -> State:
  """One beam step at generated index t. logp float32 [B,K,V] for each alive beam's next token.

  Takes the top 2K (alive score + logp) candidates: at most K of them end in EOS, so at
  least K continue. EOS candidates join the finished pool (top K by normalised score);
  the best K others become the alive beams, and the cache rows follow their parents.
  """
  b, _, v = logp.shape
  cand = (bs["alive_score"][:, :, None] + logp).reshape(b, k * v)
  vals, idx = jax.lax.top_k(cand, 2 * k)
  parent, tok = idx // v, (idx % v).astype(jnp.int32)
  seqs = jnp.take_along_axis(bs["alive_seq"], parent[:, :, None], axis=1)           # [B,2K,N]
  seqs = jnp.where(jnp.arange(n)[None, None, :] == t, tok[:, :, None], seqs)
  is_eos = tok == eos_id  # eos_id -1 (none) never matches
  length = (t + 1).astype(jnp.float32)

  fin_new = jnp.where(is_eos, vals / length ** alpha, -jnp.inf)
  fin_all = jnp.concatenate([bs["fin_score"], fin_new], axis=1)
  fin_score, fin_idx = jax.lax.top_k(fin_all, k)
  fin_seq = jnp.take_along_axis(jnp.concatenate([bs["fin_seq"], seqs], axis=1), fin_idx[:, :, None], axis=1)
  fin_len = jnp.take_along_axis(
      jnp.concatenate([bs["fin_len"], jnp.broadcast_to(t + 1, tok.shape).astype(jnp.int32)], axis=1),
      fin_idx, axis=1)

  alive_score, a_idx = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, vals), k)
  alive_seq = jnp.take_along_axis(seqs, a_idx[:, :, None], axis=1)
  a_parent = jnp.take_along_axis(parent, a_idx, axis=1)
  rows = (jnp.arange(b)[:, None] * k + a_parent).reshape(-1)
  cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), bs["cache"])   # per-layer [B*K,KV,S,Dh]

  # Exact stop for the best hypothesis (alpha >= 0, log-probs <= 0): an alive beam's final
  # score is at most its current sum / N**alpha.
  bound = jnp.max(alive_score, axis=1) / jnp.float32(n) ** alpha
  done = (alpha >= 0) & jnp.all(jnp.max(fin_score, axis=1) >= bound)
  return {**bs, "cache": cache, "alive_seq": alive_seq, "alive_score": alive_score, "fin_seq": fin_seq,
          "fin_score": fin_score, "fin_len": fin_len, "t": t + 1, "done": done}


@functools.partial(decode_kernels.jit, rows=lambda *a, beam_width, **k: _prompt_rows(*a) * beam_width,
                   static_argnames=("config", "beam_width", "max_new_tokens"))
def _beam_search_jit(params, config, prompt_tokens, prompt_mask, eos_id, pad_id, length_penalty, *, beam_width,
                     max_new_tokens):
  cfg, k, n, alpha = config, beam_width, max_new_tokens, length_penalty
  b, tp = prompt_tokens.shape
  prompt_mask = prompt_mask.astype(jnp.int32)
  params = gpt.decode_params(params, cfg)
  cache = gpt.unstack_cache(gpt.init_cache(cfg, b, tp + n - 1))
  cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n - 1), jnp.int32)], axis=1)
  hidden, cache = gpt.forward(params, cfg, prompt_tokens.astype(jnp.int32), cache_mask,
                              gpt.positions_from_mask(prompt_mask), cache, 0)
  logp0 = jax.nn.log_softmax(gpt.unembed(params, cfg, hidden[:, -1]), axis=-1)
  # Beams of a row share the prompt: prefill once, then copy the cache K times. Alive
  # beams always hold t real tokens, so the slot mask and positions are per row.
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  cache_mask = jnp.repeat(cache_mask, k, axis=0)
  start_pos = jnp.repeat(jnp.sum(prompt_mask, axis=1), k)
  bs = {
      "cache": cache,
      "alive_seq": jnp.full((b, k, n), pad_id, jnp.int32),
      # Only beam 0 is live at the start, so the K copies do not produce K identical beams.
      "alive_score": jnp.full((b, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
      "fin_seq": jnp.full((b, k, n), pad_id, jnp.int32),
      "fin_score": jnp.full((b, k), -jnp.inf, jnp.float32),
      "fin_len": jnp.zeros((b, k), jnp.int32),
      "t": jnp.zeros((), jnp.int32),
      "done": jnp.asarray(False),
  }
  bs = _beam_select(bs, jnp.broadcast_to(logp0[:, None, :], (b, k, cfg.vocab_size)), bs["t"], k, eos_id, alpha, n)

  def body(bs):
    t = bs["t"]
    last = jax.lax.dynamic_slice_in_dim(bs["alive_seq"], t - 1, 1, axis=2).reshape(b * k, 1)
    slot = tp + t - 1
    # Prompt slots as given; generated slots tp..slot are real for every alive beam.
    s_idx = jnp.arange(cache_mask.shape[1])[None, :]
    mask = jnp.where(s_idx < tp, cache_mask, (s_idx <= slot).astype(jnp.int32))
    hidden, new_cache = gpt.forward(params, cfg, last, mask, (start_pos + t - 1)[:, None], bs["cache"], slot)
    logp = jax.nn.log_softmax(gpt.unembed(params, cfg, hidden[:, 0]), axis=-1).reshape(b, k, -1)
    return _beam_select({**bs, "cache": new_cache}, logp, t, k, eos_id, alpha, n)

  bs = jax.lax.while_loop(lambda s: (s["t"] < n) & ~s["done"], body, bs)
  # Alive beams are complete hypotheses only if the loop ran all N steps.
  alive_final = jnp.where(bs["t"] == n, bs["alive_score"] / jnp.float32(n) ** alpha, -jnp.inf)
  scores = jnp.concatenate([bs["fin_score"], alive_final], axis=1)
  seqs = jnp.concatenate([bs["fin_seq"], bs["alive_seq"]], axis=1)
  lens = jnp.concatenate([bs["fin_len"], jnp.full((b, k), n, jnp.int32)], axis=1)
  best = jnp.argmax(scores, axis=1)
  pick = lambda x: jnp.take_along_axis(x, best.reshape((b,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return {"tokens": pick(seqs), "scores": pick(scores), "lengths": pick(lens)}


def beam_search(params, config, prompt_tokens, prompt_mask, *, beam_width: int, max_new_tokens: int,
                eos_id: int | None, pad_id: int, length_penalty: float = 1.0) -> dict:
  """Beam search on the KV cache (one jitted program); returns the best hypothesis per row.

  Log-probs are at temperature 1. A hypothesis y_1..y_L (L counts generated tokens
  including the EOS; L = max_new_tokens for a beam that never emitted EOS) scores
      score = (sum_{i<=L} log p(y_i | prompt, y_<i)) / L ** length_penalty
  (length_penalty 0: raw sum; 1: mean log-prob). Finished (EOS) hypotheses are kept in
  a pool of the beam_width best scores; alive beams are ranked by their raw sum. The
  loop stops early once no alive beam can beat the best finished one (exact when
  length_penalty >= 0). eos_id None = no EOS. Static (recompiling): shapes, beam_width,
  max_new_tokens; eos_id, pad_id and length_penalty are traced.
  prompt_tokens int [B,Tp], prompt_mask [B,Tp] (LEFT-padded).
  Returns dict: tokens int32 [B,N] (pad_id after EOS), scores float32 [B], lengths int32 [B].
  """
  cfg = _config(config)
  _check_prompt(cfg, prompt_tokens, prompt_mask, max_new_tokens, "beam_search")
  if not isinstance(beam_width, (int, np.integer)) or beam_width < 1:
    raise ValueError(f"{_WHERE}:beam_search: beam_width must be an int >= 1, got {beam_width!r}")
  if cfg.vocab_size < 2:
    raise ValueError(f"{_WHERE}:beam_search: needs vocab_size >= 2, got {cfg.vocab_size}")
  if not math.isfinite(float(length_penalty)):
    raise ValueError(f"{_WHERE}:beam_search: length_penalty must be finite, got {length_penalty!r}")
  eos, pad = _token_ids(cfg, eos_id, pad_id, "beam_search")
  return _beam_search_jit(params, cfg, prompt_tokens, prompt_mask, eos, pad, jnp.float32(length_penalty),
                          beam_width=int(beam_width), max_new_tokens=int(max_new_tokens))
