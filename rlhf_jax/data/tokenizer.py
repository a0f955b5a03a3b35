"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) behind one small interface.

Three ways to get a `Tokenizer`, all offline:
  * `train_bpe(texts, vocab_size)`  trains a deterministic byte-level BPE,
  * `load(dir)` reloads one written by `save(tok, dir)`,
  * `load_hf(dir)` wraps a GPT-2 style tokenizer stored in a local directory (transformers).

Every tokenizer carries the five special tokens below; `<|pad|>` is distinct from the EOS
`<|endoftext|>` so padding can never be confused with "end of answer". Byte-level BPE without a
normaliser makes `decode(encode(x)) == x` for any unicode `x` that does not itself contain a
special-token string (such substrings are encoded as the special token, by design, and
`decode(..., skip_special=True)` drops them).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD = "<|pad|>"
EOS = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order fixes the ids of a freshly trained BPE: pad=0, eos=1, system=2, user=3, assistant=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, SYSTEM, USER, ASSISTANT)
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

_TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class Tokenizer:
  """Thin wrapper over a `tokenizers.Tokenizer` that has all of `SPECIAL_TOKENS`.

  encode(text) -> list[int] (no BOS/EOS added; special-token strings in `text` map to their ids)
  decode(ids, skip_special=True) -> str
  Attributes: vocab_size, pad_id, eos_id, system_id, user_id, assistant_id (all int).
  """

  def __init__(self, backend: tokenizers.Tokenizer):
    missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
    if missing:
      raise ValueError(f"tokenizer.py: backend tokenizer lacks special tokens {missing}")
    self.backend = backend
    self.pad_id = backend.token_to_id(PAD)
    self.eos_id = backend.token_to_id(EOS)
    self.system_id = backend.token_to_id(SYSTEM)
    self.user_id = backend.token_to_id(USER)
    self.assistant_id = backend.token_to_id(ASSISTANT)
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
    self.special_ids = frozenset(backend.token_to_id(t) for t in SPECIAL_TOKENS)

  def role_id(self, role: str) -> int:
    """Id of the role token for `role` in {"system", "user", "assistant"}."""
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
    return f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"


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


def save(tok: Tokenizer, directory: str | os.PathLike) -> Path:
  """Write `tok` as `<directory>/tokenizer.json`; returns that path."""
  path = Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  out = path / _TOKENIZER_FILE
  tok.backend.save(str(out))
  return out


def load(directory: str | os.PathLike) -> Tokenizer:
  """Load a tokenizer written by `save`."""
  file = Path(directory) / _TOKENIZER_FILE
  if not file.is_file():
    raise ValueError(f"tokenizer.py: no {_TOKENIZER_FILE} in {directory}")
  return Tokenizer(tokenizers.Tokenizer.from_file(str(file)))


def load_hf(directory: str | os.PathLike) -> Tokenizer:
  """Wrap a local Hugging Face (e.g. GPT-2) fast tokenizer; never touches the network.

  Any of SPECIAL_TOKENS the checkpoint lacks is appended as a new special token (GPT-2 already
  has `<|endoftext|>`, so its EOS id stays 50256 and pad/system/user/assistant get 50257+).
  """
  from transformers import AutoTokenizer  # heavy import, only needed here

  path = Path(directory)
  if not path.is_dir():
    raise ValueError(f"tokenizer.py: load_hf directory {directory} does not exist")
  hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  backend = getattr(hf_tok, "backend_tokenizer", None) or getattr(hf_tok, "_tokenizer", None)
  if not isinstance(backend, tokenizers.Tokenizer):
    raise ValueError(f"tokenizer.py: {directory} did not load as a fast (tokenizers-backed) tokenizer")
  backend = tokenizers.Tokenizer.from_str(backend.to_str())  # private copy; do not mutate transformers' object
  backend.no_padding()
  backend.no_truncation()
  missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
  if missing:
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
  return Tokenizer(backend)
