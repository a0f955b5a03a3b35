"""Chat format: messages <-> text <-> token ids with an assistant-only loss mask.

Messages are `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; a system message may
only come first. Rendered text:

    <|system|>content<|user|>content<|assistant|>content<|endoftext|><|user|>...

Every assistant turn is closed by EOS (`<|endoftext|>`). Token ids are produced segment by segment
(role token, then the content alone, then EOS), so the tokenization of one turn never depends on its
neighbours and the loss mask lines up exactly. Because special-token strings are atomic in the
tokenizer, `tokenizer.encode(render_chat(m)) == encode_chat(tokenizer, m)[0]` as well.
"""
from __future__ import annotations

import re
from typing import Sequence

from rlhf_jax.data.tokenizer import ASSISTANT, EOS, ROLE_TOKENS, SPECIAL_TOKENS, Tokenizer

Message = dict  # {"role": str, "content": str}
_TOKEN_TO_ROLE = {tok: role for role, tok in ROLE_TOKENS.items()}
_ROLE_SPLIT_RE = re.compile("(" + "|".join(re.escape(t) for t in ROLE_TOKENS.values()) + ")")
_HH_SPLIT_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def validate_messages(messages: Sequence[Message]) -> None:
  """Raise ValueError naming the offending index/key if `messages` is not a valid chat."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("chat_format.py: messages must be a non-empty list of {'role','content'} dicts")
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
    for tok in SPECIAL_TOKENS:
      if tok in m["content"]:
        # A literal role token inside content would inject a fake turn.
        raise ValueError(f"chat_format.py: messages[{i}]['content'] contains the special token {tok!r}")


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
  """Messages -> chat text. With add_generation_prompt the text ends in `<|assistant|>`."""
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
  """Encode a full conversation.

  Returns (ids, loss_mask), two lists of equal length T; loss_mask[t] = 1 exactly on assistant
  content tokens and on the EOS closing each assistant turn, 0 on system/user content and role tokens.
  """
  validate_messages(messages)
  ids: list[int] = []
  mask: list[int] = []
  for m in messages:
    content = tokenizer.encode(m["content"])
    is_asst = int(m["role"] == "assistant")
    ids.append(tokenizer.role_id(m["role"]))
    mask.append(0)
    ids.extend(content)
    mask.extend([is_asst] * len(content))
    if is_asst:
      ids.append(tokenizer.eos_id)
      mask.append(1)
  return ids, mask


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
  """Encode a conversation that awaits an assistant reply; the ids end with `<|assistant|>`."""
  validate_messages(messages)
  if messages[-1]["role"] == "assistant":
    raise ValueError("chat_format.py: encode_prompt needs messages ending with a user/system turn, not assistant")
  ids, _ = encode_chat(tokenizer, messages)
  return ids + [tokenizer.assistant_id]


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
