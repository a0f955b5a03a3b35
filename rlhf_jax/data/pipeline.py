"""grain input pipelines: fixed-shape numpy batches with resumable iterator state.

All iterators are grain `DatasetIterator`s: `get_state()`/`set_state()` are
saved in every checkpoint by the training loop, so a resumed run continues with
the exact next batch. Each host reads a disjoint shard (`shard_index`,
`shard_count`, by default `jax.process_index()`/`jax.process_count()`), and the
per-host batch is the global batch divided by the number of hosts.

Three record pipelines sit next to the packed-LM one (record schemas: `records.py`):

  SFT          demonstration -> {"tokens","targets","mask","attention_mask"}: int32 [B, T]
  reward model comparison    -> {"tokens","attention_mask"}: int32 [B, K, T],
                                {"ranks","reward_index","response_start"}: int32 [B, K],
                                {"valid"}: bool [B, K]; for DPO also {"ref_logps"}: float32 [B, K]
  PPO prompts  prompt         -> {"tokens","attention_mask"}: int32 [B, P] (LEFT padded),
                                {"index"}: int32 [B] (position of the record in `records`)

Token ids come from the tokenizer's chat format (`tok.chat`: the built-in role format or the
model's own chat template; see chat_format.py). Prompts end with the generation prompt; a
response is its content ids + `tok.eos_id` (the end-of-turn token). Sequences are right padded
with `pad_id` (prompts for generation are left padded). A prompt that is too long loses its
oldest turns first (a leading system message is always kept; templates are re-rendered with
fewer turns); if the latest turn alone is still too long, the left of its content is cut (its
role header stays). The response has priority over the prompt: it is kept whole whenever it fits
next to the shortest acceptable prompt, else cut at the right (and then has no closing EOS).

Every record is checked once, before the iterator is built (a "scan"): records with a missing
key raise ValueError naming the record; records that cannot yield a usable example are skipped,
and truncations are counted, in a `PipelineStats` that is logged and attached to the iterator
as `.stats` (eval batch lists carry `.stats` too). Only kept records are sharded over hosts, and
each host gets the same number of them (the < shard_count leftover is counted as `unassigned`),
so every host produces the same number of batches.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data import records as record_lib
from rlhf_jax.data.chat_format import validate_messages
from rlhf_jax.data.comparisons import comparisons_to_pairs, label_comparisons  # noqa: F401 (re-export)
from rlhf_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Bounded background work: on a few CPU cores a deep prefetch only steals time from the train step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)

Records = Sequence[Mapping[str, Any]]  # a list, or any random-access source (len + getitem)

# Skip reasons (the record gives no example) and truncation events (it does, shortened).
SKIP_REASONS = ("prompt_too_long", "empty_response", "fewer_than_2_responses", "all_tied")
TRUNCATIONS = ("prompt_turns_dropped", "prompt_cut", "response_cut", "responses_subsampled")


# ------------------------------------------------------------------------------------ stats


@dataclasses.dataclass
class PipelineStats:
  """What a pipeline did with its records (the same on every host).

  seen: records scanned; kept: records that give an example; skipped: records left out, by
  reason (SKIP_REASONS); truncated: truncation events, by kind (TRUNCATIONS; once per record,
  except `response_cut` in comparisons, once per cut response); dropped_responses: responses
  removed from kept comparisons (`empty_response`, `over_k_max`); first: the record where each
  reason/kind first occurred; unassigned: kept records left out so every host has the same
  number (training only; eval keeps them); host_records: records this host iterates per epoch.
  """

  name: str
  seen: int = 0
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_responses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: dict[str, str] = dataclasses.field(default_factory=dict)
  unassigned: int = 0
  host_records: int = 0

  def _note(self, counter: collections.Counter, reason: str, where: str) -> None:
    counter[reason] += 1
    self.first.setdefault(reason, where)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict[str, Any]:
    return {"name": self.name, "seen": self.seen, "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "truncated": dict(sorted(self.truncated.items())),
            "dropped_responses": dict(sorted(self.dropped_responses.items())),
            "first": dict(sorted(self.first.items())),
            "unassigned": self.unassigned, "host_records": self.host_records}

  def summary(self) -> str:
    def fmt(c):
      return ", ".join(f"{k}={v} (first at {self.first[k]})" for k, v in sorted(c.items())) or "none"
    return (f"{self.name}: {self.seen} records seen, {self.kept} kept, {self.num_skipped} skipped "
            f"[{fmt(self.skipped)}]; truncated [{fmt(self.truncated)}]; dropped responses "
            f"[{fmt(self.dropped_responses)}]; {self.unassigned} unassigned to hosts; "
            f"{self.host_records} on this host")

  def log(self) -> None:
    log.log(logging.WARNING if self.num_skipped else logging.INFO, "%s", self.summary())


class BatchList(list):
  """A list of eval batches that also carries the `PipelineStats` of its records as `.stats`."""

  stats: PipelineStats


# ------------------------------------------------------------------------ record validation





def _messages(record: Any, where: str) -> list[dict]:
  messages = record_lib.require(record, "messages", where)
  try:
    validate_messages(messages)
  except ValueError as e:
    raise ValueError(f"pipeline.py: {where}: key 'messages': {e}") from None
  return list(messages)


def _prompt_messages(record: Any, where: str) -> list[dict]:
  messages = _messages(record, where)
  if messages[-1]["role"] == "assistant":
    raise ValueError(f"pipeline.py: {where}: key 'messages': a prompt must end with a user turn, "
                     "not an assistant turn")
  return messages


def _demonstration_parts(record: Any, where: str) -> tuple[list[dict], str]:
  """(prompt messages, response text) from {"messages": [..., assistant]} or the synthetic
  world's {"messages": [..., user], "response": str}."""
  messages = _messages(record, where)
  if "response" in record and messages[-1]["role"] != "assistant":
    response = record["response"]
    if not isinstance(response, str):
      raise ValueError(f"pipeline.py: {where}: key 'response': expected str, got {type(response).__name__}")
    return messages, response
  if messages[-1]["role"] != "assistant":
    raise ValueError(f"pipeline.py: {where}: key 'messages': a demonstration must end with the assistant "
                     "response (or give it as 'response')")
  if len(messages) < 2:
    raise ValueError(f"pipeline.py: {where}: key 'messages': the response has no prompt turn before it")
  return messages[:-1], messages[-1]["content"]


def _comparison_parts(record: Any, where: str) -> tuple[list[dict], list[str], list[int]]:
  messages = _prompt_messages(record, where)
  responses = record_lib.require(record, "responses", where)
  ranks = record_lib.require(record, "ranks", where)
  if not isinstance(responses, (list, tuple)) or not all(isinstance(r, str) for r in responses):
    raise ValueError(f"pipeline.py: {where}: key 'responses': expected a list of str")
  if not isinstance(ranks, (list, tuple, np.ndarray)) or len(ranks) != len(responses):
    raise ValueError(f"pipeline.py: {where}: key 'ranks': expected {len(responses)} ints, one per response")
  ranks = [int(r) for r in ranks]
  if any(r < 0 for r in ranks):
    raise ValueError(f"pipeline.py: {where}: key 'ranks': ranks must be >= 0, got {ranks}")
  return messages, list(responses), ranks


# ------------------------------------------------------------------- tokenisation/truncation


def _tokenise_prompt(tok: Tokenizer, messages: Sequence[Mapping[str, str]], where: str = "prompt"):
  """The tokenizer's chat prompt for `messages` (`tok.chat.prompt`): full_len(), min_len() and
  fit(budget, events) -> (ids ending with the generation prompt, loss on earlier assistant turns)."""
  try:
    return tok.chat.prompt(list(messages))
  except ValueError as e:
    raise ValueError(f"pipeline.py: {where}: key 'messages': {e}") from None


def _fit_prompt(tok: Tokenizer, prompt, budget: int, events: list[str]) -> tuple[list[int], list[int]]:
  """Prompt ids and loss mask within `budget` tokens: the oldest turns are dropped first (a
  leading system message is kept), then the left of the latest turn's content is cut; events get
  "prompt_turns_dropped" / "prompt_cut". Needs budget >= prompt.min_len()."""
  return prompt.fit(budget, events)


def _min_prompt_len(prompt, max_len: int, resp_len: int) -> int:
  """prompt.min_len(), skipped (as the full length) when prompt and response fit untruncated."""
  full = prompt.full_len()
  return full if full + resp_len <= max_len else prompt.min_len()


def _response_ids(tok: Tokenizer, text: str) -> list[int] | None:
  """Content ids + the end-of-turn token (`tok.chat.response_ids`), or None when the text
  tokenises to nothing."""
  ids = tok.chat.response_ids(text)
  return ids if len(ids) > 1 else None


class _Skip(Exception):
  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _demonstration_example(tok: Tokenizer, record: Any, max_len: int, where: str,
                           history_loss: bool, events: list[str]) -> dict[str, np.ndarray]:
  messages, response = _demonstration_parts(record, where)
  prompt = _tokenise_prompt(tok, messages, where)
  resp = _response_ids(tok, response)
  if resp is None:
    raise _Skip("empty_response")
  room = max_len - _min_prompt_len(prompt, max_len, len(resp))
  if room < 1:
    raise _Skip("prompt_too_long")
  if len(resp) > room:
    resp = resp[:room]
    events.append("response_cut")
  ids, loss = _fit_prompt(tok, prompt, max_len - len(resp), events)
  if not history_loss:
    loss = [0] * len(loss)
  seq = np.asarray(ids + resp, np.int32)
  seq_loss = np.asarray(loss + [1] * len(resp), np.int32)
  n = len(seq)
  out = {k: np.zeros(max_len, np.int32) for k in ("tokens", "targets", "mask", "attention_mask")}
  out["tokens"][:] = tok.pad_id
  out["targets"][:] = tok.pad_id
  out["tokens"][:n] = seq
  out["targets"][:n - 1] = seq[1:]  # targets[t] is the token that follows tokens[t]
  out["mask"][:n - 1] = seq_loss[1:]
  out["attention_mask"][:n] = 1
  return out


def _comparison_example(tok: Tokenizer, record: Any, max_len: int, k_max: int, where: str,
                        index: int, events: list[str], dropped: list[str]) -> dict[str, np.ndarray]:
  messages, responses, ranks = _comparison_parts(record, where)
  prompt = _tokenise_prompt(tok, messages, where)
  resps, kept_ranks = [], []
  for text, r in zip(responses, ranks):
    ids = _response_ids(tok, text)
    if ids is None:
      dropped.append("empty_response")
    else:
      resps.append(ids)
      kept_ranks.append(r)
  if len(resps) > k_max:
    # A seeded random subset (not the best k_max): the reward model must still see bad responses.
    pick = np.sort(np.random.default_rng([index, len(resps)]).choice(len(resps), k_max, replace=False))
    dropped.extend(["over_k_max"] * (len(resps) - k_max))
    resps = [resps[i] for i in pick]
    kept_ranks = [kept_ranks[i] for i in pick]
    events.append("responses_subsampled")
  if len(resps) < 2:
    raise _Skip("fewer_than_2_responses")
  if len(set(kept_ranks)) == 1:
    raise _Skip("all_tied")
  room = max_len - _min_prompt_len(prompt, max_len, max(map(len, resps)))
  if room < 1:
    raise _Skip("prompt_too_long")
  for k, ids in enumerate(resps):
    if len(ids) > room:
      resps[k] = ids[:room]
      events.append("response_cut")
  prompt_ids, _ = _fit_prompt(tok, prompt, max_len - max(map(len, resps)), events)
  order = {r: i for i, r in enumerate(sorted(set(kept_ranks)))}  # dense ranks after any drop
  out = {"tokens": np.full((k_max, max_len), tok.pad_id, np.int32),
         "attention_mask": np.zeros((k_max, max_len), np.int32),
         "ranks": np.zeros(k_max, np.int32), "valid": np.zeros(k_max, bool),
         "reward_index": np.zeros(k_max, np.int32), "response_start": np.zeros(k_max, np.int32)}
  for k, ids in enumerate(resps):
    seq = prompt_ids + ids
    out["tokens"][k, :len(seq)] = seq
    out["attention_mask"][k, :len(seq)] = 1
    out["ranks"][k] = order[kept_ranks[k]]
    out["valid"][k] = True
    out["reward_index"][k] = len(seq) - 1  # the EOS (or the last kept token if the response was cut)
    out["response_start"][k] = len(prompt_ids)
  if "ref_logps" in record:
    out["ref_logps"] = _slot_floats(record["ref_logps"], k_max, where)
  return out


def _slot_floats(values: Any, k_max: int, where: str) -> np.ndarray:
  """A record's optional per-slot float field (e.g. DPO's reference log-probs) as float32 [k_max]."""
  arr = np.asarray(values, np.float32)
  if arr.shape != (k_max,):
    raise ValueError(f"pipeline.py: {where}: key 'ref_logps': expected {k_max} floats (one per slot of this "
                     f"encoding, k_max={k_max}), got shape {arr.shape}")
  return arr


def _prompt_example(tok: Tokenizer, messages: Sequence[Mapping[str, str]], max_prompt_len: int,
                    events: list[str], where: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
  prompt = _tokenise_prompt(tok, messages, where)
  if max_prompt_len < _min_prompt_len(prompt, max_prompt_len, 0):
    raise _Skip("prompt_too_long")
  ids, _ = _fit_prompt(tok, prompt, max_prompt_len, events)
  tokens = np.full(max_prompt_len, tok.pad_id, np.int32)
  mask = np.zeros(max_prompt_len, np.int32)
  tokens[max_prompt_len - len(ids):] = ids
  mask[max_prompt_len - len(ids):] = 1
  return tokens, mask


def _check_len(name: str, value: int, minimum: int = 2) -> int:
  if int(value) != value or value < minimum:
    raise ValueError(f"pipeline.py: {name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def encode_demonstration(tok: Tokenizer, record: Mapping[str, Any], max_len: int,
                         history_loss: bool = False) -> dict[str, np.ndarray]:
  """One demonstration -> right-padded next-token example; all int32 [max_len].

  tokens: prompt ids (ending with the generation prompt, `<|assistant|>` in the role format) +
  response ids + the end-of-turn token `tok.eos_id`, then pad_id.
  targets[t] = tokens[t + 1] (pad_id past the end). mask[t] = 1 iff targets[t] is a response
  token or its EOS (with history_loss, also earlier assistant turns kept in the prompt).
  attention_mask = 1 on real tokens. Accepts {"messages": [..., assistant]} or
  {"messages": [..., user], "response": str}. Raises ValueError for a malformed record or one
  that must be skipped (see `sft_batches` for the counted, skipping version).
  """
  max_len = _check_len("max_len", max_len, 4)
  try:
    return _demonstration_example(tok, record, max_len, record_lib.record_where(record, 0), history_loss, [])
  except _Skip as s:
    raise ValueError(f"pipeline.py: demonstration cannot be encoded in {max_len} tokens: {s.reason}") from None


def encode_prompt_left_padded(tok: Tokenizer, messages: Sequence[Mapping[str, str]],
                              max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """A prompt for generation: (tokens, attention_mask), int32 [max_prompt_len], LEFT padded.

  The real tokens end with the generation prompt (`<|assistant|>` in the role format); too-long
  prompts are truncated from the left as in the module docstring. Raises ValueError if even the
  shortest truncation does not fit.
  """
  max_prompt_len = _check_len("max_prompt_len", max_prompt_len, 2)
  try:
    tok.chat.validate(messages)
    if messages[-1]["role"] == "assistant":
      raise ValueError("a prompt must end with a user turn")
  except ValueError as e:
    raise ValueError(f"pipeline.py: encode_prompt_left_padded: {e}") from None
  try:
    return _prompt_example(tok, messages, max_prompt_len, [], "encode_prompt_left_padded")
  except _Skip as s:
    raise ValueError(f"pipeline.py: prompt cannot be encoded in {max_prompt_len} tokens: {s.reason}") from None


def encode_comparison(tok: Tokenizer, record: Mapping[str, Any], max_len: int, k_max: int,
                      index: int = 0) -> dict[str, np.ndarray]:
  """One K-way comparison -> K_max right-padded sequences sharing the (truncated) prompt.

  Returns tokens, attention_mask: int32 [k_max, max_len]; ranks (dense, 0 = best),
  reward_index (position of each sequence's last real token, its EOS), response_start (position
  of each response's first token, i.e. the prompt length): int32 [k_max]; valid: bool [k_max].
  Slots k >= K are invalid and zero. Empty responses are dropped; with K > k_max a random subset
  (seeded by `index`) is kept. A record with a "ref_logps" key (k_max floats, one per slot of
  this very encoding: same max_len, k_max and index) also gives ref_logps: float32 [k_max]
  (DPO's reference log-probs, `train/dpo.py`); give it to all records of a list or to none.
  Raises ValueError for a malformed record or one that must be skipped.
  """
  max_len = _check_len("max_len", max_len, 4)
  k_max = _check_len("k_max", k_max, 2)
  try:
    return _comparison_example(tok, record, max_len, k_max, record_lib.record_where(record, index), index, [], [])
  except _Skip as s:
    raise ValueError(f"pipeline.py: comparison cannot be encoded in {max_len} tokens: {s.reason}") from None


# ------------------------------------------------------------------------- scan and sharding


def _scan(name: str, records: Records, encode: Callable[[Any, int, list, list], Any]
          ) -> tuple[np.ndarray, PipelineStats]:
  """Encodes every record once: the kept indices (int64 [N_kept]) and the stats."""
  stats = PipelineStats(name)
  kept = []
  for i in range(len(records)):
    record = records[i]
    where = record_lib.record_where(record, i)
    events: list[str] = []
    dropped: list[str] = []
    stats.seen += 1
    try:
      encode(record, i, events, dropped)
    except _Skip as s:
      stats._note(stats.skipped, s.reason, where)
      continue
    for e in events:
      stats._note(stats.truncated, e, where)
    for d in dropped:
      stats._note(stats.dropped_responses, d, where)
    kept.append(i)
  stats.kept = len(kept)
  return np.asarray(kept, np.int64), stats


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"pipeline.py: shard_index {shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def _shard(kept: np.ndarray, stats: PipelineStats, shard_index: int | None, shard_count: int | None
           ) -> np.ndarray:
  """This host's kept indices: interleaved, equally many on every host."""
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  per_host = len(kept) // shard_count
  stats.unassigned = len(kept) - per_host * shard_count
  host = kept[shard_index::shard_count][:per_host]
  stats.host_records = len(host)
  return host


class _Encode:
  """Picklable grain map: record index -> example (the scan already proved it encodes)."""

  def __init__(self, records: Records, fn: Callable[[Any, int, list, list], Any]):
    self.records = records
    self.fn = fn

  def __call__(self, index):
    index = int(index)
    return self.fn(self.records[index], index, [], [])


def _train_iterator(records: Records, host: np.ndarray, fn, stats: PipelineStats,
                    global_batch_size: int, seed: int, num_epochs: int | None,
                    shard_count: int | None) -> grain.DatasetIterator:
  bsz = host_batch_size(global_batch_size, shard_count)
  if len(host) < bsz:
    raise ValueError(f"pipeline.py: {stats.name}: host shard has {len(host)} usable records, fewer than "
                     f"one batch of {bsz} ({stats.summary()})")
  ds = grain.MapDataset.source(host).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(_Encode(records, fn)).batch(bsz, drop_remainder=True)
  it = iter(ds.to_iter_dataset(READ_OPTIONS))
  it.stats = stats
  stats.log()
  return it


def _eval_list(records: Records, kept: np.ndarray, fn, stats: PipelineStats, batch_size: int,
               shard_index: int | None, shard_count: int | None,
               pad: Callable[[dict], dict]) -> BatchList:
  """Unshuffled batches of this host's share of `kept` (interleaved, leftovers included).

  Every host gets the same number of batches (hosts run eval steps in lockstep): the tail is
  filled with `pad(example)` copies that carry no weight, so each record counts exactly once
  over all hosts and shapes stay fixed.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"pipeline.py: batch_size must be an integer >= 1, got {batch_size!r}")
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  host = kept[shard_index::shard_count]
  stats.host_records = len(host)
  out = BatchList()
  out.stats = stats
  stats.log()
  if len(kept) == 0:
    return out
  encode = _Encode(records, fn)
  examples = [encode(i) for i in host]
  per_host = -(-len(kept) // shard_count)
  filler = pad(examples[0] if examples else encode(kept[0]))
  out.extend(batching.pad_to_batches(examples, batch_size, num_rows=per_host, filler=filler).batches)
  return out


# ------------------------------------------------------------------------------ public: SFT


@dataclasses.dataclass(frozen=True)
class _SftFn:
  tok: Tokenizer
  max_len: int
  history_loss: bool

  def __call__(self, record, index, events, dropped):
    return _demonstration_example(self.tok, record, self.max_len, record_lib.record_where(record, index),
                                  self.history_loss, events)


def sft_batches(records: Records, tok: Tokenizer, global_batch_size: int, max_len: int, seed: int,
                num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, history_loss: bool = False) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch) SFT batches for this host; num_epochs=None repeats forever.

  Yields {"tokens","targets","mask","attention_mask"}: int32 [B_host, max_len] (see
  `encode_demonstration`). The returned iterator has `.stats` (PipelineStats).
  """
  max_len = _check_len("max_len", max_len, 4)
  fn = _SftFn(tok, max_len, history_loss)
  kept, stats = _scan("sft", records, fn)
  host = _shard(kept, stats, shard_index, shard_count)
  return _train_iterator(records, host, fn, stats, global_batch_size, seed, num_epochs, shard_count)


def sft_eval_batches(records: Records, tok: Tokenizer, batch_size: int, max_len: int,
                     shard_index: int | None = None, shard_count: int | None = None,
                     history_loss: bool = False) -> BatchList:
  """Unshuffled SFT batches, int32 [batch_size, max_len] like `sft_batches`; batch_size is per host.

  Hosts take kept records interleaved (leftovers included) and all get the same number of
  batches; the tail is filled with copies whose `mask` is all zero, so over all hosts every
  kept record is evaluated exactly once. `.stats` holds the counts.
  """
  max_len = _check_len("max_len", max_len, 4)
  fn = _SftFn(tok, max_len, history_loss)
  kept, stats = _scan("sft_eval", records, fn)
  return _eval_list(records, kept, fn, stats, batch_size, shard_index, shard_count,
                    lambda e: dict(e, mask=np.zeros_like(e["mask"])))


# -------------------------------------------------------------------- public: reward model


def _with_extra(example: dict, extra: Callable[[Any], dict] | None, record: Any) -> dict:
  """example plus extra(record)'s arrays (e.g. `image_world.record_image`: the prompt's image)."""
  return example if extra is None else {**example, **extra(record)}


@dataclasses.dataclass(frozen=True)
class _ComparisonFn:
  tok: Tokenizer
  max_len: int
  k_max: int
  extra: Callable[[Any], dict] | None = None

  def __call__(self, record, index, events, dropped):
    ex = _comparison_example(self.tok, record, self.max_len, self.k_max, record_lib.record_where(record, index),
                             index, events, dropped)
    return _with_extra(ex, self.extra, record)


def comparison_batches(records: Records, tok: Tokenizer, global_batch_size: int, max_len: int,
                       k_max: int, seed: int, num_epochs: int | None = None,
                       shard_index: int | None = None, shard_count: int | None = None,
                       extra: Callable[[Any], dict] | None = None) -> grain.DatasetIterator:
  """Shuffled batches of whole K-way comparisons: every pair of a prompt is in one batch element.

  Yields tokens, attention_mask: int32 [B_host, k_max, max_len]; ranks, reward_index,
  response_start: int32 [B_host, k_max]; valid: bool [B_host, k_max]; ref_logps: float32
  [B_host, k_max] when the records carry it (see `encode_comparison`). `.stats` on the iterator.
  extra: optional picklable record -> {name: array} added to every example (e.g.
  `image_world.record_image`: "images" float32 [B_host,H,W,C]).
  """
  max_len, k_max = _check_len("max_len", max_len, 4), _check_len("k_max", k_max, 2)
  fn = _ComparisonFn(tok, max_len, k_max, extra)
  kept, stats = _scan("comparisons", records, fn)
  host = _shard(kept, stats, shard_index, shard_count)
  return _train_iterator(records, host, fn, stats, global_batch_size, seed, num_epochs, shard_count)


def comparison_eval_batches(records: Records, tok: Tokenizer, batch_size: int, max_len: int,
                            k_max: int, shard_index: int | None = None,
                            shard_count: int | None = None, extra: Callable[[Any], dict] | None = None
                            ) -> BatchList:
  """Unshuffled comparison batches shaped like `comparison_batches` (batch_size per host); hosts
  and the tail as in `sft_eval_batches`, filler copies having `valid` all False."""
  max_len, k_max = _check_len("max_len", max_len, 4), _check_len("k_max", k_max, 2)
  fn = _ComparisonFn(tok, max_len, k_max, extra)
  kept, stats = _scan("comparisons_eval", records, fn)
  return _eval_list(records, kept, fn, stats, batch_size, shard_index, shard_count,
                    lambda e: dict(e, valid=np.zeros_like(e["valid"])))


# ------------------------------------------------------------------------ public: PPO prompts


@dataclasses.dataclass(frozen=True)
class _PromptFn:
  tok: Tokenizer
  max_prompt_len: int
  extra: Callable[[Any], dict] | None = None

  def __call__(self, record, index, events, dropped):
    where = record_lib.record_where(record, index)
    messages = _prompt_messages(record, where)
    tokens, mask = _prompt_example(self.tok, messages, self.max_prompt_len, events, where)
    return _with_extra({"tokens": tokens, "attention_mask": mask, "index": np.int32(index)}, self.extra, record)


def prompt_batches(records: Records, tok: Tokenizer, global_batch_size: int, max_prompt_len: int,
                   seed: int, num_epochs: int | None = None, shard_index: int | None = None,
                   shard_count: int | None = None, extra: Callable[[Any], dict] | None = None
                   ) -> grain.DatasetIterator:
  """Shuffled batches of left-padded prompts for rollouts.

  Yields tokens, attention_mask: int32 [B_host, max_prompt_len] (real tokens end with the
  generation prompt, `<|assistant|>` in the role format); index: int32 [B_host], the record's
  position in `records` (to recover its task for scoring); plus extra(record)'s arrays (see
  `comparison_batches`). `.stats` on the iterator.
  """
  max_prompt_len = _check_len("max_prompt_len", max_prompt_len, 2)
  fn = _PromptFn(tok, max_prompt_len, extra)
  kept, stats = _scan("prompts", records, fn)
  host = _shard(kept, stats, shard_index, shard_count)
  return _train_iterator(records, host, fn, stats, global_batch_size, seed, num_epochs, shard_count)


def prompt_eval_batches(records: Records, tok: Tokenizer, batch_size: int, max_prompt_len: int,
                        shard_index: int | None = None, shard_count: int | None = None) -> BatchList:
  """Unshuffled prompt batches shaped like `prompt_batches` (batch_size per host), e.g. for eval
  rollouts; hosts and the tail as in `sft_eval_batches`, filler copies having `index` -1."""
  max_prompt_len = _check_len("max_prompt_len", max_prompt_len, 2)
  fn = _PromptFn(tok, max_prompt_len)
  kept, stats = _scan("prompts_eval", records, fn)
  return _eval_list(records, kept, fn, stats, batch_size, shard_index, shard_count,
                    lambda e: dict(e, index=np.int32(-1)))


# ---------------------------------------------------------------------------- packed LM rows


def host_batch_size(global_batch_size: int, shard_count: int | None = None) -> int:
  shard_count = jax.process_count() if shard_count is None else shard_count
  if global_batch_size % shard_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of hosts "
                     f"{shard_count}")
  return global_batch_size // shard_count


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
  """Packs token documents into full rows for next-token prediction.

  Documents are joined into one stream, each followed by `eos_id`, and cut into
  rows of seq_len + 1 tokens (row[:-1] are inputs, row[1:] targets); the
  incomplete tail is dropped. Returns int32 [N, seq_len + 1].
  """
  stream = np.fromiter((t for d in docs for t in (*d, eos_id)), dtype=np.int32)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"corpus of {len(stream)} tokens is too short for one row of {seq_len + 1}")
  # Rows overlap by one token so every token in the stream is a target exactly once.
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def _lm_example(row):
  return {"tokens": row[:-1], "targets": row[1:], "mask": np.ones(row.shape[0] - 1, np.int32)}


def lm_batches(rows: np.ndarray, global_batch_size: int, seed: int, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch) batches of packed LM rows for this host.

  rows: int32 [N, T+1] from `pack_documents`. Yields dicts of int32 arrays
  {"tokens","targets","mask": [B_host, T]}. num_epochs=None repeats forever.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  bsz = host_batch_size(global_batch_size, shard_count)
  ds = grain.MapDataset.source(rows)[shard_index::shard_count]
  if len(ds) < bsz:
    raise ValueError(f"host shard has {len(ds)} rows, fewer than one batch of {bsz}")
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(_lm_example).batch(bsz, drop_remainder=True)
  return iter(ds.to_iter_dataset(READ_OPTIONS))


def lm_eval_batches(rows: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Deterministic, unshuffled held-out batches (incomplete tail dropped)."""
  n = (len(rows) // batch_size) * batch_size
  return [_lm_example_batch(rows[i:i + batch_size]) for i in range(0, n, batch_size)]


def _lm_example_batch(rows):
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones_like(rows[:, 1:])}


# --------------------------------------------------------------------------- combined iterators


class ZipBatches:
  """Merges several batch iterators into one dict batch, renaming keys with a prefix.

  `ZipBatches(prompt=(it1, {"tokens": "prompt_tokens"}), ptx=(it2, {...}))` yields
  {new_name: array} from each iterator's batch (keys not in a mapping are dropped), and
  `get_state()/set_state()` cover every member, so a PPO-ptx run resumes both streams exactly.
  """

  def __init__(self, **members):
    self.members = members

  def __iter__(self):
    return self

  def __next__(self):
    out = {}
    for it, names in self.members.values():
      batch = next(it)
      out.update({new: batch[old] for old, new in names.items()})
    return out

  def get_state(self):
    return {name: it.get_state() for name, (it, _) in self.members.items()}

  def set_state(self, state):
    for name, (it, _) in self.members.items():
      it.set_state(state[name])
