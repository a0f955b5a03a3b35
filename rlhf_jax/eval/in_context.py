"""In-context evaluation (GPT-2 zero-shot, GPT-3 few-shot): no gradient updates, only prompts.

A query task of the synthetic world (held-out `eval` split) is preceded by k demonstrations
(train-split tasks answered with their canonical answer) in one of three text formats:

  hh    "\\n\\nHuman: <task>\\n\\nAssistant: <answer>" per exchange (the pretraining corpus's HH form)
  qa    "Q: <task>\\nA: <answer>\\n\\n" per exchange (a format the corpus never contains)
  chat  "<|user|><task><|assistant|><answer><|endoftext|>" per exchange (chat_format)

(The default pretraining corpus contains hh and chat exchanges with mostly misaligned answers and
no qa text; with `synthetic.pretraining_corpus(fewshot_fraction > 0)` it also holds lists of
correctly solved same-family train-split tasks in all three formats.)

Every prompt starts with EOS, the document separator of the packed pretraining stream. Two scores:

  exact match     greedy generation (sampling.generate), cut at the first newline / special token,
                  whitespace-stripped, compared with the canonical answer;
  multiple choice log-likelihood of each candidate continuation (answer + terminator: "\\n" for
                  hh/qa, EOS for chat) given the prompt; the correct answer competes with distractors
                  from `synthetic.sample_response` (wrong / partial / unhelpful; comply for harmful
                  tasks). Scored by the summed and by the per-token mean log-prob.

All model calls are jitted with fixed shapes (fixed batch size and row length; the last batch is
padded with copies), so each (model, shape) compiles once. Everything is deterministic in `seed`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.data import batching, chat_format, synthetic
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.eval import bootstrap

_WHERE = "rlhf_jax/eval/in_context.py"
FORMATS = ("hh", "qa", "chat")
_DISTRACTOR_STYLES = {False: ("wrong", "partial", "unhelpful"), True: ("comply", "unhelpful")}


@dataclasses.dataclass(frozen=True)
class Example:
  """One query with its demonstration pool and answer candidates.

  demos: up to max_k demonstration tasks; a k-shot prompt uses demos[:k] (so k-shot prompts are
  nested in each other). choices: candidate answers, choices[label] == query.answer.
  """
  query: synthetic.Task
  demos: tuple[synthetic.Task, ...]
  choices: tuple[str, ...]
  label: int


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"{_WHERE}: format must be one of {FORMATS}, got {fmt!r}")


def _task_in_split(rng: np.random.Generator, split: str, family: str) -> synthetic.Task:
  while True:  # rejection sampling; acceptance is >= 20% for either split
    task = synthetic.sample_task(rng, family)
    if synthetic.task_split(task) == split:
      return task


def _choices(rng: np.random.Generator, task: synthetic.Task, n_choices: int) -> tuple[tuple[str, ...], int]:
  styles = _DISTRACTOR_STYLES[task.harmful]
  out: list[str] = []
  for _ in range(1000):  # `unhelpful` alone has 6 distinct texts, so n_choices <= 7 always fills
    if len(out) == n_choices - 1:
      break
    text, _ = synthetic.sample_response(rng, task, styles[int(rng.integers(len(styles)))])
    if text != task.answer and text not in out:
      out.append(text)
  if len(out) < n_choices - 1:
    raise ValueError(f"{_WHERE}: could not find {n_choices - 1} distinct distractors for {task.prompt_text!r}")
  label = int(rng.integers(n_choices))
  out.insert(label, task.answer)
  return tuple(out), label


def make_examples(n: int, max_k: int, seed: int = 0, *, n_choices: int = 4,
                  families: Sequence[str] = synthetic.BENIGN_FAMILIES, same_family: bool = True) -> list[Example]:
  """n examples: query from the eval split (family uniform over `families`), max_k train-split
  demonstrations (of the query's family when same_family, as GPT-3 demonstrates the same task)."""
  if n < 1 or max_k < 0 or not 2 <= n_choices <= 7:
    raise ValueError(f"{_WHERE}: need n >= 1, max_k >= 0 and 2 <= n_choices <= 7; got {n}, {max_k}, {n_choices}")
  bad = [f for f in families if f not in synthetic.FAMILIES]
  if bad or not families:
    raise ValueError(f"{_WHERE}: unknown families {bad} (known: {synthetic.FAMILIES})")
  rng = np.random.default_rng([int(seed), 7])
  out = []
  for _ in range(n):
    family = families[int(rng.integers(len(families)))]
    query = _task_in_split(rng, "eval", family)
    demos = tuple(_task_in_split(rng, "train", family if same_family else
                                 families[int(rng.integers(len(families)))]) for _ in range(max_k))
    choices, label = _choices(rng, query, n_choices)
    out.append(Example(query, demos, choices, label))
  return out


# ------------------------------------------------------------------------------ prompts
def render_prompt(demos: Sequence[synthetic.Task], query: synthetic.Task, fmt: str) -> str:
  """The k-shot prompt text (without the leading EOS); it ends where the answer should start."""
  _check_format(fmt)
  if fmt == "chat":
    msgs = []
    for d in demos:
      msgs += [{"role": "user", "content": d.prompt_text}, {"role": "assistant", "content": d.answer}]
    return chat_format.render_chat(msgs + [{"role": "user", "content": query.prompt_text}],
                                   add_generation_prompt=True)
  if fmt == "hh":
    shots = "".join(f"\n\nHuman: {d.prompt_text}\n\nAssistant: {d.answer}" for d in demos)
    return shots + f"\n\nHuman: {query.prompt_text}\n\nAssistant:"
  shots = "".join(f"Q: {d.prompt_text}\nA: {d.answer}\n\n" for d in demos)
  return shots + f"Q: {query.prompt_text}\nA:"


def continuation_ids(tok: Tokenizer, answer: str, fmt: str) -> list[int]:
  """Token ids of an answer as the model should continue the prompt, with the end-of-answer marker."""
  _check_format(fmt)
  if fmt == "chat":
    return tok.encode(answer) + [tok.eos_id]
  return tok.encode(f" {answer}\n")


def prompt_ids(tok: Tokenizer, demos: Sequence[synthetic.Task], query: synthetic.Task, fmt: str,
               budget: int) -> tuple[list[int], int]:
  """(ids, shots used): EOS + the prompt, dropping the oldest demonstrations until it fits `budget`.

  Raises ValueError if even the zero-shot prompt is longer than budget.
  """
  for start in range(len(demos) + 1):
    ids = [tok.eos_id] + tok.encode(render_prompt(demos[start:], query, fmt))
    if len(ids) <= budget:
      return ids, len(demos) - start
  raise ValueError(f"{_WHERE}: the zero-shot {fmt} prompt for {query.prompt_text!r} has {len(ids)} tokens, "
                   f"more than the budget of {budget}")


def extract_answer(tok: Tokenizer, ids: Sequence[int]) -> str:
  """Generated ids -> answer text: up to the first stop token (`tok.stop_ids`), then up to the
  first newline."""
  ids = list(ids)
  cut = next((i for i, t in enumerate(ids) if int(t) in tok.stop_ids), len(ids))
  return tok.decode(ids[:cut]).split("\n", 1)[0].strip()


# ------------------------------------------------------------------------------ scoring
@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprobs(params, config, tokens, attention_mask, target_mask):
  """Summed log-prob of the marked tokens given everything before them.

  tokens, attention_mask, target_mask: int32 [B,T] (right-padded; target_mask 1 on the tokens to
  score, never on column 0). Returns (sum float32 [B], count int32 [B]).
  """
  lp = sampling.sequence_logprobs(params, config, tokens, attention_mask)       # [B,T-1]
  m = target_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(lp * m, axis=-1), jnp.sum(target_mask[:, 1:], axis=-1).astype(jnp.int32)


def choice_scores(params, cfg, tok: Tokenizer, examples: Sequence[Example], k: int, fmt: str, *,
                  max_len: int, batch_size: int = 64) -> dict[str, np.ndarray]:
  """Log-likelihood of every candidate. Returns sum, mean: float32 [N,C]; shots: int32 [N]."""
  if max_len > cfg.max_len:
    raise ValueError(f"{_WHERE}: max_len={max_len} exceeds the model's context window {cfg.max_len}")
  rows, shots = [], []
  for ex in examples:
    conts = [continuation_ids(tok, c, fmt) for c in ex.choices]
    ids, used = prompt_ids(tok, ex.demos[:k], ex.query, fmt, max_len - max(map(len, conts)))
    shots.append(used)
    for cont in conts:
      toks = np.full(max_len, tok.pad_id, np.int32)
      att, tgt = np.zeros(max_len, np.int32), np.zeros(max_len, np.int32)
      toks[:len(ids) + len(cont)] = ids + cont
      att[:len(ids) + len(cont)] = 1
      tgt[len(ids):len(ids) + len(cont)] = 1
      rows.append((toks, att, tgt))
  padded = batching.pad_to_batches(rows, batch_size)
  sums, counts = padded.unpad([jax.device_get(continuation_logprobs(params, cfg, t, a, g))
                               for t, a, g in padded.batches])
  n_c = len(examples[0].choices)
  total = sums.reshape(len(examples), n_c)
  count = counts.reshape(len(examples), n_c)
  return {"sum": total, "mean": total / np.maximum(count, 1), "shots": np.asarray(shots, np.int32)}


def greedy_answers(params, cfg, tok: Tokenizer, examples: Sequence[Example], k: int, fmt: str, *,
                   max_prompt_len: int, max_new_tokens: int = 16, batch_size: int = 64
                   ) -> tuple[list[str], np.ndarray]:
  """Greedy answers (extract_answer of `sampling.generate` output) and shots used int32 [N]."""
  rows, shots = [], []
  for ex in examples:
    ids, used = prompt_ids(tok, ex.demos[:k], ex.query, fmt, max_prompt_len)
    toks = np.full(max_prompt_len, tok.pad_id, np.int32)
    mask = np.zeros(max_prompt_len, np.int32)
    toks[max_prompt_len - len(ids):], mask[max_prompt_len - len(ids):] = ids, 1   # LEFT padding
    rows.append((toks, mask))
    shots.append(used)
  answers = []
  padded = batching.pad_to_batches(rows, batch_size)
  for (t, m), valid in zip(padded.batches, padded.valid):
    out = jax.device_get(sampling.generate(params, cfg, t, m, jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                                           eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True))
    answers += [extract_answer(tok, out["tokens"][r, :int(out["lengths"][r])]) for r in np.flatnonzero(valid)]
  return answers, np.asarray(shots, np.int32)


def evaluate(params, cfg, tok: Tokenizer, examples: Sequence[Example], ks: Sequence[int], fmt: str, *,
             max_len: int | None = None, max_new_tokens: int = 16, batch_size: int = 64) -> dict[int, dict]:
  """Accuracies per k: {k: {exact_match, mc_sum, mc_mean, mean_shots_em, mean_shots_mc, chance_mc}}
  (floats), each accuracy with `<name>_se` (binomial standard error over the examples,
  sqrt(p (1 - p) / n)); also exact_match_ci95 ([low, high], percentile bootstrap over examples,
  `bootstrap.mean_ci`) and exact_match_correct (0/1 per example, in order: the k's share the
  examples, so `exact_match_gain` can pair them).

  max_len: row length for multiple choice (default: the context window); generation prompts get
  max_len - max_new_tokens + 1 tokens so prompt + answer fit the window.
  """
  max_len = cfg.max_len if max_len is None else int(max_len)
  if max(ks) > min(len(e.demos) for e in examples):
    raise ValueError(f"{_WHERE}: k={max(ks)} needs that many demonstrations per example (make_examples max_k)")
  labels = np.asarray([e.label for e in examples])
  out = {}
  for k in ks:
    sc = choice_scores(params, cfg, tok, examples, k, fmt, max_len=max_len, batch_size=batch_size)
    answers, shots_em = greedy_answers(params, cfg, tok, examples, k, fmt, max_prompt_len=max_len - max_new_tokens + 1,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = {"exact_match": np.asarray([a == e.query.answer for a, e in zip(answers, examples)], np.float64),
            "mc_sum": (sc["sum"].argmax(1) == labels).astype(np.float64),
            "mc_mean": (sc["mean"].argmax(1) == labels).astype(np.float64)}
    res = {}
    for name, h in hits.items():
      res[name], res[f"{name}_se"] = float(h.mean()), binomial_se(h)
    res.update(exact_match_ci95=list(bootstrap.mean_ci(hits["exact_match"], seed=int(k))),
               exact_match_correct=hits["exact_match"].astype(int).tolist(),
               mean_shots_em=float(shots_em.mean()), mean_shots_mc=float(sc["shots"].mean()),
               chance_mc=1.0 / len(examples[0].choices))
    out[int(k)] = res
  return out


def binomial_se(hits) -> float:
  """Standard error sqrt(p (1 - p) / n) of the accuracy of n 0/1 outcomes."""
  h = np.asarray(hits, np.float64)
  if h.ndim != 1 or h.size == 0:
    raise ValueError(f"{_WHERE}: binomial_se needs a non-empty 1-D array of 0/1 outcomes, got shape {h.shape}")
  p = float(h.mean())
  return float(np.sqrt(p * (1.0 - p) / h.size))


def exact_match_gain(by_k: dict, k_hi: int, k_lo: int = 0) -> dict:
  """Exact-match gain from k_lo to k_hi demonstrations on the same examples (`evaluate`'s output).

  Returns {diff, se_unpaired: sqrt(se_hi^2 + se_lo^2) of the two binomial SEs, se_paired: std of
  the per-example differences / sqrt(n), z_unpaired: diff / se_unpaired (inf when diff > 0 and the
  SE is 0)} (floats).
  """
  hi = np.asarray(by_k[k_hi]["exact_match_correct"], np.float64)
  lo = np.asarray(by_k[k_lo]["exact_match_correct"], np.float64)
  if hi.shape != lo.shape or hi.size == 0:
    raise ValueError(f"{_WHERE}: exact_match_gain needs both k's scored on the same examples")
  diff = float(hi.mean() - lo.mean())
  se_u = float(np.hypot(binomial_se(hi), binomial_se(lo)))
  d = hi - lo
  se_p = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
  z = diff / se_u if se_u > 0 else (float("inf") if diff > 0 else 0.0)
  return {"diff": diff, "se_unpaired": se_u, "se_paired": se_p, "z_unpaired": float(z)}
