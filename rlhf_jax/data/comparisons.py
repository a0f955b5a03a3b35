"""Comparison records made from model samples: gold labelling and K-way -> pair expansion.

`label_comparisons` is the synthetic world's stand-in for InstructGPT's labelling stage: for each
prompt, K sampled responses are ranked by the gold labeler (`gold.rank`, optionally with
Plackett-Luce noise) and stored as a comparison record (`records.py` schema: dense ranks, 0 =
best). `comparisons_to_pairs` turns K-way records into independent K = 2 records, for the
experiment that compares K-wise batching with shuffled pairs.

Both return a `RecordList`: a plain list of records with a `.stats` (`records.Tally`) that counts
what was left out and why; the counts are also logged.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import gold, records

log = logging.getLogger(__name__)

_PASS_THROUGH = ("id", "task")  # keys copied from the source record when present


class RecordList(list):
  """A list of records with the `records.Tally` of the step that produced it as `.stats`."""

  stats: records.Tally





def _prompt_messages(record: Any, where: str) -> list[dict]:
  messages = records.require(record, "messages", where)
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"comparisons.py: {where}: key 'messages': expected a non-empty list of messages")
  if not isinstance(messages[-1], Mapping) or messages[-1].get("role") == "assistant":
    raise ValueError(f"comparisons.py: {where}: key 'messages': the prompt must end with a user turn")
  return list(messages)


def _gold_prompt(record: Mapping, messages: list[dict], where: str) -> Any:
  """What `gold.rank` scores against: the task dict when the record has one (the synthetic
  builder stores it as a JSON string), else the messages."""
  task = record.get("task")
  if task is None:
    return messages
  if isinstance(task, str):
    try:
      task = json.loads(task)
    except json.JSONDecodeError as e:
      raise ValueError(f"comparisons.py: {where}: key 'task': not valid JSON ({e.msg})") from None
  if not isinstance(task, Mapping):
    raise ValueError(f"comparisons.py: {where}: key 'task': expected a dict or JSON object string")
  return dict(task)


def _carry(record: Mapping) -> dict:
  return {k: record[k] for k in _PASS_THROUGH if k in record}


def label_comparisons(prompt_records: Sequence[Mapping[str, Any]],
                      responses_per_prompt: Sequence[Sequence[str]], rng: np.random.Generator | None,
                      noise_temperature: float = 0.0, scorer=None) -> RecordList:
  """Gold-ranked comparison records, one per prompt that has a preference to learn.

  prompt_records[i] is a prompt record ({"messages"} ending with a user turn, optionally "task"
  and "id"), responses_per_prompt[i] its K sampled responses (str). Per prompt: blank responses
  and repeats (equal after strip, first kept) are removed; the rest are ranked by
  `gold.rank(..., rng, noise_temperature)` and the ranks made dense. Prompts left with < 2
  responses (`fewer_than_2_unique`) or with all responses tied (`all_tied`) are skipped and
  counted in `.stats`. Output records: {"messages", "responses", "ranks"} plus "id"/"task" if
  present. rng is only used (and required) when noise_temperature > 0. scorer: the gold scorer
  (`gold.rank`'s; default the text world's `gold.score`).
  """
  if len(prompt_records) != len(responses_per_prompt):
    raise ValueError(f"comparisons.py: {len(prompt_records)} prompt records but "
                     f"{len(responses_per_prompt)} response lists")
  out = RecordList()
  tally = records.Tally(extra={"empty_removed": 0, "duplicates_removed": 0})
  for i, (record, responses) in enumerate(zip(prompt_records, responses_per_prompt)):
    where = records.record_where(record, i)
    messages = _prompt_messages(record, where)
    if isinstance(responses, str) or not all(isinstance(r, str) for r in responses):
      raise ValueError(f"comparisons.py: {where}: responses must be a list of str")
    tally.seen += 1
    unique, seen = [], set()
    for r in responses:
      key = r.strip()
      if not key:
        tally.extra["empty_removed"] += 1
      elif key in seen:
        tally.extra["duplicates_removed"] += 1
      else:
        seen.add(key)
        unique.append(r)
    if len(unique) < 2:
      tally.skip("fewer_than_2_unique", where)
      continue
    ranks = gold.rank(_gold_prompt(record, messages, where), unique, rng, noise_temperature, scorer)
    if len(set(ranks)) == 1:
      tally.skip("all_tied", where)
      continue
    out.append({**_carry(record), "messages": messages, "responses": unique,
                "ranks": records.dense_ranks(ranks)})
  tally.extra["kept"] = len(out)
  out.stats = tally
  log.log(logging.WARNING if tally.num_skipped else logging.INFO, "label_comparisons: %s; %s",
          tally.summary(), tally.extra)
  return out


def comparisons_to_pairs(comparisons: Sequence[Mapping[str, Any]]) -> RecordList:
  """Every strictly ordered pair of every K-way record as its own K = 2 comparison record.

  Pair (i, j), i < j, keeps the record's response order: responses [r_i, r_j], ranks [0, 1] if
  r_i is better else [1, 0]. Tied pairs carry no preference and are left out (counted in
  `.stats.extra["tied_pairs"]`). Ids become "<id or index>#<i>,<j>"; "task" is carried over.
  """
  out = RecordList()
  tally = records.Tally(extra={"tied_pairs": 0})
  for n, record in enumerate(comparisons):
    where = records.record_where(record, n)
    messages = _prompt_messages(record, where)
    responses = records.require(record, "responses", where)
    ranks = records.require(record, "ranks", where)
    if not isinstance(responses, (list, tuple)) or not isinstance(ranks, (list, tuple, np.ndarray)) \
        or len(responses) != len(ranks):
      raise ValueError(f"comparisons.py: {where}: keys 'responses'/'ranks': expected equal-length lists")
    tally.seen += 1
    base = record.get("id") or str(n)
    for i in range(len(responses)):
      for j in range(i + 1, len(responses)):
        if ranks[i] == ranks[j]:
          tally.extra["tied_pairs"] += 1
          continue
        out.append({**_carry(record), "id": f"{base}#{i},{j}", "messages": messages,
                    "responses": [responses[i], responses[j]],
                    "ranks": [0, 1] if ranks[i] < ranks[j] else [1, 0]})
  tally.extra["pairs"] = len(out)
  out.stats = tally
  log.info("comparisons_to_pairs: %d records -> %d pairs (%d tied pairs left out)",
           tally.seen, len(out), tally.extra["tied_pairs"])
  return out
