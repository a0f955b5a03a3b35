"""Tokenizers (Hugging Face `tokenizers`) behind one small interface, with their chat format.

Ways to get a `Tokenizer`, all offline:
  * `train_bpe(texts, vocab_size)`  trains a deterministic byte-level BPE (built-in role format),
  * `load_hf(dir)` wraps any Hugging Face fast tokenizer stored in a local directory,
  * `load(dir)` reloads one written by `save(tok, dir)` (or by the old `save`: tokenizer.json only).

`save` writes a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with the
pad/eos tokens and the chat template), so `transformers.AutoTokenizer.from_pretrained(dir)` reads
the same ids and renders the same chat text.

Chat format (`tok.chat`, see chat_format.py): a checkpoint's own chat template when it has one,
else the built-in role format (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|endoftext|>`), whose
missing tokens are then added. PAD is never a stop token: a checkpoint without a pad token, or
whose pad is its EOS / end-of-turn token, gets a new `<|pad|>`. Every token added on top of the
checkpoint's vocabulary is listed in `tok.added_ids` (the model grows its embedding by those rows).

Byte-level BPE without a normaliser makes `decode(encode(x)) == x` for any unicode `x` that does not
itself contain a special-token string (such substrings are encoded as the special token, by
design, and `decode(..., skip_special=True)` drops them).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax.data.chat_format import (  # noqa: F401 (re-exported: the special tokens live with the format)
    ASSISTANT, EOS, PAD, ROLE_TEMPLATE, ROLE_TOKENS, SPECIAL_TOKENS, SYSTEM, USER, RoleFormat)
from rlhf_jax.data.chat_templates import TemplateFormat, probe_template

_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_ROLE_DEFAULTS = {"eos_token": EOS, "pad_token": PAD}


def _special_strings(backend: tokenizers.Tokenizer) -> tuple[str, ...]:
  """Contents of the backend's special added tokens, in id order."""
  added = backend.get_added_tokens_decoder()
  return tuple(added[i].content for i in sorted(added) if added[i].special)


def _stop_strings(backend: tokenizers.Tokenizer, chat_template: str | None,
                  special_tokens: Mapping[str, str]) -> tuple[str, frozenset[str]]:
  """(end-of-turn token, all tokens that end a reply) of a chat format, as token strings."""
  if chat_template is None:
    end, starts = EOS, (SYSTEM, USER, ASSISTANT)
  else:
    probe = probe_template(chat_template, dict(special_tokens), _special_strings(backend))
    end, starts = probe.end_of_turn, probe.turn_starts
  stops = {end, *starts}
  if special_tokens.get("eos_token"):
    stops.add(special_tokens["eos_token"])
  return end, frozenset(stops)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus its chat format.

  encode(text) -> list[int] (no BOS/EOS added; special-token strings in `text` map to their ids)
  decode(ids, skip_special=True) -> str
  Attributes:
    vocab_size       number of ids (the vocabulary including added tokens)
    pad_id, eos_id   padding; the end of an assistant turn = the generation stop (`<|endoftext|>`
                     in the role format, the template's end-of-turn token such as `<|im_end|>`)
    stop_ids         frozenset of ids that end a reply: eos_id, the tokenizer's eos token and the
                     tokens opening a turn; never pad_id
    special_ids      frozenset of the ids of all special tokens; special_strings: their texts
    special_tokens   {"eos_token": str, "pad_token": str, "bos_token": ...}: Hugging Face's
                     special_tokens_map, the variables a chat template sees
    chat_template    the Jinja chat template, or None for the built-in role format
    chat             the chat format (chat_format.RoleFormat or chat_templates.TemplateFormat)
    added_ids        ids added on top of the loaded checkpoint's vocabulary (tuple, maybe empty);
                     base_vocab_size: the checkpoint's size before them
    system_id, user_id, assistant_id: the role tokens (role format only, else None)
  """

  def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
               special_tokens: Mapping[str, str] | None = None, added_ids: Sequence[int] = (),
               base_vocab_size: int | None = None):
    self.backend = backend
    self.chat_template = None if chat_template in (None, ROLE_TEMPLATE) else chat_template
    specials = dict(special_tokens or {})
    if self.chat_template is None:
      specials = {**_ROLE_DEFAULTS, **{k: v for k, v in specials.items() if v}}
      self._require_tokens([EOS, SYSTEM, USER, ASSISTANT, specials["pad_token"]])
    elif not specials.get("pad_token"):
      raise ValueError("tokenizer.py: a chat-template tokenizer needs special_tokens['pad_token'] (load_hf adds one)")
    self.special_tokens = specials
    self.special_strings = _special_strings(backend)
    self.special_ids = frozenset(backend.token_to_id(t) for t in self.special_strings)
    vocab = backend.get_vocab(with_added_tokens=True)
    self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    self.added_ids = tuple(int(i) for i in added_ids)
    self.base_vocab_size = self.vocab_size - len(self.added_ids) if base_vocab_size is None else int(base_vocab_size)
    end, stops = _stop_strings(backend, self.chat_template, specials)
    self._require_tokens([end, *stops, specials["pad_token"]])
    self.eos_id = backend.token_to_id(end)
    self.pad_id = backend.token_to_id(specials["pad_token"])
    self.stop_ids = frozenset(backend.token_to_id(t) for t in stops)
    if self.pad_id in self.stop_ids:
      raise ValueError(f"tokenizer.py: the pad token {specials['pad_token']!r} also ends replies "
                       f"(stop tokens {sorted(stops)}); padding must never read as end of answer")
    role = self.chat_template is None
    self.system_id, self.user_id, self.assistant_id = (
        (backend.token_to_id(t) if role else None) for t in (SYSTEM, USER, ASSISTANT))
    self.chat = RoleFormat(self) if role else TemplateFormat(self, self.chat_template)

  def _require_tokens(self, tokens: Iterable[str]) -> None:
    missing = sorted({t for t in tokens if self.backend.token_to_id(t) is None})
    if missing:
      raise ValueError(f"tokenizer.py: backend tokenizer lacks special tokens {missing}")

  def role_id(self, role: str) -> int:
    """Id of the role token for `role` in {"system", "user", "assistant"} (role format only)."""
    if self.chat_template is not None:
      raise ValueError("tokenizer.py: this tokenizer uses its chat template; role tokens exist only in the "
                       "built-in role format (use tok.chat)")
    if role not in ROLE_TOKENS:
      raise ValueError(f"tokenizer.py: unknown role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
    return self.backend.token_to_id(ROLE_TOKENS[role])

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"tokenizer.py: encode expects str, got {type(text).__name__}")
    return list(self.backend.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"tokenizer.py: ids {bad[:5]} outside [0, {self.vocab_size})")
    return self.backend.decode(ids, skip_special_tokens=skip_special)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id}, "
            f"chat={self.chat.kind})")


# ------------------------------------------------------------------------------ training


def _strip_specials(texts: Iterable[str]) -> Iterable[str]:
  # Special strings are atomic at encode time, so BPE must not spend merges on "<|", "user", "|>".
  for text in texts:
    for piece in _SPECIAL_RE.split(text):
      if piece:
        yield piece


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2) -> Tokenizer:
  """Train a byte-level BPE on `texts`; same texts and arguments -> same vocabulary and merges.

  vocab_size counts the 256 byte symbols and the special tokens, so it must be >= 256 + len(specials).
  `special_tokens` must contain all of SPECIAL_TOKENS (extra ones are allowed, appended after).
  """
  special_tokens = list(special_tokens)
  missing = [t for t in SPECIAL_TOKENS if t not in special_tokens]
  if missing:
    raise ValueError(f"tokenizer.py: train_bpe special_tokens must include {missing}")
  floor = 256 + len(special_tokens)
  if vocab_size < floor:
    raise ValueError(
        f"tokenizer.py: vocab_size={vocab_size} < {floor} (256 bytes + {len(special_tokens)} specials)")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  hf.train_from_iterator(_strip_specials(texts), trainer=trainer)
  return Tokenizer(hf)


# ------------------------------------------------------------------------------ saving and loading


def _saved_config(special_tokens: Mapping[str, str], template: str) -> dict:
  """tokenizer_config.json as `save` writes it (and `_own_parts` recognises it)."""
  return {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens, "chat_template": template,
          "clean_up_tokenization_spaces": False}


def save(tok: Tokenizer, directory: str | os.PathLike) -> Path:
  """Write `tok` as a Hugging Face tokenizer directory; returns the path of its tokenizer.json.

  tokenizer_config.json holds the special tokens and the chat template (ROLE_TEMPLATE for the role
  format); chat_template.jinja repeats the template for transformers versions that read it there.
  Tokens added by `load_hf` are now part of the saved vocabulary (a reload has no `added_ids`).
  """
  path = Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  out = path / _TOKENIZER_FILE
  tok.backend.save(str(out))
  template = tok.chat_template or ROLE_TEMPLATE
  config = _saved_config(tok.special_tokens, template)
  (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  (path / _TEMPLATE_FILE).write_text(template, encoding="utf-8")
  return out


def load(directory: str | os.PathLike) -> Tokenizer:
  """Load a tokenizer written by `save`, or by the old `save` (a lone tokenizer.json with our
  special tokens); any other Hugging Face tokenizer directory goes through `load_hf`."""
  path = Path(directory)
  if not path.is_dir():
    raise ValueError(f"tokenizer.py: no {_TOKENIZER_FILE} in {directory} (no such directory)")
  file = path / _TOKENIZER_FILE
  if file.is_file() and not (path / _CONFIG_FILE).is_file():
    backend = tokenizers.Tokenizer.from_file(str(file))
    if all(backend.token_to_id(t) is not None for t in SPECIAL_TOKENS):
      return Tokenizer(backend)
  return load_hf(path)


# The special-token keys of Hugging Face's special_tokens_map that `save` may write (single strings).
_SPECIAL_KEYS = frozenset({"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"})


def _own_parts(path: Path) -> tuple[tokenizers.Tokenizer, dict[str, str], str] | None:
  """`_hf_parts` without transformers, for a directory exactly as `save` writes it (a
  PreTrainedTokenizerFast config holding only single special-token strings, a chat template and
  clean_up_tokenization_spaces=False; every special token an added special token of
  tokenizer.json), else None. Every stage directory holds such a tokenizer, and importing
  transformers to read it costs a process ~2 s. tests/test_tokenizer_chat.py checks that both
  readers agree."""
  config_file, tokenizer_file = path / _CONFIG_FILE, path / _TOKENIZER_FILE
  if not (config_file.is_file() and tokenizer_file.is_file()):
    return None
  try:
    config = json.loads(config_file.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError):
    return None   # transformers reports it
  if not isinstance(config, dict):
    return None
  template = config.get("chat_template")
  specials = {k: v for k, v in config.items() if k in _SPECIAL_KEYS}
  if (config != _saved_config(specials, template) or config["clean_up_tokenization_spaces"] is not False
      or not isinstance(template, str) or not all(isinstance(v, str) for v in specials.values())):
    return None
  backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
  added_special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
  if not set(specials.values()) <= added_special:
    return None   # transformers would register the missing ones as special tokens
  backend.no_padding()
  backend.no_truncation()
  return backend, specials, template


def _hf_parts(path: Path) -> tuple[tokenizers.Tokenizer, dict[str, str], str | None]:
  """(private copy of the backend, special_tokens_map, chat template or None) via transformers."""
  from transformers import AutoTokenizer  # heavy import, only needed here

  try:
    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"tokenizer.py: {path} holds no loadable Hugging Face tokenizer ({_TOKENIZER_FILE}, "
                     f"{_CONFIG_FILE} or vocab.json + merges.txt): {e}") from None
  backend = getattr(hf_tok, "backend_tokenizer", None)
  if not isinstance(backend, tokenizers.Tokenizer):
    raise ValueError(f"tokenizer.py: {path} did not load as a fast (tokenizers-backed) tokenizer")
  backend = tokenizers.Tokenizer.from_str(backend.to_str())  # do not mutate transformers' object
  backend.no_padding()
  backend.no_truncation()
  template = hf_tok.chat_template
  if isinstance(template, dict):  # several named templates
    if "default" not in template:
      raise ValueError(f"tokenizer.py: {path} has named chat templates {sorted(template)} but no 'default'")
    template = template["default"]
  return backend, dict(hf_tok.special_tokens_map), template or None


def _add_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str]) -> tuple[int, ...]:
  """Add the missing ones of `tokens` as special tokens; their new ids."""
  missing = [t for t in dict.fromkeys(tokens) if backend.token_to_id(t) is None]
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
  return tuple(backend.token_to_id(t) for t in missing)


def wrap_backend(backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str],
                 chat_template: str | None) -> Tokenizer:
  """A `Tokenizer` over a checkpoint's backend (modified in place), adding what it lacks.

  No chat template (or ROLE_TEMPLATE): the role format; missing role tokens and EOS are added.
  Either way a new `<|pad|>` is added unless the checkpoint's pad token exists and ends no reply.
  """
  specials = {k: v for k, v in special_tokens.items() if v}
  template = None if chat_template in (None, ROLE_TEMPLATE) else chat_template
  base = max(backend.get_vocab_size(with_added_tokens=True), max(backend.get_vocab().values(), default=-1) + 1)
  if template is None:
    specials.setdefault("eos_token", EOS)
    needed = [EOS, SYSTEM, USER, ASSISTANT]
  else:
    needed = []
  _, stops = _stop_strings(backend, template, specials)
  if specials.get("pad_token") in (None, *stops):
    specials["pad_token"] = PAD
  added = _add_tokens(backend, [specials["pad_token"], *needed])
  return Tokenizer(backend, template, specials, added_ids=added, base_vocab_size=base)


def load_hf(directory: str | os.PathLike) -> Tokenizer:
  """Wrap a local Hugging Face fast tokenizer (GPT-2, Llama 3, Qwen, ...); never touches the network.

  Reads tokenizer.json / tokenizer_config.json (chat_template there or in chat_template.jinja) or
  a vocab.json + merges.txt layout through transformers' AutoTokenizer (local files only), then
  `wrap_backend`: GPT-2 keeps EOS 50256 and gets pad/system/user/assistant as 50257+.
  """
  path = Path(directory)
  if not path.is_dir():
    raise ValueError(f"tokenizer.py: load_hf directory {directory} does not exist")
  backend, special_tokens, template = _own_parts(path) or _hf_parts(path)
  return wrap_backend(backend, special_tokens, template)


# ------------------------------------------------------------------------------ compatibility


def _rules(tok: Tokenizer) -> dict:
  """The parts of tokenizer.json that decide how text splits (model merges, normaliser, ...)."""
  spec = json.loads(tok.backend.to_str())
  model = {k: v for k, v in (spec.get("model") or {}).items() if k != "vocab"}
  return {"model": model, **{k: spec.get(k) for k in ("normalizer", "pre_tokenizer")}}


def check_compatible(a: Tokenizer, b: Tokenizer, name_a: str, name_b: str) -> None:
  """Raise one ValueError naming both tokenizers (e.g. their directories) and every difference
  that would make ids of one meaningless to a model trained with the other: vocabulary size, the
  vocabulary itself, tokenization rules, pad/eos ids, the chat template."""
  diffs = []
  if a.vocab_size != b.vocab_size:
    diffs.append(f"vocab size ({a.vocab_size} vs {b.vocab_size})")
  va, vb = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
  if va != vb:
    changed = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
    diffs.append(f"vocabulary ({len(changed)} tokens differ, e.g. "
                 + ", ".join(f"{t!r}: {va.get(t)} vs {vb.get(t)}" for t in changed[:3]) + ")")
  elif _rules(a) != _rules(b):
    diffs.append("tokenization rules (merges, normalizer or pre-tokenizer)")
  if a.pad_id != b.pad_id:
    diffs.append(f"pad id ({a.pad_id} vs {b.pad_id})")
  if a.eos_id != b.eos_id:
    diffs.append(f"eos id ({a.eos_id} vs {b.eos_id})")
  if a.chat_template != b.chat_template:
    show = lambda t: "the built-in role format" if t is None else f"template {t[:40]!r}..."
    diffs.append(f"chat template ({show(a.chat_template)} vs {show(b.chat_template)})")
  if diffs:
    raise ValueError(f"tokenizer.py: {name_a} and {name_b} must share one tokenizer but differ in: "
                     + "; ".join(diffs))
