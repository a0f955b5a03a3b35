"""Chat format backed by a model's own Jinja chat template (Hugging Face checkpoints).

Text is rendered exactly as transformers' `apply_chat_template(..., tokenize=False)` renders it
(same Jinja environment, same special-token variables), and token ids are `tok.encode(text)`.

Assistant-only loss mask. The mask covers what the model generates in each assistant turn: from
the end of the generation prompt up to and including the end-of-turn token (`tok.eos_id`, e.g.
`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3) -- never role headers, system or user turns.
Turn i is located by rendering prefixes: render(messages[:i], add_generation_prompt=True) must be
a prefix of render(messages[:i+1]), which must be a prefix of the whole rendering; characters map
to tokens through the tokenizer's offsets (a token is masked when it overlaps a span). On a
template with {% generation %} markers around content + end-of-turn this equals transformers'
`return_assistant_tokens_mask=True` (TRL's assistant_only_loss).

Truncation (`TemplatePrompt`) re-renders the conversation with fewer turns, so it is right for any
template, including ones that inject a default system block or a BOS.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from rlhf_jax.data.chat_format import SPECIAL_TOKENS, Message, check_prompt_messages, validate_messages

if TYPE_CHECKING:  # the tokenizer module imports this one
  from rlhf_jax.data.tokenizer import Tokenizer

_WHERE = "chat_templates.py"
# A conversation rendered once per tokenizer to learn which special tokens the template emits.
_PROBE = ({"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"},
          {"role": "user", "content": "Bye now"})


def render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                    special_tokens: dict[str, str]) -> str:
  """`messages` rendered by the Jinja `template`; special_tokens are its variables (bos_token, ...)."""
  from transformers.utils.chat_template_utils import render_jinja_template

  try:
    rendered, _ = render_jinja_template(conversations=[[dict(m) for m in messages]], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special_tokens)
  except Exception as e:  # template code is arbitrary: jinja syntax/undefined errors, raise_exception(...)
    raise ValueError(f"{_WHERE}: the chat template failed on {len(messages)} message(s) "
                     f"(roles {[m['role'] for m in messages]}): {e}") from None
  return rendered[0]


def _special_at(text: str, specials: Sequence[str]) -> str | None:
  """The longest of `specials` that `text` starts with, or None."""
  hits = [s for s in specials if s and text.startswith(s)]
  return max(hits, key=len) if hits else None


@dataclasses.dataclass(frozen=True)
class TemplateTokens:
  """What a chat template emits around turns (token strings).

  end_of_turn: the token closing an assistant turn (the generation stop).
  turn_starts: the special tokens that open a turn header (e.g. <|im_start|>, <|start_header_id|>).
  """
  end_of_turn: str
  turn_starts: tuple[str, ...]


def probe_template(template: str, special_tokens: dict[str, str], specials: Sequence[str]) -> TemplateTokens:
  """Render a probe conversation to find the end-of-turn and turn-start tokens of `template`.

  The end of turn is the special token right after the assistant content; if none follows it,
  the tokenizer's eos_token, which must then appear after the content. Raises ValueError if the
  template renders assistant content other than verbatim or closes it with neither.
  """
  render = lambda n, gen=False: render_template(template, _PROBE[:n], gen, special_tokens)
  one, two, three = render(1), render(2), render(3)
  reply = _PROBE[1]["content"]
  at = two.rfind(reply)
  if at < 0:
    raise ValueError(f"{_WHERE}: the chat template does not render assistant content verbatim "
                     f"({reply!r} missing from {two!r})")
  after = two[at + len(reply):]
  end = _special_at(after, specials)
  if end is None:
    end = special_tokens.get("eos_token")
    if not end or end not in after:
      raise ValueError(f"{_WHERE}: the chat template closes an assistant turn with neither a special token nor "
                       f"the eos_token {end!r} (text after the reply: {after!r}); a model could not learn to stop")
  starts = set()
  for short, long in ((one, render(1, True)), (one, two), (two, three)):
    if long.startswith(short):  # the segment a turn (or the generation prompt) adds
      head = _special_at(long[len(short):].lstrip(), specials)
      if head is not None and head != end:
        starts.add(head)
  return TemplateTokens(end, tuple(sorted(starts)))


def _span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
  """1 for every token whose character range overlaps one of the sorted, disjoint `spans`."""
  mask = [0] * len(offsets)
  j = 0
  for t, (start, end) in enumerate(offsets):
    while j < len(spans) and start >= spans[j][1]:
      j += 1
    if j == len(spans):
      break
    if end > spans[j][0]:
      mask[t] = 1
  return mask


class TemplateFormat:
  """Chat format of a tokenizer with a Jinja chat template (same methods as `RoleFormat`)."""

  kind = "template"

  def __init__(self, tok: Tokenizer, template: str):
    self.tok = tok
    self.template = template
    self.special_tokens = tuple(sorted(set(SPECIAL_TOKENS) | set(tok.special_strings)))
    self.end_of_turn = tok.backend.id_to_token(tok.eos_id)

  # ---------------------------------------------------------------------------- rendering
  def validate(self, messages: Sequence[Message]) -> None:
    validate_messages(messages, self.special_tokens)

  def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return render_template(self.template, messages, add_generation_prompt, self.tok.special_tokens)

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    self.validate(messages)
    if add_generation_prompt:
      check_prompt_messages(messages)
    return self._render(messages, add_generation_prompt)

  def assistant_spans(self, messages: Sequence[Message], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) in `text` (the rendering of `messages`) that the assistant
    generates: each assistant turn after its generation prompt, through its end-of-turn token."""
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self._render(messages[:i], True)
      upto = self._render(messages[:i + 1], False)
      if not upto.startswith(before):
        raise ValueError(f"{_WHERE}: chat template problem: rendering messages[:{i}] with add_generation_prompt=True "
                         f"is not a prefix of rendering messages[:{i + 1}] ({before[-60:]!r} vs {upto[-60:]!r}); "
                         f"cannot tell which tokens assistant turn {i} generates")
      if not text.startswith(upto):
        raise ValueError(f"{_WHERE}: chat template problem: rendering messages[:{i + 1}] is not a prefix of the whole "
                         f"conversation (the template rewrites earlier turns); cannot place assistant turn {i}")
      end = upto.find(self.end_of_turn, len(before))
      if end < 0:
        raise ValueError(f"{_WHERE}: chat template problem: assistant turn {i} is not closed by {self.end_of_turn!r}")
      spans.append((len(before), end + len(self.end_of_turn)))
    return spans

  # ---------------------------------------------------------------------------- token ids
  def ids(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of the rendering (no validation, no mask)."""
    return self.tok.encode(self._render(messages, add_generation_prompt))

  def ids_and_mask(self, messages: Sequence[Message], add_generation_prompt: bool
                   ) -> tuple[list[int], list[int]]:
    text = self._render(messages, add_generation_prompt)
    enc = self.tok.backend.encode(text, add_special_tokens=False)
    return list(enc.ids), _span_mask(enc.offsets, self.assistant_spans(messages, text))

  def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    self.validate(messages)
    return self.ids_and_mask(messages, False)

  def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
    self.validate(messages)
    check_prompt_messages(messages)
    return self.ids(messages, True)

  def response_ids(self, text: str) -> list[int]:
    return self.tok.encode(text) + [self.tok.eos_id]

  def prompt(self, messages: Sequence[Message]) -> TemplatePrompt:
    self.validate(messages)
    return TemplatePrompt(self, messages)


class TemplatePrompt:
  """A template-format prompt (rendered with the generation prompt), truncated by re-rendering.

  fit(budget) keeps a leading system message and drops the oldest turns first, restarting the
  dialogue at a user turn ("prompt_turns_dropped"); if the last user turn alone is still too long,
  the left of its content is cut, token by token, and the prompt re-rendered ("prompt_cut").
  """

  def __init__(self, fmt: TemplateFormat, messages: Sequence[Message]):
    self.fmt = fmt
    self.head = list(messages[:1]) if messages[0]["role"] == "system" else []
    self.turns = list(messages[len(self.head):])
    later_users = [i for i, m in enumerate(self.turns) if m["role"] == "user" and i > 0]
    self.starts = [0] + later_users  # where the kept dialogue may begin, oldest first
    self.full = fmt.ids_and_mask(list(messages), True)
    self._min_len: int | None = None

  def full_len(self) -> int:
    return len(self.full[0])

  def _last(self) -> list[Message]:
    return self.head + self.turns[self.starts[-1]:]

  def _cuttable(self) -> list[int]:
    """Content tokens of the last user turn, [] if there is none to cut."""
    last = self._last()
    if not self.turns or last[len(self.head)]["role"] != "user":
      return []
    return self.fmt.tok.encode(last[len(self.head)]["content"])

  def _cut(self, keep: int) -> list[Message]:
    """The last user turn (and anything after it) with only the rightmost `keep` content tokens."""
    last = self._last()
    text = self.fmt.tok.decode(self._cuttable()[-keep:], skip_special=False).lstrip("\ufffd")
    cut = dict(last[len(self.head)], content=text)
    return self.head + [cut] + last[len(self.head) + 1:]

  def min_len(self) -> int:
    """Shortest acceptable truncation: the last user turn cut to one content token."""
    if self._min_len is None:
      n = len(self._cuttable())
      shortest = self._last() if n <= 1 else self._cut(1)
      self._min_len = min(self.full_len(), len(self.fmt.ids(shortest, True)))
    return self._min_len

  def fit(self, budget: int, events: list[str]) -> tuple[list[int], list[int]]:
    """Prompt ids (ending with the generation prompt) and loss mask within `budget` tokens.
    Needs budget >= min_len()."""
    if budget < self.min_len():
      raise AssertionError(f"budget {budget} below the minimum prompt length {self.min_len()}")
    if self.full_len() <= budget:
      return self.full
    for start in self.starts[1:]:
      kept = self.head + self.turns[start:]
      if len(self.fmt.ids(kept, True)) <= budget:
        events.append("prompt_turns_dropped")
        return self.fmt.ids_and_mask(kept, True)
    if len(self.starts) > 1:
      events.append("prompt_turns_dropped")
    events.append("prompt_cut")
    lo, hi = 1, len(self._cuttable())  # fits with lo tokens kept, not with hi
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if len(self.fmt.ids(self._cut(mid), True)) <= budget:
        lo = mid
      else:
        hi = mid
    return self.fmt.ids_and_mask(self._cut(lo), True)
