"""Chat formats: messages <-> text <-> token ids with an assistant-only loss mask.

Messages are `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; a system message may
only come first. Every `Tokenizer` carries a chat format as `tok.chat`, one of two kinds:

  * the built-in role format (`RoleFormat`, this module), for tokenizers without a chat template:

        <|system|>content<|user|>content<|assistant|>content<|endoftext|><|user|>...

    Every assistant turn is closed by EOS (`<|endoftext|>`). Token ids are produced segment by
    segment (role token, then the content alone, then EOS), so the tokenization of one turn never
    depends on its neighbours and the loss mask lines up exactly. Because special-token strings are
    atomic in the tokenizer, `tokenizer.encode(render_chat(m)) == encode_chat(tokenizer, m)[0]`.
    `ROLE_TEMPLATE` is the same format as a Jinja chat template (written by `tokenizer.save`, so
    Hugging Face users render identical text);
  * a model's own Jinja chat template (`chat_templates.TemplateFormat`).

Both offer the same methods, which the data pipeline, chat and evaluation code call:

  validate(messages)                   ValueError naming the bad message
  render(messages, add_generation_prompt=False) -> str
  encode_chat(messages) -> (ids, loss_mask)      a whole conversation
  prompt_ids(messages) -> ids          ending with the generation prompt (`<|assistant|>` here)
  response_ids(text) -> ids            encode(text) + [eos_id]
  prompt(messages) -> a prompt object  full_len(), min_len(), fit(budget, events) -> (ids, loss):
                                       truncation to a token budget (see `SegmentPrompt`)

The module functions `encode_chat` / `encode_prompt` dispatch to `tokenizer.chat`, so they work for
either kind; `render_chat` / `parse_chat` are the role format alone.
"""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # the tokenizer module imports this one
  from rlhf_jax.data.tokenizer import Tokenizer

PAD = "<|pad|>"
EOS = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order fixes the ids of a freshly trained BPE: pad=0, eos=1, system=2, user=3, assistant=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, SYSTEM, USER, ASSISTANT)
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The role format as a Hugging Face chat template. The {% generation %} block marks what the
# assistant is trained on (its content and the closing EOS), so transformers'
# `return_assistant_tokens_mask=True` (TRL's assistant_only_loss) gives our loss mask.
ROLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|endoftext|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")

Message = dict  # {"role": str, "content": str}
_TOKEN_TO_ROLE = {tok: role for role, tok in ROLE_TOKENS.items()}
_ROLE_SPLIT_RE = re.compile("(" + "|".join(re.escape(t) for t in ROLE_TOKENS.values()) + ")")
_HH_SPLIT_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@functools.lru_cache(maxsize=16)
def _specials_pattern(special_tokens: tuple[str, ...]) -> re.Pattern:
  longest_first = sorted(set(special_tokens), key=len, reverse=True)
  return re.compile("|".join(re.escape(t) for t in longest_first))


def validate_messages(messages: Sequence[Message], special_tokens: Iterable[str] = SPECIAL_TOKENS) -> None:
  """Raise ValueError naming the offending index/key if `messages` is not a valid chat.

  Content may not contain any of `special_tokens` (a literal role token would inject a fake turn).
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("chat_format.py: messages must be a non-empty list of {'role','content'} dicts")
  specials = _specials_pattern(tuple(special_tokens))
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or set(m) != {"role", "content"}:
      raise ValueError(
          f"chat_format.py: messages[{i}] must be a dict with exactly keys 'role' and 'content', got {m!r}")
    if m["role"] not in ROLE_TOKENS:
      raise ValueError(f"chat_format.py: messages[{i}]['role']={m['role']!r} not in {sorted(ROLE_TOKENS)}")
    if m["role"] == "system" and i != 0:
      raise ValueError(f"chat_format.py: messages[{i}] is a system message; only messages[0] may be one")
    if not isinstance(m["content"], str):
      raise ValueError(f"chat_format.py: messages[{i}]['content'] must be str, got {type(m['content']).__name__}")
    found = specials.search(m["content"])
    if found:
      raise ValueError(f"chat_format.py: messages[{i}]['content'] contains the special token {found.group()!r}")


def check_prompt_messages(messages: Sequence[Message]) -> None:
  """ValueError unless the conversation awaits an assistant reply (its last turn is not assistant)."""
  if messages[-1]["role"] == "assistant":
    raise ValueError("chat_format.py: a prompt needs messages ending with a user/system turn, not assistant")


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
  """Messages -> role-format text. With add_generation_prompt the text ends in `<|assistant|>`."""
  validate_messages(messages)
  parts = []
  for m in messages:
    parts.append(ROLE_TOKENS[m["role"]] + m["content"])
    if m["role"] == "assistant":
      parts.append(EOS)
  if add_generation_prompt:
    if messages[-1]["role"] == "assistant":
      raise ValueError(
          "chat_format.py: add_generation_prompt needs messages that do not end with an assistant turn")
    parts.append(ASSISTANT)
  return "".join(parts)


def parse_chat(text: str) -> list[Message]:
  """Inverse of `render_chat` (also accepts a missing EOS after the final assistant turn).

  A trailing `<|assistant|>` with no content and no EOS is a generation prompt and is dropped, so
  `parse_chat(render_chat(m, add_generation_prompt=True)) == m`.
  """
  if not isinstance(text, str):
    raise ValueError(f"chat_format.py: parse_chat expects str, got {type(text).__name__}")
  pieces = _ROLE_SPLIT_RE.split(text)
  if pieces[0].strip():
    raise ValueError(f"chat_format.py: chat text must start with a role token, got {text[:60]!r}")
  messages: list[Message] = []
  n_turns = (len(pieces) - 1) // 2
  for k in range(n_turns):
    role = _TOKEN_TO_ROLE[pieces[1 + 2 * k]]
    body = pieces[2 + 2 * k]
    last = k == n_turns - 1
    if role == "assistant":
      if body.endswith(EOS):
        body = body[: -len(EOS)]
      elif not last:
        raise ValueError(f"chat_format.py: assistant turn {k} is not closed by {EOS}")
      elif body == "":
        continue  # generation prompt
    if any(t in body for t in SPECIAL_TOKENS):
      raise ValueError(f"chat_format.py: turn {k} ({role}) contains a stray special token: {body[:60]!r}")
    messages.append({"role": role, "content": body})
  if not messages:
    raise ValueError(f"chat_format.py: no turns found in {text[:60]!r}")
  validate_messages(messages)
  return messages


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
  """Encode a full conversation in the tokenizer's chat format.

  Returns (ids, loss_mask), two lists of equal length T; loss_mask[t] = 1 exactly on assistant
  content tokens and on the end-of-turn token closing each assistant turn (EOS in the role
  format), 0 on system/user turns and on role headers.
  """
  return tokenizer.chat.encode_chat(messages)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
  """Encode a conversation that awaits an assistant reply; the ids end with the generation prompt
  (`<|assistant|>` in the role format)."""
  return tokenizer.chat.prompt_ids(messages)


# ------------------------------------------------------------------------------ role format


class RoleFormat:
  """The built-in role format over a `Tokenizer` that has all of SPECIAL_TOKENS' role tokens."""

  kind = "role"

  def __init__(self, tok: Tokenizer):
    self.tok = tok
    self.special_tokens = tuple(sorted(set(SPECIAL_TOKENS) | set(tok.special_strings)))

  def validate(self, messages: Sequence[Message]) -> None:
    validate_messages(messages, self.special_tokens)

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    self.validate(messages)
    return render_chat(messages, add_generation_prompt)

  def segments(self, messages: Sequence[Message]) -> list[tuple[list[int], list[int]]]:
    """One (ids, loss) pair per message: role token, content, and EOS after assistant turns (loss 1
    on assistant content + EOS)."""
    out = []
    for m in messages:
      content = self.tok.encode(m["content"])
      asst = int(m["role"] == "assistant")
      ids = [self.tok.role_id(m["role"])] + content
      loss = [0] + [asst] * len(content)
      if asst:
        ids.append(self.tok.eos_id)
        loss.append(1)
      out.append((ids, loss))
    return out

  def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    self.validate(messages)
    ids: list[int] = []
    mask: list[int] = []
    for seg_ids, seg_loss in self.segments(messages):
      ids += seg_ids
      mask += seg_loss
    return ids, mask

  def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
    self.validate(messages)
    check_prompt_messages(messages)
    return self.encode_chat(messages)[0] + [self.tok.assistant_id]

  def response_ids(self, text: str) -> list[int]:
    return self.tok.encode(text) + [self.tok.eos_id]

  def prompt(self, messages: Sequence[Message]) -> SegmentPrompt:
    self.validate(messages)
    return SegmentPrompt(self, messages)


class SegmentPrompt:
  """A role-format prompt kept as segments (the system message, then one per later message), so a
  too-long prompt is truncated in token space without re-encoding."""

  def __init__(self, fmt: RoleFormat, messages: Sequence[Message]):
    self.generation_id = fmt.tok.assistant_id
    segments = fmt.segments(messages)
    has_system = messages[0]["role"] == "system"
    self.system: list[int] = segments[0][0] if has_system else []
    self.turns = segments[1:] if has_system else segments

  def full_len(self) -> int:
    return len(self.system) + sum(len(ids) for ids, _ in self.turns) + 1  # + <|assistant|>

  def min_len(self) -> int:
    """Shortest acceptable truncation: system + role token + 1 content token + <|assistant|>."""
    return min(self.full_len(), len(self.system) + 3)

  def fit(self, budget: int, events: list[str]) -> tuple[list[int], list[int]]:
    """Prompt ids (ending with <|assistant|>) and their loss mask within `budget` tokens.

    Drops the oldest whole turns after the system message first ("prompt_turns_dropped" in
    `events`); if the latest turn alone is still too long, keeps its role token and the right end
    of its content ("prompt_cut"). Needs budget >= min_len().
    """
    if budget < self.min_len():
      raise AssertionError(f"budget {budget} below the minimum prompt length {self.min_len()}")
    room = budget - 1 - len(self.system)  # tokens left for the turns
    turns = list(self.turns)
    if sum(len(ids) for ids, _ in turns) > room:
      while len(turns) > 1 and sum(len(ids) for ids, _ in turns) > room:
        turns.pop(0)
      if len(turns) < len(self.turns):
        events.append("prompt_turns_dropped")
      ids, loss = turns[0]
      if len(ids) > room:  # only the latest turn is left: cut the left of its content
        keep = room - 1
        turns[0] = ([ids[0]] + ids[len(ids) - keep:], [loss[0]] + loss[len(loss) - keep:])
        events.append("prompt_cut")
    ids = self.system + [t for seg, _ in turns for t in seg] + [self.generation_id]
    loss = [0] * len(self.system) + [x for _, seg in turns for x in seg] + [0]
    return ids, loss


# ------------------------------------------------------------------------------ HH transcripts


def parse_hh(text: str, keep_empty_last: bool = False) -> list[Message]:
  """Anthropic HH transcript `"\\n\\nHuman: ...\\n\\nAssistant: ..."` -> messages.

  Human -> "user", Assistant -> "assistant"; contents are whitespace-stripped. Consecutive turns of
  the same role are kept as they are (they occur in the real data). A final empty
  `Assistant:` turn (a prompt awaiting a reply) is dropped unless keep_empty_last.
  Raises ValueError if the text does not start with a Human turn.
  """
  if not isinstance(text, str):
    raise ValueError(f"chat_format.py: parse_hh expects str, got {type(text).__name__}")
  body = text.lstrip("\n")
  pieces = _HH_SPLIT_RE.split(body)
  if len(pieces) < 3 or pieces[0] != "" or pieces[1] != "Human":
    raise ValueError(f"chat_format.py: HH transcript must start with '\\n\\nHuman:', got {text[:60]!r}")
  messages = []
  for k in range((len(pieces) - 1) // 2):
    role = "user" if pieces[1 + 2 * k] == "Human" else "assistant"
    messages.append({"role": role, "content": pieces[2 + 2 * k].strip()})
  if not keep_empty_last and messages[-1]["role"] == "assistant" and messages[-1]["content"] == "":
    messages.pop()
  for i, m in enumerate(messages):
    for tok in SPECIAL_TOKENS:
      if tok in m["content"]:
        raise ValueError(f"chat_format.py: HH turn {i} contains the special token {tok!r}")
  return messages
