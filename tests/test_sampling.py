"""Tests for rlhf_jax/sampling.py against uncached forwards and exhaustive search (tiny random models)."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling
from rlhf_jax.model import gpt
from model_fixtures import init_params  # tests/ is on sys.path

# Large init_std gives peaked next-token distributions, so argmax ties cannot flip
# between the cached and uncached float paths.
CFG = gpt.preset("nano", dropout=0.0, vocab_size=64, max_len=32, init_std=0.3)


def _params():
  return init_params(CFG, 0)


N = 8
PAD = 0
PROMPT_LENS = (6, 3, 1, 5)


def _prompts(lens=PROMPT_LENS, tp=6, vocab=CFG.vocab_size, seed=1):
  """Left-padded prompts [B,tp] with distinct real lengths."""
  rng = np.random.default_rng(seed)
  toks = np.zeros((len(lens), tp), np.int32)
  mask = np.zeros((len(lens), tp), np.int32)
  for b, n in enumerate(lens):
    toks[b, tp - n:] = rng.integers(1, vocab, n)
    mask[b, tp - n:] = 1
  return jnp.asarray(toks), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(1,))
def _logits(params, cfg, tokens, mask):
  return gpt.logits(params, cfg, tokens, mask)


def _reference_greedy(params, cfg, toks, mask, n):
  """Greedy decoding by repeated uncached forwards on the growing sequence.

  The buffer has fixed width Tp+n; the not-yet-generated tail is marked real but
  causal attention means logits at column Tp-1+i only see columns <= Tp-1+i.
  """
  b, tp = toks.shape
  buf = np.concatenate([np.asarray(toks), np.zeros((b, n), np.int32)], 1)
  full_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], 1)
  out, logits_seen = [], []
  for i in range(n):
    lg = np.asarray(_logits(params, cfg, jnp.asarray(buf), full_mask))[:, tp - 1 + i]
    tok = lg.argmax(-1)
    buf[:, tp + i] = tok
    out.append(tok)
    logits_seen.append(lg)
  return np.stack(out, 1), np.stack(logits_seen, 1)


def _gen(**kw):
  toks, mask = _prompts()
  args = dict(max_new_tokens=N, eos_id=None, pad_id=PAD)
  args.update(kw)
  rng = args.pop("rng", jax.random.PRNGKey(7))
  return {k: np.asarray(v) for k, v in sampling.generate(_params(), CFG, toks, mask, rng, **args).items()}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def greedy_ref():
  toks, mask = _prompts()
  return _reference_greedy(_params(), CFG, toks, mask, N)


def test_cached_greedy_matches_uncached_argmax(greedy_ref):
  ref_tokens, ref_logits = greedy_ref
  out = _gen(greedy=True, temperature=0.7)
  np.testing.assert_array_equal(out["tokens"], ref_tokens)
  # Greedy log-probs are still reported under the temperature-scaled distribution.
  ref_lp = np.take_along_axis(_log_softmax(ref_logits / 0.7), ref_tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out["logprobs"], ref_lp, atol=1e-4)
  np.testing.assert_array_equal(out["mask"], 1)
  np.testing.assert_array_equal(out["lengths"], N)
  assert not out["ended"].any()
  assert out["tokens"].dtype == np.int32 and out["logprobs"].dtype == np.float32


def test_top_k_1_and_tiny_top_p_equal_greedy(greedy_ref):
  ref_tokens, _ = greedy_ref
  np.testing.assert_array_equal(_gen(top_k=1)["tokens"], ref_tokens)
  np.testing.assert_array_equal(_gen(top_p=1e-6, temperature=1.3)["tokens"], ref_tokens)


def test_sampled_logprobs_match_recomputed_sequence_logprobs():
  toks, mask = _prompts()
  temp, tp = 0.7, toks.shape[1]
  out = _gen(temperature=temp, top_k=20, top_p=0.9, eos_id=5, rng=jax.random.PRNGKey(3))
  full = jnp.concatenate([toks, jnp.asarray(out["tokens"])], 1)
  full_mask = jnp.concatenate([mask, jnp.asarray(out["mask"])], 1)
  lp_fn = jax.jit(sampling.sequence_logprobs, static_argnums=(1,))
  recomputed = np.asarray(lp_fn(_params(), CFG, full, full_mask, temp))[:, tp - 1:]
  m = out["mask"] > 0
  np.testing.assert_allclose(recomputed[m], out["logprobs"][m], atol=1e-4)
  np.testing.assert_array_equal(recomputed[~m], 0.0)
  # Filtered sampling: every sampled token had probability > 0 in the unfiltered distribution and
  # the reported log-probs are the unfiltered (T-scaled) ones, so they are < 0 and not renormalised.
  assert (out["logprobs"][m] < 0).all()


def test_filter_logits_against_numpy():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 17))
  cases = [(5, 1.0), (0, 0.6), (6, 0.5), (17, 0.3)]
  filtered = jax.jit(lambda x: [sampling.filter_logits(x, k, p) for k, p in cases])(x)
  for (k, p), f in zip(cases, filtered):
    got = np.isfinite(np.asarray(f))
    xs = np.asarray(x, np.float64)
    for r in range(3):
      order = np.argsort(-xs[r])
      keep = np.zeros(17, bool)
      cand = order[:k] if k else order
      probs = np.exp(xs[r, cand] - xs[r, cand].max())
      probs /= probs.sum()
      before = np.cumsum(probs) - probs
      keep[cand[before < p]] = True
      np.testing.assert_array_equal(got[r], keep, err_msg=f"top_k={k} top_p={p} row {r}")


def test_eos_stops_each_row_and_pads():
  rng = jax.random.PRNGKey(11)
  free = _gen(rng=rng, eos_id=None)
  eos = int(free["tokens"][0, 2])  # row 0 must stop at step <= 2; other rows wherever it first occurs
  out = _gen(rng=rng, eos_id=eos, pad_id=63)
  for b in range(len(PROMPT_LENS)):
    hits = np.nonzero(free["tokens"][b] == eos)[0]
    length = int(hits[0]) + 1 if hits.size else N
    assert out["lengths"][b] == length and out["ended"][b] == bool(hits.size)
    np.testing.assert_array_equal(out["mask"][b], np.arange(N) < length)
    # Same rng stream: identical up to and including EOS, then pad / 0.
    np.testing.assert_array_equal(out["tokens"][b, :length], free["tokens"][b, :length])
    np.testing.assert_array_equal(out["tokens"][b, length:], 63)
    np.testing.assert_allclose(out["logprobs"][b, :length], free["logprobs"][b, :length], atol=1e-6)
    np.testing.assert_array_equal(out["logprobs"][b, length:], 0.0)
  assert out["lengths"][0] <= 3


def test_all_rows_end_immediately_when_eos_dominates():
  # ln_f with scale 0 and bias u makes every hidden state u; wte[eos] = 10 u makes EOS the argmax.
  eos = 9
  u = jax.random.normal(jax.random.PRNGKey(5), (CFG.d_model,))
  params = jax.tree.map(lambda x: x, _params())
  params["ln_f"] = {"scale": jnp.zeros_like(u), "bias": u}
  params["wte"] = params["wte"].at[eos].set(10.0 * u)
  toks, mask = _prompts()
  out = sampling.generate(params, CFG, toks, mask, jax.random.PRNGKey(0), max_new_tokens=N, eos_id=eos,
                          pad_id=PAD, temperature=0.7, top_k=20, top_p=0.9)
  np.testing.assert_array_equal(out["tokens"][:, 0], eos)
  np.testing.assert_array_equal(out["tokens"][:, 1:], PAD)
  np.testing.assert_array_equal(out["lengths"], 1)
  np.testing.assert_array_equal(out["mask"].sum(1), 1)
  assert np.asarray(out["ended"]).all()


def test_rng_determinism():
  a = _gen(rng=jax.random.PRNGKey(1))
  b = _gen(rng=jax.random.PRNGKey(1))
  c = _gen(rng=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
  assert (a["tokens"] != c["tokens"]).any()


def test_prefill_decode_step_stream_equals_generate():
  toks, mask = _prompts()
  spec = sampling.SamplingSpec(top_k=20, top_p=0.9)
  state = sampling.prefill(_params(), CFG, toks, mask, jax.random.PRNGKey(4), max_new_tokens=N,
                           temperature=0.8, eos_id=5, pad_id=PAD, spec=spec)
  for _ in range(N - 1):
    state = sampling.decode_step(_params(), CFG, state, spec=spec)
  streamed = sampling.outputs(state)
  ref = _gen(rng=jax.random.PRNGKey(4), temperature=0.8, top_k=20, top_p=0.9, eos_id=5)
  for k in ref:
    np.testing.assert_allclose(np.asarray(streamed[k]), ref[k], atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="already holds all"):
    sampling.decode_step(_params(), CFG, state, spec=spec)
  # The decoding layout, computed once per stream (as chat does), gives the same stream.
  dec = sampling.decode_layout(_params(), CFG)
  assert isinstance(dec["blocks"], tuple) and sampling.decode_layout(dec, CFG)["blocks"] is not None
  state = sampling.prefill(dec, CFG, toks, mask, jax.random.PRNGKey(4), max_new_tokens=N,
                           temperature=0.8, eos_id=5, pad_id=PAD, spec=spec)
  for _ in range(N - 1):
    state = sampling.decode_step(dec, CFG, state, spec=spec)
  for k, v in sampling.outputs(state).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(streamed[k]), atol=1e-6, err_msg=k)


def test_bad_inputs_raise():
  toks, mask = _prompts()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="LEFT-padded"):
    sampling.generate(_params(), CFG, toks, mask[:, ::-1], key, max_new_tokens=2, eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="context window"):
    sampling.generate(_params(), CFG, toks, mask, key, max_new_tokens=CFG.max_len, eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.generate(_params(), CFG, toks, mask, key, max_new_tokens=2, temperature=0.0, eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(_params(), CFG, toks, mask, key, max_new_tokens=2, top_p=0.0, eos_id=None, pad_id=0)
  with pytest.raises(ValueError, match="eos_id"):
    sampling.generate(_params(), CFG, toks, mask, key, max_new_tokens=2, eos_id=CFG.vocab_size, pad_id=0)
  with pytest.raises(ValueError, match="beam_width"):
    sampling.beam_search(_params(), CFG, toks, mask, beam_width=0, max_new_tokens=2, eos_id=None, pad_id=0)


# ----------------------------------------------------------------- beam search
SMALL = gpt.GPTConfig(vocab_size=6, max_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.0, init_std=0.5)


def _small_params():
  return init_params(SMALL, 2)


def _exhaustive_best(params, cfg, toks, mask, n, eos_id, alpha):
  """Scores every sequence in V**n (truncated at its first EOS) by sum logp / length**alpha."""
  v = cfg.vocab_size
  conts = np.array(list(itertools.product(range(v), repeat=n)), np.int32)   # [V**n, n]
  best = []
  for b in range(toks.shape[0]):
    tp = toks.shape[1]
    seq = np.concatenate([np.repeat(np.asarray(toks[b:b + 1]), len(conts), 0), conts], 1)
    m = np.concatenate([np.repeat(np.asarray(mask[b:b + 1]), len(conts), 0), np.ones_like(conts)], 1)
    lp = _log_softmax(np.asarray(_logits(params, cfg, jnp.asarray(seq), jnp.asarray(m))))
    tok_lp = np.take_along_axis(lp[:, tp - 1:-1], conts[..., None], -1)[..., 0]    # [V**n, n]
    cands = {}
    for c, l in zip(conts, tok_lp):
      hits = np.nonzero(c == eos_id)[0] if eos_id is not None else []
      length = int(hits[0]) + 1 if len(hits) else n
      cands[tuple(c[:length])] = l[:length].sum() / length ** alpha
    hyp = max(cands, key=cands.get)
    best.append((hyp, cands[hyp]))
  return best


@pytest.mark.parametrize("eos_id,alpha", [(None, 0.0), (2, 0.0), (2, 1.0)])
def test_beam_search_matches_exhaustive_search(eos_id, alpha):
  n = 3
  toks, mask = _prompts(lens=(3, 2), tp=3, vocab=SMALL.vocab_size, seed=3)
  # beam_width = V**(n-1) keeps every prefix alive, so beam search must be exact.
  out = sampling.beam_search(_small_params(), SMALL, toks, mask, beam_width=SMALL.vocab_size ** (n - 1),
                             max_new_tokens=n, eos_id=eos_id, pad_id=PAD, length_penalty=alpha)
  for b, (hyp, score) in enumerate(_exhaustive_best(_small_params(), SMALL, toks, mask, n, eos_id, alpha)):
    length = len(hyp)
    assert int(out["lengths"][b]) == length, (b, hyp, out)
    np.testing.assert_array_equal(np.asarray(out["tokens"][b, :length]), hyp)
    np.testing.assert_array_equal(np.asarray(out["tokens"][b, length:]), PAD)
    np.testing.assert_allclose(float(out["scores"][b]), score, atol=1e-4)


def test_beam_width_1_equals_greedy(greedy_ref):
  toks, mask = _prompts()
  out = sampling.beam_search(_params(), CFG, toks, mask, beam_width=1, max_new_tokens=N, eos_id=None, pad_id=PAD)
  ref_tokens, ref_logits = greedy_ref
  np.testing.assert_array_equal(np.asarray(out["tokens"]), ref_tokens)
  ref_lp = np.take_along_axis(_log_softmax(ref_logits), ref_tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out["scores"]), ref_lp.sum(1) / N, atol=1e-4)  # length_penalty 1
  # With an EOS that greedy hits and length_penalty 0, the EOS hypothesis wins at once.
  eos = int(ref_tokens[0, 2])
  out = sampling.beam_search(_params(), CFG, toks, mask, beam_width=1, max_new_tokens=N, eos_id=eos, pad_id=PAD,
                             length_penalty=0.0)
  greedy = _gen(greedy=True, eos_id=eos)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), greedy["tokens"])
  np.testing.assert_array_equal(np.asarray(out["lengths"]), greedy["lengths"])
  np.testing.assert_allclose(np.asarray(out["scores"]), greedy["logprobs"].sum(1), atol=1e-4)
