"""Parse and validate raw RLHF data records into normalised python dicts (no TFDS here).

Normalised schemas (text level; tokenisation happens later):

- demonstration: ``{"messages": [{"role", "content"}, ...]}``; the last message is the assistant
  response and the one before it is a user turn.
- comparison: ``{"messages": [...], "responses": [str] * K, "ranks": [int] * K}``; ``messages``
  ends with a user turn, K >= 2, rank 0 = best, ties allowed. Ranks are stored *dense*
  (the distinct values are 0..m-1 in order), so ``[0, 2, 2]`` is stored as ``[0, 1, 1]``.
- prompt: ``{"messages": [...]}`` ending with a user turn.
- text: ``{"text": str}``.

Message rules (every kind): roles are ``system`` / ``user`` / ``assistant``; ``system`` only as the
first message; at least one ``user`` message; every ``content`` is a non-blank string (kept verbatim,
never stripped, except in HH-RLHF transcripts whose turn markers we cut ourselves).

Bad input policy. A *malformed* record (broken JSON, a missing key, a wrong type, an empty
response, an invalid ranking, an unknown role) raises ``ValueError("<file>:<line>: key '<key>': ...")``
because it means the file is not what the user thinks it is. A *well-formed* record that carries
no usable signal is skipped, and the skip is counted by reason in a :class:`Tally` that the
builders report (log + dataset metadata). Skip reasons:

==========================  =====================================================================
``duplicate_responses``     two responses of a comparison are identical (after ``strip``); for
                            HH-RLHF this is chosen == rejected.
``all_tied``                every response of a comparison has the same rank (no preference).
``prompt_mismatch``         HH-RLHF: chosen and rejected differ before their last
                            ``"\\n\\nAssistant:"`` marker, so there is no shared prompt.
``empty_response``          HH-RLHF / OASST: a response is blank (for user JSONL this is an error).
``malformed_transcript``    HH-RLHF: text before the first turn marker, or no assistant marker.
``empty_turn``              HH-RLHF / OASST: a blank turn inside the prompt dialogue.
``prompt_not_ending_in_user``  HH-RLHF: the prompt dialogue ends with an assistant turn.
``missing_ancestor``        OASST: a message on the path to the root is absent from the file.
``deleted_in_history``      OASST with ``drop_deleted``: a message on the path is deleted.
``empty_text``              text corpus JSONL: the ``text`` field is blank.
==========================  =====================================================================

Blank lines in JSONL and text files are separators, not records, and are not counted.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
Record = dict[str, Any]
_GZIP_MAGIC = b"\x1f\x8b"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class Skip(Exception):
  """Raised by a parser when a well-formed record must be left out; ``reason`` names why."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass
class Tally:
  """Counts the candidate records a parser saw and the ones it skipped, by reason.

  ``seen`` counts candidates (JSONL lines, OASST prompter turns, text units); a candidate is
  either skipped or gives >= 1 kept record. ``first_skip`` keeps the first location per reason
  so a report can point at an example. ``extra`` holds source-specific counts (JSON-able).
  """

  seen: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_skip: dict[str, str] = dataclasses.field(default_factory=dict)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    self.first_skip.setdefault(reason, where)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict[str, Any]:
    return {
        "seen": self.seen,
        "skipped": dict(sorted(self.skipped.items())),
        "first_skip": dict(sorted(self.first_skip.items())),
        **self.extra,
    }

  def summary(self) -> str:
    if not self.skipped:
      return f"{self.seen} seen, 0 skipped"
    parts = ", ".join(
        f"{r}={n} (first at {self.first_skip[r]})" for r, n in sorted(self.skipped.items())
    )
    return f"{self.seen} seen, {self.num_skipped} skipped: {parts}"


# ----------------------------------------------------------------------------------- reading


def field_error(where: str, key: str | None, problem: str) -> ValueError:
  return ValueError(f"{where}: key '{key}': {problem}" if key else f"{where}: {problem}")


def _open_binary(path: str | os.PathLike):
  """Opens ``path`` for binary line reading, un-gzipping by magic bytes, not by suffix."""
  with open(path, "rb") as f:
    head = f.read(len(_LFS_POINTER))
  if head.startswith(_GZIP_MAGIC):
    return gzip.open(path, "rb")
  if head == _LFS_POINTER:
    raise ValueError(
        f"{path}: this is a Git LFS pointer file, not the data; fetch the real file "
        "(git lfs pull, or the media.githubusercontent.com URL)"
    )
  return open(path, "rb")


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """Yields ``(line_number, text)`` for each non-blank line (1-based, UTF-8, gzip aware).

  Raises ``ValueError`` naming the file and line for bytes that are not UTF-8.
  """
  with _open_binary(path) as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise field_error(f"{path}:{n}", None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
      if n == 1:
        line = line.removeprefix("\ufeff")
      if line.strip():
        yield n, line


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
  """Yields ``("<path>:<line>", object)`` per JSON Lines record; each line must be an object."""
  for n, line in read_lines(path):
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise field_error(where, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise field_error(where, None, f"expected a JSON object, got {type(obj).__name__}")
    yield where, obj


def read_text(path: str | os.PathLike) -> str:
  """Reads a whole UTF-8 (optionally gzipped) text file; a bad byte names its line."""
  with _open_binary(path) as f:
    data = f.read()
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise field_error(f"{path}:{line}", None, f"not valid UTF-8 ({e.reason})") from None


def parse_jsonl(
    path: str | os.PathLike,
    parse: Callable[[dict, str], Record | list[Record]],
    tally: Tally,
) -> Iterator[tuple[str, Record]]:
  """Applies ``parse`` to each line of a JSONL file; yields ``(record_id, record)``.

  ``record_id`` is ``"<path>:<line>"`` (``"#i"`` appended when one line gives several records).
  ``Skip`` raised by ``parse`` is counted in ``tally``; ``ValueError`` propagates.
  """
  for where, obj in read_jsonl(path):
    tally.seen += 1
    try:
      out = parse(obj, where)
    except Skip as s:
      tally.skip(s.reason, where)
      continue
    records = out if isinstance(out, list) else [out]
    for i, rec in enumerate(records):
      yield (where if len(records) == 1 else f"{where}#{i}"), rec


# ------------------------------------------------------------------------------ field checks


def record_where(record: Any, index: int) -> str:
  """'record 3' or 'record 3 (id 'file.jsonl:12')': where a record is, for error messages."""
  rid = record.get("id") if isinstance(record, Mapping) else None
  return f"record {index}" + (f" (id {rid!r})" if rid not in (None, "") else "")


def require(record: Any, key: str, where: str) -> Any:
  """``record[key]`` of an already-parsed record; one clear error if it is not a dict or lacks key."""
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a dict record, got {type(record).__name__}")
  if key not in record:
    raise ValueError(f"{where}: missing key {key!r} (record has keys {sorted(record)})")
  return record[key]


def get_field(obj: Mapping, key: str, where: str, label: str | None = None) -> Any:
  """``obj[key]``; ``label`` is the key's name in messages (e.g. ``instances[0].output``)."""
  if key not in obj:
    raise field_error(where, label or key, "missing")
  return obj[key]


def text_field(obj: Mapping, key: str, where: str, *, allow_blank: bool = False,
          label: str | None = None) -> str:
  value = get_field(obj, key, where, label)
  if not isinstance(value, str):
    raise field_error(where, label or key, f"expected a string, got {type(value).__name__}")
  if not allow_blank and not value.strip():
    raise field_error(where, label or key, "is empty")
  return value


def _optional_system(obj: Mapping, where: str) -> list[dict]:
  """An optional ``"system"`` string; absent, null or "" all mean no system message."""
  value = obj.get("system")
  if value is None or value == "":
    return []
  return [{"role": "system", "content": text_field(obj, "system", where)}]


def parse_messages(value: Any, where: str, key: str = "messages") -> list[dict]:
  """Validates a dialogue: a non-empty list of ``{"role", "content"}`` (see module rules)."""
  if not isinstance(value, list) or not value:
    raise field_error(where, key, "expected a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(value):
    k = f"{key}[{i}]"
    if not isinstance(m, dict):
      raise field_error(where, k, f"expected an object, got {type(m).__name__}")
    if "role" not in m:
      raise field_error(where, f"{k}.role", "missing")
    role = m["role"]
    if role not in ROLES:
      raise field_error(where, f"{k}.role", f"unknown role {role!r}; expected one of {ROLES}")
    if role == "system" and i != 0:
      raise field_error(where, f"{k}.role", "a system message is allowed only first")
    if "content" not in m:
      raise field_error(where, f"{k}.content", "missing")
    content = m["content"]
    if not isinstance(content, str):
      raise field_error(where, f"{k}.content", f"expected a string, got {type(content).__name__}")
    if not content.strip():
      raise field_error(where, f"{k}.content", "is empty")
    out.append({"role": role, "content": content})
  if not any(m["role"] == "user" for m in out):
    raise field_error(where, key, "has no user message")
  return out


def _check_not_both(obj: Mapping, where: str) -> None:
  if "messages" in obj and "prompt" in obj:
    raise field_error(where, "messages", "give either 'messages' or 'prompt', not both")


def _prompt_messages(obj: Mapping, where: str) -> list[dict]:
  """The prompt dialogue from ``"messages"`` or ``"prompt"`` (+ optional ``"system"``)."""
  _check_not_both(obj, where)
  if "messages" in obj:
    messages = parse_messages(obj["messages"], where)
  elif "prompt" in obj:
    messages = _optional_system(obj, where) + [
        {"role": "user", "content": text_field(obj, "prompt", where)}
    ]
  else:
    raise field_error(where, "messages", "missing (expected 'messages' or 'prompt')")
  if messages[-1]["role"] != "user":
    raise field_error(where, "messages", f"must end with a user turn, got {messages[-1]['role']!r}")
  return messages


def _instruction_prompt(instruction: str, inp: str) -> str:
  """Self-Instruct / Alpaca prompt: the instruction, then the input after a blank line if any."""
  return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def _instruction_pairs(obj: Mapping, where: str) -> list[tuple[str, str | None, str]]:
  """``(prompt, output, where)`` per instance of a Self-Instruct or Alpaca record.

  Self-Instruct: ``{"instruction", "instances": [{"input", "output"}, ...]}``.
  Alpaca: ``{"instruction", "input"?, "output"}``. ``output`` is None when absent; the third
  item is the key prefix for error messages.
  """
  instruction = text_field(obj, "instruction", where)
  if "instances" in obj:
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
      raise field_error(where, "instances", "expected a non-empty list of {input, output}")
    items = []
    for i, inst in enumerate(instances):
      k = f"instances[{i}]"
      if not isinstance(inst, dict):
        raise field_error(where, k, f"expected an object, got {type(inst).__name__}")
      inp = (text_field(inst, "input", where, allow_blank=True, label=f"{k}.input")
             if "input" in inst else "")
      out = text_field(inst, "output", where, label=f"{k}.output") if "output" in inst else None
      items.append((_instruction_prompt(instruction, inp), out, f"{k}."))
    return items
  inp = text_field(obj, "input", where, allow_blank=True) if "input" in obj else ""
  out = text_field(obj, "output", where) if "output" in obj else None
  return [(_instruction_prompt(instruction, inp), out, "")]


_DEMO_FORMS = "'messages', 'prompt'+'response', 'instruction'+'instances', 'instruction'+'output'"


def parse_demonstrations(obj: Mapping, where: str) -> list[Record]:
  """One JSON object -> demonstration records (several for multi-instance Self-Instruct).

  Accepted: ``{"messages"}`` (ends assistant after user); ``{"prompt", "response", "system"?}``;
  Self-Instruct ``{"instruction", "instances"}``; Alpaca ``{"instruction", "input"?, "output"}``.
  """
  _check_not_both(obj, where)
  if "messages" in obj:
    messages = parse_messages(obj["messages"], where)
    if messages[-1]["role"] != "assistant":
      raise field_error(where, "messages", "must end with the assistant response, "
                   f"got {messages[-1]['role']!r}")
    if len(messages) < 2 or messages[-2]["role"] != "user":
      raise field_error(where, "messages", "the assistant response must follow a user turn")
    return [{"messages": messages}]
  if "prompt" in obj:
    prompt = _prompt_messages(obj, where)
    return [{"messages": prompt + [{"role": "assistant",
                                    "content": text_field(obj, "response", where)}]}]
  if "instruction" in obj:
    records = []
    for prompt, output, prefix in _instruction_pairs(obj, where):
      if output is None:
        raise field_error(where, f"{prefix}output", "missing")
      records.append({"messages": [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": output}]})
    return records
  raise field_error(where, None, f"no demonstration fields; expected one of {_DEMO_FORMS}")


def parse_prompts(obj: Mapping, where: str) -> list[Record]:
  """One JSON object -> prompt records; any response/output field present is ignored.

  Accepted: ``{"messages"}`` ending with a user turn; ``{"prompt", "system"?}``; Self-Instruct and
  Alpaca records (one prompt per instance).
  """
  if "messages" in obj or "prompt" in obj:
    return [{"messages": _prompt_messages(obj, where)}]
  if "instruction" in obj:
    return [{"messages": [{"role": "user", "content": p}]}
            for p, _, _ in _instruction_pairs(obj, where)]
  raise field_error(where, None, "no prompt fields; expected 'messages', 'prompt' or 'instruction'")


# ---------------------------------------------------------------------------------- rankings


def dense_ranks(ranks: Sequence[int]) -> list[int]:
  """Maps ranks to 0..m-1 keeping order and ties: ``[3, 0, 3, 7] -> [1, 0, 1, 2]``."""
  order = {r: i for i, r in enumerate(sorted(set(ranks)))}
  return [order[r] for r in ranks]


def parse_ranks(value: Any, num_responses: int, where: str, key: str = "ranks") -> list[int]:
  """Validates a ranking: a list of ``num_responses`` non-negative ints (bools rejected)."""
  if not isinstance(value, list):
    raise field_error(where, key, f"expected a list of integers, got {type(value).__name__}")
  if len(value) != num_responses:
    raise field_error(where, key, f"has {len(value)} ranks for {num_responses} responses")
  for i, r in enumerate(value):
    if isinstance(r, bool) or not isinstance(r, int):
      raise field_error(where, f"{key}[{i}]", f"expected a non-negative integer, got {r!r}")
    if r < 0:
      raise field_error(where, f"{key}[{i}]", f"is negative ({r})")
  return list(value)


def ranked_group(messages: list[dict], responses: list[str], ranks: list[int]) -> Record:
  """Builds a comparison record, raising ``Skip`` when it carries no preference signal."""
  if len({r.strip() for r in responses}) < len(responses):
    raise Skip("duplicate_responses")
  if len(set(ranks)) == 1:
    raise Skip("all_tied")
  return {"messages": messages, "responses": list(responses), "ranks": dense_ranks(ranks)}


def parse_comparison(obj: Mapping, where: str) -> Record:
  """One JSON object -> a comparison record (or ``Skip``).

  Prompt: ``"messages"`` (ending with a user turn) or ``"prompt"`` (+ ``"system"``).
  Responses: ``"responses"`` + ``"ranks"`` (K >= 2), or ``"chosen"`` + ``"rejected"`` (ranks 0, 1).
  """
  messages = _prompt_messages(obj, where)
  listed = "responses" in obj or "ranks" in obj
  paired = "chosen" in obj or "rejected" in obj
  if listed and paired:
    raise field_error(where, "responses", "give 'responses'+'ranks' or 'chosen'+'rejected', not both")
  if paired:
    responses = [text_field(obj, "chosen", where), text_field(obj, "rejected", where)]
    ranks = [0, 1]
  elif listed:
    value = get_field(obj, "responses", where)
    if not isinstance(value, list) or len(value) < 2:
      raise field_error(where, "responses", "expected a list of at least 2 strings")
    responses = []
    for i, r in enumerate(value):
      if not isinstance(r, str):
        raise field_error(where, f"responses[{i}]", f"expected a string, got {type(r).__name__}")
      if not r.strip():
        raise field_error(where, f"responses[{i}]", "is empty")
      responses.append(r)
    ranks = parse_ranks(get_field(obj, "ranks", where), len(responses), where)
  else:
    raise field_error(where, "responses", "missing (expected 'responses'+'ranks' or "
                 "'chosen'+'rejected')")
  return ranked_group(messages, responses, ranks)


# ----------------------------------------------------------------------------------- HH-RLHF

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_LAST = "\n\nAssistant:"


def parse_hh_transcript(text: str) -> list[dict]:
  """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> messages (content stripped). Raises ``Skip``."""
  parts = _HH_MARKER.split(text)
  if parts[0].strip() or len(parts) < 3:
    raise Skip("malformed_transcript")
  messages = [{"role": _HH_ROLE[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
  if any(not m["content"] for m in messages):
    raise Skip("empty_turn")
  return messages


def parse_hh_pair(obj: Mapping, where: str) -> Record:
  """HH-RLHF ``{"chosen", "rejected"}`` -> comparison with ranks ``[0, 1]`` (or ``Skip``).

  The prompt is the text before the last ``"\\n\\nAssistant:"``, which both must share. Checks
  run in this order: malformed_transcript (no marker), prompt_mismatch, empty_response,
  duplicate_responses, then the prompt's own structure (malformed_transcript, empty_turn,
  prompt_not_ending_in_user).
  """
  chosen, rejected = text_field(obj, "chosen", where), text_field(obj, "rejected", where)
  cut_c, cut_r = chosen.rfind(_HH_LAST), rejected.rfind(_HH_LAST)
  if cut_c < 0 or cut_r < 0:
    raise Skip("malformed_transcript")
  if chosen[:cut_c] != rejected[:cut_r]:
    raise Skip("prompt_mismatch")
  responses = [chosen[cut_c + len(_HH_LAST):].strip(), rejected[cut_r + len(_HH_LAST):].strip()]
  if not all(responses):
    raise Skip("empty_response")
  if responses[0] == responses[1]:
    raise Skip("duplicate_responses")
  messages = parse_hh_transcript(chosen[:cut_c])
  if messages[-1]["role"] != "user":
    raise Skip("prompt_not_ending_in_user")
  return {"messages": messages, "responses": responses, "ranks": [0, 1]}


# -------------------------------------------------------------------------------------- OASST

_OASST_ROLE = {"prompter": "user", "assistant": "assistant"}


def parse_oasst_message(obj: Mapping, where: str) -> dict:
  """Validates one oasst1 flat message row; keeps the fields the tree rebuild needs."""
  def optional(key, kind, what):
    # bool is a subclass of int in python, so compare exact types.
    value = obj.get(key)
    if value is not None and type(value) is not kind:
      raise field_error(where, key, f"expected {what} or null, got {value!r}")
    return value

  role = get_field(obj, "role", where)
  if role not in _OASST_ROLE:
    raise field_error(where, "role", f"unknown role {role!r}; expected 'prompter' or 'assistant'")
  rank = optional("rank", int, "a non-negative integer")
  if rank is not None and rank < 0:
    raise field_error(where, "rank", f"is negative ({rank})")
  return {
      "message_id": text_field(obj, "message_id", where),
      "parent_id": optional("parent_id", str, "a string"),
      "role": role,
      "text": text_field(obj, "text", where, allow_blank=True),
      "rank": rank,
      "deleted": bool(optional("deleted", bool, "a boolean")),
      "where": where,
  }


def read_oasst(path: str | os.PathLike) -> list[dict]:
  """All messages of an oasst1 JSONL file, validated; a repeated ``message_id`` is an error."""
  messages, seen = [], {}
  for where, obj in read_jsonl(path):
    m = parse_oasst_message(obj, where)
    if m["message_id"] in seen:
      raise field_error(where, "message_id", f"duplicate of {seen[m['message_id']]}")
    seen[m["message_id"]] = where
    messages.append(m)
  return messages


def oasst_ranked_groups(messages: Sequence[dict], *, drop_deleted: bool = False
                        ) -> list[tuple[dict, list[dict]]]:
  """``(prompter_message, ranked assistant replies sorted by rank)`` for every prompter message.

  A reply is ranked when its ``rank`` is not null. Ties in rank keep file order.
  """
  children = collections.defaultdict(list)
  for m in messages:
    if m["parent_id"] is not None and not (drop_deleted and m["deleted"]):
      children[m["parent_id"]].append(m)
  groups = []
  for m in messages:
    if m["role"] == "prompter" and not (drop_deleted and m["deleted"]):
      replies = [c for c in children[m["message_id"]]
                 if c["role"] == "assistant" and c["rank"] is not None]
      groups.append((m, sorted(replies, key=lambda c: c["rank"])))
  return groups


def oasst_history(message: dict, by_id: Mapping[str, dict], *, drop_deleted: bool = False
                  ) -> list[dict]:
  """Dialogue from the tree root down to and including ``message``. Raises ``Skip``."""
  path, m = [], message
  while True:
    if drop_deleted and m["deleted"]:
      raise Skip("deleted_in_history")
    path.append(m)
    if m["parent_id"] is None:
      break
    if m["parent_id"] not in by_id:
      raise Skip("missing_ancestor")
    m = by_id[m["parent_id"]]
  dialogue = [{"role": _OASST_ROLE[x["role"]], "content": x["text"]} for x in reversed(path)]
  if any(not d["content"].strip() for d in dialogue):
    raise Skip("empty_turn")
  return dialogue


def oasst_records(messages: Sequence[dict], mode: str, tally: Tally, *, min_replies: int = 2,
                  drop_deleted: bool = False) -> Iterator[tuple[str, Record]]:
  """OASST messages -> ``(prompter message_id, record)`` for ``mode`` ``"rankings"`` or ``"sft"``.

  rankings: each prompter turn with >= ``min_replies`` ranked replies -> comparison.
  sft: each prompter turn with >= 1 ranked reply -> demonstration with its best reply
  (lowest rank; the first in file order on a tie). ``tally.extra`` receives ``messages`` and
  ``ranked_replies_per_prompt`` (histogram over all prompter turns, keys as strings).
  """
  if mode not in ("rankings", "sft"):
    raise ValueError(f"unknown OASST mode {mode!r}; expected 'rankings' or 'sft'")
  if min_replies < 2:
    raise ValueError(f"min_replies must be >= 2, got {min_replies}")
  by_id = {m["message_id"]: m for m in messages}
  groups = oasst_ranked_groups(messages, drop_deleted=drop_deleted)
  hist = collections.Counter(len(replies) for _, replies in groups)
  tally.extra["messages"] = len(messages)
  tally.extra["ranked_replies_per_prompt"] = {str(k): hist[k] for k in sorted(hist)}
  need = min_replies if mode == "rankings" else 1
  for prompter, replies in groups:
    if len(replies) < need:
      continue
    tally.seen += 1
    try:
      history = oasst_history(prompter, by_id, drop_deleted=drop_deleted)
      texts = [r["text"] for r in replies]
      if any(not t.strip() for t in texts):
        raise Skip("empty_response")
      if mode == "rankings":
        record = ranked_group(history, texts, [r["rank"] for r in replies])
      else:
        record = {"messages": history + [{"role": "assistant", "content": texts[0]}]}
    except Skip as s:
      tally.skip(s.reason, prompter["where"])
      continue
    yield prompter["message_id"], record


# ------------------------------------------------------------------------------- text corpus

TEXT_UNITS = ("file", "paragraph", "line")


def text_units(text: str, unit: str) -> list[tuple[int, str]]:
  """Splits a document into ``(first_line_number, text)`` units.

  ``file``: the whole text (if not blank). ``paragraph``: maximal runs of non-blank lines,
  joined by ``"\\n"``. ``line``: each non-blank line. Line terminators (``\\n``, ``\\r\\n``) are
  dropped; other whitespace is kept.
  """
  if unit not in TEXT_UNITS:
    raise ValueError(f"unknown text unit {unit!r}; expected one of {TEXT_UNITS}")
  if unit == "file":
    return [(1, text)] if text.strip() else []
  lines = [ln.removesuffix("\r") for ln in text.split("\n")]
  if unit == "line":
    return [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
  units, start, block = [], 0, []
  for i, ln in enumerate(lines, 1):
    if ln.strip():
      if not block:
        start = i
      block.append(ln)
    elif block:
      units.append((start, "\n".join(block)))
      block = []
  if block:
    units.append((start, "\n".join(block)))
  return units


def parse_text_record(obj: Mapping, where: str, key: str = "text") -> Record:
  """A JSONL pretraining row -> ``{"text"}``; a blank text is ``Skip("empty_text")``."""
  text = text_field(obj, key, where, allow_blank=True)
  if not text.strip():
    raise Skip("empty_text")
  return {"text": text}


# ---------------------------------------------------------------------------- hash splitting


def record_key(record: Mapping) -> str:
  """The text that decides a record's split: its prompt dialogue, or its text.

  Demonstrations use ``messages[:-1]`` (the prompt), comparisons and prompts ``messages``, so
  the same prompt gets the same key in SFT, RM and PPO data.
  """
  if "text" in record:
    return record["text"]
  messages = record["messages"]
  if "responses" not in record and messages[-1]["role"] == "assistant":
    messages = messages[:-1]
  return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def hash_unit(key: str, salt: str = "") -> float:
  """A deterministic uniform number in [0, 1) from ``key`` (blake2b, 64 bits)."""
  digest = hashlib.blake2b(f"{salt}\x00{key}".encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def assign_split(key: str, validation_fraction: float, salt: str = "") -> str:
  """``"validation"`` for about ``validation_fraction`` of keys, else ``"train"``."""
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  return "validation" if hash_unit(key, salt) < validation_fraction else "train"


def count_lines(paths: Iterable[str | os.PathLike]) -> int:
  """Number of non-blank lines over files (for reconciling ``seen`` with the source)."""
  return sum(1 for p in paths for _ in read_lines(p))
