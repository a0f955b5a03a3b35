"""GPT-1 input transforms (Radford et al. 2018, Fig. 1): structured inputs -> token sequences.

Every task input becomes one or more token sequences framed by three special tokens, start
`<|start|>` (the paper's <s>), delimiter `<|delim|>` ($) and extract `<|extract|>` (<e>); the
task head reads the final hidden state at the extract token:

  classification   [s] text [e]
  entailment       [s] premise [$] hypothesis [e]
  similarity       [s] A [$] B [e]  and  [s] B [$] A [e]   (both orders; features are added)
  multiple choice  [s] context [$] option_i [e]  for each option (one scalar each)

Special tokens. Our tokenizers carry five chat specials (`tokenizer.SPECIAL_TOKENS`, ids 0-4 in
a fresh BPE) and no reserved ids, so the three task tokens are real added tokens:
  * a BPE trained for this experiment lists them after the base specials
    (`train_task_bpe`: ids 5, 6, 7; the base ids do not move);
  * an existing tokenizer (e.g. a pretraining workdir's) gets them appended after its last id
    (`add_task_tokens`: ids V, V+1, V+2), and the model's token table must grow by three rows
    (`rlhf_jax.gpt1.heads.grow_vocab`).
Task text that itself contains a special-token string is rejected (it would break the layout).

Sequences longer than `max_len` are cut: the longest text segment loses tokens from its right end
until the whole fits (`fit_segments`); the cut depends only on the segment lengths, so both orders
of a similarity pair are cut identically.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import tokenizers

from rlhf_jax.data import tokenizer as tok_lib
# The task names, record fields and task specials are data (the gpt1_tasks builder reads them too).
from rlhf_jax.data.gpt1_schema import DELIM, EXTRACT, FIELDS, START, TASK_TOKENS, TASKS  # noqa: F401


@dataclasses.dataclass(frozen=True)
class TaskTokens:
  """Ids of the three task specials and of padding."""
  start: int
  delim: int
  extract: int
  pad: int


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"gpt1: unknown task {task!r}; choose one of {TASKS}")
  return task


def train_task_bpe(texts, vocab_size: int) -> tok_lib.Tokenizer:
  """A byte-level BPE with the base specials (ids 0-4) followed by the task specials (5-7)."""
  return tok_lib.train_bpe(texts, vocab_size, special_tokens=tok_lib.SPECIAL_TOKENS + TASK_TOKENS)


def add_task_tokens(tok: tok_lib.Tokenizer) -> tok_lib.Tokenizer:
  """A copy of `tok` with any missing task special appended after its last id (others unchanged)."""
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  missing = [t for t in TASK_TOKENS if backend.token_to_id(t) is None]
  if missing:
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
  return tok_lib.Tokenizer(backend)


def task_tokens(tok: tok_lib.Tokenizer) -> TaskTokens:
  """The task special ids of `tok`; ValueError if it lacks them (see `add_task_tokens`)."""
  ids = [tok.backend.token_to_id(t) for t in TASK_TOKENS]
  if any(i is None for i in ids):
    raise ValueError(f"gpt1: tokenizer lacks the task tokens {TASK_TOKENS}; use train_task_bpe or add_task_tokens")
  return TaskTokens(*ids, pad=tok.pad_id)


def _encode_text(tok: tok_lib.Tokenizer, text: str, forbidden: frozenset, where: str) -> list[int]:
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"gpt1: {where}: expected a non-blank string, got {text!r}")
  ids = tok.encode(text)
  if any(i in forbidden for i in ids):
    raise ValueError(f"gpt1: {where}: text contains a special-token string: {text[:80]!r}")
  return ids


def fit_segments(segments: Sequence[Sequence[int]], budget: int) -> tuple[list[list[int]], bool]:
  """Cuts the longest segment (ties: the first) one token at a time from its right end until the
  total length is <= budget. Returns (segments, whether anything was cut)."""
  segs = [list(s) for s in segments]
  if budget < len(segs):
    raise ValueError(f"gpt1: max_len leaves {budget} text tokens for {len(segs)} segments")
  cut = False
  while sum(map(len, segs)) > budget:
    i = max(range(len(segs)), key=lambda j: (len(segs[j]), -j))
    segs[i].pop()
    cut = True
  return segs, cut


def _frame(tt: TaskTokens, first: list[int], second: list[int] | None) -> list[int]:
  if second is None:
    return [tt.start] + first + [tt.extract]
  return [tt.start] + first + [tt.delim] + second + [tt.extract]


def layout(task: str, record: Mapping, tok: tok_lib.Tokenizer, max_len: int,
           where: str = "record") -> tuple[list[list[int]], bool]:
  """Token sequences of one record (see module docstring) and whether any was cut to max_len.

  record: the task's fields (FIELDS[task]); multiple choice has "options": list of str.
  Returns one sequence (classification, entailment), two (similarity: [A$B, B$A]) or one per
  option (multiple choice), each at most max_len tokens and ending with the extract token.
  """
  check_task(task)
  tt = task_tokens(tok)
  forbidden = frozenset(tok.special_ids) | {tt.start, tt.delim, tt.extract}
  enc = lambda key, text: _encode_text(tok, text, forbidden, f"{where}: key {key!r}")
  for key in FIELDS[task]:
    if key not in record:
      raise ValueError(f"gpt1: {where}: missing key {key!r} for task {task!r}")
  if task == "classification":
    (text,), cut = fit_segments([enc("text", record["text"])], max_len - 2)
    return [_frame(tt, text, None)], cut
  if task == "multiple_choice":
    options = record["options"]
    if not isinstance(options, (list, tuple)) or not options:
      raise ValueError(f"gpt1: {where}: key 'options': expected a non-empty list of strings")
    context = enc("context", record["context"])
    out, any_cut = [], False
    for i, option in enumerate(options):
      (c, o), cut = fit_segments([context, enc(f"options[{i}]", option)], max_len - 3)
      out.append(_frame(tt, c, o))
      any_cut |= cut
    return out, any_cut
  first, second = FIELDS[task]
  (a, b), cut = fit_segments([enc(first, record[first]), enc(second, record[second])], max_len - 3)
  if task == "entailment":
    return [_frame(tt, a, b)], cut
  return [_frame(tt, a, b), _frame(tt, b, a)], cut
