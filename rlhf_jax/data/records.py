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

Line shapes (:func:`detect_shape`, names in ``SHAPES``). Every TRL dataset type in its standard
(strings) and conversational (message lists) form, plus ours: language modelling (``text`` /
``messages``), prompt-only (``prompt``), prompt-completion (``prompt`` + ``completion``),
preference (``prompt`` + ``chosen`` + ``rejected``, or the implicit-prompt form: ``chosen`` and
``rejected`` whole dialogues, HH transcripts when strings, whose shared part is the prompt),
K-way (``prompt`` or ``messages`` + ``responses`` + ``ranks``, rank 0 best, equal ranks a tie),
``prompt``/``messages`` + ``response``, Self-Instruct and Alpaca. A standard prompt is one user
message (after the optional ``"system"`` string); a conversational prompt is a message list
(``system`` allowed first). A conversational reply (``chosen``, ``rejected``, ``completion``) is
a message list ending with the assistant reply; messages before it continue the prompt (a copy
of the prompt at its start is dropped) and must be the same in ``chosen`` and ``rejected``.
Unpaired preference (``prompt`` + ``completion`` + ``label``) and stepwise supervision are
recognised and refused: no stage uses them. :func:`parse_line` turns a line into records of
a kind: preference / K-way -> comparisons, demonstrations (best response) or prompts;
prompt-completion, prompt-response, ``messages``, Self-Instruct, Alpaca -> demonstrations or
prompts; prompt-only -> prompts; ``text`` -> text.

Bad input policy. A *malformed* record (broken JSON, a missing key, a wrong type, an empty
demonstration reply, an invalid ranking, an unknown role, an unknown or refused shape, a shape
that cannot give the kind asked for) raises ``ValueError("<file>:<line>: key '<key>': ...")``
because it means the file is not what the user thinks it is. A *well-formed* record that carries
no usable signal is skipped, and the skip is counted by reason in a :class:`Tally` that the
builders and :mod:`rlhf_jax.data.sources` report. Skip reasons:

==========================  =====================================================================
``duplicate_responses``     two responses of a comparison are identical (after ``strip``); for
                            HH-RLHF this is chosen == rejected.
``all_tied``                every response of a comparison has the same rank (no preference).
``prompt_mismatch``         implicit-prompt pairs (HH-RLHF transcripts or message lists): chosen
                            and rejected differ before their last assistant turn, so there is
                            no shared prompt.
``empty_response``          a response of a comparison is blank, in any source (user JSONL
                            included: the line is skipped, not an error); for a demonstration
                            taken from a comparison, its best response is blank.
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
import functools
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


def parse_messages(value: Any, where: str, key: str = "messages", *, require_user: bool = True,
                   blank_last: bool = False) -> list[dict]:
  """Validates a dialogue: a non-empty list of ``{"role", "content"}`` (see module rules).

  ``require_user=False`` accepts a list without a user turn (a reply continuing a prompt);
  ``blank_last=True`` lets the last message's content be blank (the caller skips such a reply).
  """
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
    if not content.strip() and not (blank_last and i == len(value) - 1):
      raise field_error(where, f"{k}.content", "is empty")
    out.append({"role": role, "content": content})
  if require_user and not any(m["role"] == "user" for m in out):
    raise field_error(where, key, "has no user message")
  return out


def _check_not_both(obj: Mapping, where: str) -> None:
  if "messages" in obj and "prompt" in obj:
    raise field_error(where, "messages", "give either 'messages' or 'prompt', not both")


def _prompt_dialogue(obj: Mapping, where: str) -> list[dict]:
  """The prompt from ``"messages"``, a conversational ``"prompt"`` list, or a standard
  ``"prompt"`` string (one user message, after the optional ``"system"``). Its last turn is
  not checked here."""
  _check_not_both(obj, where)
  if "messages" in obj:
    return parse_messages(obj["messages"], where)
  if "prompt" not in obj:
    raise field_error(where, "messages", "missing (expected 'messages' or 'prompt')")
  value = obj["prompt"]
  if isinstance(value, list):
    if obj.get("system") not in (None, ""):
      raise field_error(where, "system", "with a message-list 'prompt', put the system message "
                        "first in the list instead")
    return parse_messages(value, where, "prompt")
  if not isinstance(value, str):
    raise field_error(where, "prompt", "expected a string or a list of {role, content} messages, "
                      f"got {type(value).__name__}")
  user = {"role": "user", "content": text_field(obj, "prompt", where)}
  return _optional_system(obj, where) + [user]


def _ends_with_user(messages: list[dict], where: str, key: str = "messages") -> list[dict]:
  if messages[-1]["role"] != "user":
    raise field_error(where, key, f"must end with a user turn, got {messages[-1]['role']!r}")
  return messages


def _reply(value: Any, where: str, key: str) -> tuple[list[dict], str]:
  """A reply given as a string, or as messages ending with the assistant reply.

  Returns ``(messages before the reply, reply text)``; the text may be blank (the caller decides).
  """
  if isinstance(value, str):
    return [], value
  if not isinstance(value, list):
    raise field_error(where, key, "expected a string or a list of {role, content} messages, "
                      f"got {type(value).__name__}")
  messages = parse_messages(value, where, key, require_user=False, blank_last=True)
  last = len(messages) - 1
  if messages[-1]["role"] != "assistant":
    raise field_error(where, f"{key}[{last}].role", "the reply must end with an assistant "
                      f"message, got {messages[-1]['role']!r}")
  return messages[:-1], messages[-1]["content"]


def _continue_prompt(prompt: list[dict], replies: Sequence[tuple[list[dict], str]],
                     keys: Sequence[str], where: str) -> list[dict]:
  """The whole prompt: ``prompt`` plus the messages every reply has before its final message.

  A reply may repeat the prompt before continuing it (``[user, ..., assistant]`` next to a
  string prompt): that copy is dropped. All replies must continue the prompt identically, and
  the whole prompt must end with a user turn.
  """
  extensions = []
  for (before, _), key in zip(replies, keys):
    if before[:len(prompt)] == prompt:
      before = before[len(prompt):]
    if any(m["role"] == "system" for m in before):
      raise field_error(where, key, "a system message is allowed only first in the prompt")
    extensions.append(before)
  for before, key in zip(extensions[1:], keys[1:]):
    if before != extensions[0]:
      raise field_error(where, key, f"its messages before the final reply differ from those of "
                        f"'{keys[0]}'; every reply must continue the prompt with the same messages")
  messages = prompt + extensions[0]
  if messages[-1]["role"] != "user":
    key = keys[0] if extensions[0] else "prompt"
    raise field_error(where, key, "the prompt (with any messages before the reply) must end "
                      f"with a user turn, got {messages[-1]['role']!r}")
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


def best_response(responses: Sequence[str], ranks: Sequence[int]) -> str:
  """The best-ranked response (the first in order on a tie at the top)."""
  return responses[list(ranks).index(min(ranks))]


def from_ranked(messages: list[dict], responses: list[str], ranks: list[int], kind: str
                ) -> Record:
  """A ranked group (prompt ending with a user turn) as a record of ``kind``; raises ``Skip``.

  comparisons: a blank response is ``empty_response``, then the rules of :func:`ranked_group`;
  demonstrations: the prompt with the best response (``empty_response`` if it is blank);
  prompts: the prompt.
  """
  if kind == "prompts":
    return {"messages": messages}
  if kind == "demonstrations":
    best = best_response(responses, ranks)
    if not best.strip():
      raise Skip("empty_response")
    return {"messages": messages + [{"role": "assistant", "content": best}]}
  if any(not r.strip() for r in responses):
    raise Skip("empty_response")
  return ranked_group(messages, responses, ranks)


# -------------------------------------------------------------------------------- line shapes

KINDS = ("demonstrations", "comparisons", "prompts", "text")
_KIND_ALIASES = {"demonstration": "demonstrations", "comparison": "comparisons",
                 "prompt": "prompts"}
_CDP = ("comparisons", "demonstrations", "prompts")
_DP = ("demonstrations", "prompts")
_MSGS = "[{role, content}, ...]"

# shape name -> (what a line looks like, the record kinds it gives). Names follow TRL's dataset
# "<format>_<type>": standard = strings, conversational = message lists.
SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "standard_language_modeling": ('{"text": str}', ("text",)),
    "conversational_language_modeling": (f'{{"messages": {_MSGS}}}', _DP),
    "standard_prompt_only": ('{"prompt": str, "system"?: str}', ("prompts",)),
    "conversational_prompt_only": (f'{{"prompt": {_MSGS}}}', ("prompts",)),
    "standard_prompt_completion": ('{"prompt": str, "completion": str}', _DP),
    "conversational_prompt_completion": (f'{{"prompt": {_MSGS}, "completion": {_MSGS}}}', _DP),
    "standard_prompt_response": ('{"prompt": str, "response": str, "system"?: str}', _DP),
    "conversational_prompt_response": (
        f'{{"messages" or "prompt": {_MSGS}, "response": str}}', _DP),
    "standard_preference": ('{"prompt": str, "chosen": str, "rejected": str}', _CDP),
    "conversational_preference": (
        f'{{"prompt" or "messages": {_MSGS}, "chosen": {_MSGS} or str, "rejected": same}}', _CDP),
    "standard_implicit_prompt_preference": (
        '{"chosen": str, "rejected": str} as HH transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."',
        _CDP),
    "conversational_implicit_prompt_preference": (
        f'{{"chosen": {_MSGS}, "rejected": {_MSGS}}} (whole dialogues)', _CDP),
    "standard_kway": ('{"prompt": str, "responses": [str, ...], "ranks": [int, ...]}', _CDP),
    "conversational_kway": (
        f'{{"prompt" or "messages": {_MSGS}, "responses": [str, ...], "ranks": [int, ...]}}', _CDP),
    "self_instruct": ('{"instruction": str, "instances": [{"input", "output"}, ...]}', _DP),
    "alpaca": ('{"instruction": str, "input"?: str, "output"?: str}', _DP),
}
# Shapes we recognise but no stage uses: a clear refusal instead of a wrong guess.
REFUSED_SHAPES: dict[str, str] = {
    "standard_unpaired_preference": '{"prompt": str, "completion": str, "label": bool}',
    "conversational_unpaired_preference":
        f'{{"prompt": {_MSGS}, "completion": {_MSGS}, "label": bool}}',
    "standard_stepwise_supervision": '{"prompt": str, "completions": [str], "labels": [bool]}',
}


def normalise_kind(kind: str) -> str:
  """``"demonstrations" | "comparisons" | "prompts" | "text"`` (singular names accepted)."""
  name = _KIND_ALIASES.get(kind, kind)
  if name not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  return name


def accepted_shapes() -> str:
  """One line per accepted shape, for error messages."""
  return "; ".join(f"{name} {example}" for name, (example, _) in SHAPES.items())


def detect_shape(obj: Mapping, where: str) -> str:
  """The shape name of one JSON object (a key of ``SHAPES`` or ``REFUSED_SHAPES``).

  Decided by which keys are present; the value types only choose standard / conversational.
  An object of no known shape is an error naming ``where`` and listing the accepted shapes.
  """
  keys = set(obj)
  conversational = "messages" in keys or isinstance(obj.get("prompt"), list)
  fmt = "conversational" if conversational else "standard"
  if keys & {"responses", "ranks"}:
    if keys & {"chosen", "rejected"}:
      raise field_error(where, "responses", "give 'responses'+'ranks' or 'chosen'+'rejected', "
                        "not both")
    return f"{fmt}_kway"
  if keys & {"chosen", "rejected"}:
    if keys & {"prompt", "messages"}:
      return f"{fmt}_preference"
    dialogue_fmt = "conversational" if isinstance(obj.get("chosen"), list) else "standard"
    return f"{dialogue_fmt}_implicit_prompt_preference"
  if {"completions", "labels"} <= keys:
    return "standard_stepwise_supervision"
  if {"completion", "label"} <= keys:
    return f"{fmt}_unpaired_preference"
  if "completion" in keys:
    return f"{fmt}_prompt_completion"
  if "response" in keys:
    return f"{fmt}_prompt_response"
  if "instruction" in keys:
    return "self_instruct" if "instances" in keys else "alpaca"
  if "prompt" in keys:
    return f"{fmt}_prompt_only"
  if "messages" in keys:
    return "conversational_language_modeling"
  if "text" in keys:
    return "standard_language_modeling"
  raise field_error(where, None, f"unknown line shape (keys {sorted(keys)}); accepted shapes: "
                    f"{accepted_shapes()}")


def _refused(where: str, shape: str) -> ValueError:
  what = ("unpaired preference (one completion with a good/bad label, as for KTO)"
          if "unpaired" in shape else "stepwise supervision (labels per reasoning step)")
  return field_error(where, None, f"shape '{shape}' {REFUSED_SHAPES[shape]} is {what}, which no "
                     "stage here uses: the reward model learns from responses ranked against "
                     "each other for the same prompt. Convert it to preference pairs "
                     "('prompt'+'chosen'+'rejected') or K-way rankings ('responses'+'ranks')")


def _wrong_kind(where: str, shape: str, kind: str) -> ValueError:
  """The error for asking a line for a record kind its shape cannot give."""
  gives = " or ".join(SHAPES[shape][1])
  found = f"this is a '{shape}' line {SHAPES[shape][0]}, which gives {gives}"
  if kind == "comparisons":
    return field_error(where, "responses", f"missing: {found}; comparisons need 'chosen'+"
                       "'rejected' (with or without 'prompt') or 'responses'+'ranks'")
  if kind == "demonstrations":
    return field_error(where, None, f"no demonstration fields: {found}; a demonstration needs "
                       "a reply ('completion', 'response', 'output', 'chosen'/'rejected', "
                       "'responses'+'ranks', or 'messages' ending with the assistant)")
  if kind == "prompts":
    return field_error(where, None, f"no prompt fields: {found}; a prompt needs 'prompt', "
                       "'messages' or 'instruction'")
  return field_error(where, None, f"no text fields: {found}; the text kind reads only "
                     "{\"text\"} lines (or plain .txt files): dialogues become text through "
                     "the chat format of the stage that owns the tokenizer")


def _lm_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  if fmt == "standard":
    return [parse_text_record(obj, where)]
  messages = parse_messages(obj["messages"], where)
  if kind == "prompts":
    if messages[-1]["role"] == "assistant" and len(messages) > 1:
      messages = messages[:-1]
    return [{"messages": _ends_with_user(messages, where)}]
  if messages[-1]["role"] != "assistant":
    raise field_error(where, "messages", "must end with the assistant response, "
                      f"got {messages[-1]['role']!r}")
  if len(messages) < 2 or messages[-2]["role"] != "user":
    raise field_error(where, "messages", "the assistant response must follow a user turn")
  return [{"messages": messages}]


def _prompt_only_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  key = "messages" if "messages" in obj else "prompt"
  return [{"messages": _ends_with_user(_prompt_dialogue(obj, where), where, key)}]


def _completion_line(obj: Mapping, where: str, kind: str, fmt: str, *, key: str
                     ) -> list[Record]:
  """``prompt``+``completion`` (TRL) or ``prompt``/``messages``+``response`` (ours)."""
  prompt = _prompt_dialogue(obj, where)
  if key == "response":
    if kind == "prompts":  # the response is not needed, and not checked
      return [{"messages": _ends_with_user(prompt, where)}]
    reply = ([], text_field(obj, "response", where))
  else:
    reply = _reply(get_field(obj, key, where), where, key)
  messages = _continue_prompt(prompt, [reply], [key], where)
  if kind == "prompts":
    return [{"messages": messages}]
  if not reply[1].strip():
    raise field_error(where, key, "is empty")
  return [{"messages": messages + [{"role": "assistant", "content": reply[1]}]}]


def _preference_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  keys = ("chosen", "rejected")
  prompt = _prompt_dialogue(obj, where)
  replies = [_reply(get_field(obj, k, where), where, k) for k in keys]
  messages = _continue_prompt(prompt, replies, keys, where)
  return [from_ranked(messages, [text for _, text in replies], [0, 1], kind)]


def _implicit_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  """``chosen``/``rejected`` whole dialogues whose shared part is the prompt."""
  if fmt == "standard":
    chosen = text_field(obj, "chosen", where, allow_blank=True)
    rejected = text_field(obj, "rejected", where, allow_blank=True)
    if not (_HH_MARKER.search(chosen) or _HH_MARKER.search(rejected)):
      raise field_error(where, "chosen", "an implicit-prompt pair (no 'prompt' key) must be HH "
                        "transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') whose shared part "
                        "is the prompt; for plain-text pairs give the prompt as 'prompt'")
    if kind == "comparisons":
      return [parse_hh_pair(obj, where)]
    messages, responses = hh_prompt_and_replies(chosen, rejected)
    return [from_ranked(messages, responses, [0, 1], kind)]
  dialogues = []
  for key in ("chosen", "rejected"):
    value = get_field(obj, key, where)
    if not isinstance(value, list):
      raise field_error(where, key, f"expected a list of {{role, content}} messages like "
                        f"'chosen', got {type(value).__name__}")
    dialogue = parse_messages(value, where, key, blank_last=True)
    if dialogue[-1]["role"] != "assistant":
      raise field_error(where, f"{key}[{len(dialogue) - 1}].role", "the dialogue must end with "
                        f"the assistant reply, got {dialogue[-1]['role']!r}")
    dialogues.append(dialogue)
  if dialogues[0][:-1] != dialogues[1][:-1]:
    raise Skip("prompt_mismatch")
  prompt = _ends_with_user(dialogues[0][:-1], where, "chosen")
  return [from_ranked(prompt, [d[-1]["content"] for d in dialogues], [0, 1], kind)]


def _kway_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  prompt = _prompt_dialogue(obj, where)
  messages = _ends_with_user(prompt, where, "messages" if "messages" in obj else "prompt")
  value = get_field(obj, "responses", where)
  if not isinstance(value, list) or len(value) < 2:
    raise field_error(where, "responses", "expected a list of at least 2 strings")
  for i, r in enumerate(value):
    if not isinstance(r, str):
      raise field_error(where, f"responses[{i}]", f"expected a string, got {type(r).__name__}")
  ranks = parse_ranks(get_field(obj, "ranks", where), len(value), where)
  return [from_ranked(messages, list(value), ranks, kind)]


def _instruction_line(obj: Mapping, where: str, kind: str, fmt: str) -> list[Record]:
  out = []
  for prompt, output, prefix in _instruction_pairs(obj, where):
    messages = [{"role": "user", "content": prompt}]
    if kind == "demonstrations":
      if output is None:
        raise field_error(where, f"{prefix}output", "missing")
      messages.append({"role": "assistant", "content": output})
    out.append({"messages": messages})
  return out


_LINE_PARSERS: dict[str, Callable[..., list[Record]]] = {
    "language_modeling": _lm_line,
    "prompt_only": _prompt_only_line,
    "prompt_completion": functools.partial(_completion_line, key="completion"),
    "prompt_response": functools.partial(_completion_line, key="response"),
    "preference": _preference_line,
    "implicit_prompt_preference": _implicit_line,
    "kway": _kway_line,
    "self_instruct": _instruction_line,
    "alpaca": _instruction_line,
}


def _split_shape(shape: str) -> tuple[str, str]:
  """``"conversational_preference" -> ("conversational", "preference")``; un-prefixed shapes
  (Self-Instruct, Alpaca) are standard."""
  fmt, _, line_type = shape.partition("_")
  return (fmt, line_type) if fmt in ("standard", "conversational") else ("standard", shape)


def parse_line(obj: Mapping, where: str, kind: str, shape: str | None = None) -> list[Record]:
  """One JSON object of any accepted shape -> records of ``kind`` (raises ``Skip``/``ValueError``).

  ``shape`` (from :func:`detect_shape`) is detected when not given. Conversions: preference
  and K-way lines give comparisons, demonstrations (the best response) or prompts;
  prompt-completion, prompt-response, ``messages``, Self-Instruct and Alpaca lines give
  demonstrations or prompts; prompt-only lines give prompts; ``text`` lines give text. Asking
  a line for a kind its shape cannot give, or a refused shape, is an error naming ``where``.
  """
  kind = normalise_kind(kind)
  shape = shape or detect_shape(obj, where)
  if shape in REFUSED_SHAPES:
    raise _refused(where, shape)
  if kind not in SHAPES[shape][1]:
    raise _wrong_kind(where, shape, kind)
  fmt, line_type = _split_shape(shape)
  return _LINE_PARSERS[line_type](obj, where, kind, fmt)


def parse_demonstrations(obj: Mapping, where: str) -> list[Record]:
  """One JSON object -> demonstration records (several for multi-instance Self-Instruct)."""
  return parse_line(obj, where, "demonstrations")


def parse_prompts(obj: Mapping, where: str) -> list[Record]:
  """One JSON object -> prompt records; a reply present in the line is not used."""
  return parse_line(obj, where, "prompts")


def parse_comparison(obj: Mapping, where: str) -> Record:
  """One JSON object -> a comparison record (or ``Skip``)."""
  return parse_line(obj, where, "comparisons")[0]


def convert_record(record: Mapping, from_kind: str, to_kind: str) -> Record:
  """A normalised record of ``from_kind`` as one of ``to_kind``; other keys (``id``, ``task``)
  are kept. comparison -> demonstration (best response) or prompt; demonstration -> prompt.
  Raises ``Skip("empty_response")`` for a blank best response, ``ValueError`` otherwise."""
  source, target = normalise_kind(from_kind), normalise_kind(to_kind)
  if source == target:
    return dict(record)
  extra = {k: v for k, v in record.items() if k not in ("messages", "responses", "ranks", "text")}
  if source == "comparisons" and target != "text":
    out = from_ranked(list(record["messages"]), list(record["responses"]), list(record["ranks"]),
                      target)
  elif source == "demonstrations" and target == "prompts":
    out = {"messages": list(record["messages"][:-1])}
  else:
    raise ValueError(f"{source} records cannot be turned into {target} (comparisons give "
                     "demonstrations or prompts, demonstrations give prompts)")
  return {**extra, **out}


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


def _hh_cut(chosen: str, rejected: str) -> tuple[str, list[str]]:
  """``(shared prompt text, [chosen reply, rejected reply])`` split at the last
  ``"\\n\\nAssistant:"``; replies stripped. Raises ``Skip`` (malformed_transcript,
  prompt_mismatch)."""
  cut_c, cut_r = chosen.rfind(_HH_LAST), rejected.rfind(_HH_LAST)
  if cut_c < 0 or cut_r < 0:
    raise Skip("malformed_transcript")
  if chosen[:cut_c] != rejected[:cut_r]:
    raise Skip("prompt_mismatch")
  return chosen[:cut_c], [chosen[cut_c + len(_HH_LAST):].strip(),
                          rejected[cut_r + len(_HH_LAST):].strip()]


def _hh_prompt(text: str) -> list[dict]:
  """The prompt dialogue of an HH pair; raises ``Skip`` (see :func:`parse_hh_transcript`)."""
  messages = parse_hh_transcript(text)
  if messages[-1]["role"] != "user":
    raise Skip("prompt_not_ending_in_user")
  return messages


def hh_prompt_and_replies(chosen: str, rejected: str) -> tuple[list[dict], list[str]]:
  """The prompt dialogue and the two replies (possibly blank) of an HH transcript pair.

  Only the transcript structure is checked (skips malformed_transcript, prompt_mismatch,
  empty_turn, prompt_not_ending_in_user); the replies are left to the caller.
  """
  text, replies = _hh_cut(chosen, rejected)
  return _hh_prompt(text), replies


def parse_hh_pair(obj: Mapping, where: str) -> Record:
  """HH-RLHF ``{"chosen", "rejected"}`` -> comparison with ranks ``[0, 1]`` (or ``Skip``).

  The prompt is the text before the last ``"\\n\\nAssistant:"``, which both must share. Checks
  run in this order: malformed_transcript (no marker), prompt_mismatch, empty_response,
  duplicate_responses, then the prompt's own structure (malformed_transcript, empty_turn,
  prompt_not_ending_in_user).
  """
  chosen, rejected = text_field(obj, "chosen", where), text_field(obj, "rejected", where)
  text, responses = _hh_cut(chosen, rejected)
  if not all(responses):
    raise Skip("empty_response")
  if responses[0] == responses[1]:
    raise Skip("duplicate_responses")
  return {"messages": _hh_prompt(text), "responses": responses, "ranks": [0, 1]}


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
