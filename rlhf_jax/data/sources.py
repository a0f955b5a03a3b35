"""One data loader for every generic stage: user files, TFDS builders and the synthetic world.

  train, held_out, report = sources.load("demos.jsonl", "demonstrations", cache_dir="runs/sft/data")

``kind`` is the record kind the stage needs (schemas in :mod:`rlhf_jax.data.records`):
``demonstrations``, ``comparisons``, ``prompts`` or ``text``. ``spec`` (and ``eval_spec``) is one of

- a JSON Lines path (``.jsonl`` / ``.json`` / ``.ndjson``, optionally ``.gz``): every line of one
  shape (:func:`records.detect_shape`: TRL's standard and conversational dataset types, our K-way
  rankings, prompt/response, Self-Instruct, Alpaca), converted to ``kind`` by
  :func:`records.parse_line`. The shape is reported; a line of another shape is an error.
- a plain-text path (``.txt`` / ``.text``, optionally ``.gz``): ``text`` records, one per
  paragraph (``options={"unit": "line" | "file"}`` to change).
- a builder name, ``hh_rlhf/<subset>``, ``oasst_rankings/rankings`` (or ``/sft``),
  ``synthetic_instruct/<config>``, optionally ``:<split>`` (``hh_rlhf/helpful-base:test``): built
  once with the TFDS builders of :mod:`rlhf_jax.data.builders` and converted to ``kind``
  (:func:`records.convert_record`). Raw files come from ``manual_dir``, by default
  ``../shared/data/<folder>`` beside the repo. ``options`` are builder config overrides.
- ``synthetic``: the built-in world (:mod:`rlhf_jax.data.synthetic`): demonstrations, prompts or
  text; ``options``: ``n``, ``eval_n``, ``filler_rate``. Its comparisons are not data but the RM
  stage's gold labelling of SFT samples, so asking for them is an error.

Held-out records: from ``eval_spec`` when given (all its records; a builder's validation/test
split if it has one); else a builder's (or the synthetic world's) own validation / test / eval
split when it has one besides the train split; else a hash of each record's prompt
(:func:`records.assign_split`, salted by ``seed``), so train and held-out never share a prompt
and the same prompt falls on the same side for every kind and stage given the same ``seed``.

TFDS builds go under ``cache_dir`` if given, else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``; never the current directory.

The report (JSON-able): ``spec``, ``kind``, ``source``, ``type`` (jsonl | text | builder |
synthetic), ``shape``, ``seen``, ``kept``, ``skipped`` ({reason: n}), ``first_skip`` ({reason:
location}), ``split`` ({``method``: eval_spec | builder | synthetic | hash, ``eval_fraction``,
``salt``, ``train``, ``eval``, ``shared_prompts``, ``limit``, ``limited``}) and ``eval_source``
(the same counts for a separately read held-out source, else None); builders add ``builder``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.data import records

log = logging.getLogger("rlhf_jax.data.sources")

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
# Builder -> its folder in ../shared/data (the default manual_dir).
SHARED_FOLDERS = {"hh_rlhf": "hh_rlhf", "oasst_rankings": "oasst1_en_validation"}
FILE_BUILDERS = ("jsonl_demonstrations", "jsonl_comparisons", "jsonl_prompts", "text_corpus")
EVAL_SPLITS = ("validation", "test", "eval")
SYNTHETIC_SIZES = {"demonstrations": (2000, 256), "prompts": (2000, 256), "text": (20000, 0)}
SPEC_FORMS = ("a .jsonl/.json/.ndjson path (optionally .gz), a .txt path, a builder name "
              "(hh_rlhf/<subset>, oasst_rankings/rankings, oasst_rankings/sft, "
              "synthetic_instruct/<config>, optionally ':<split>'), or 'synthetic'")
Records = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed source spec: ``type`` is jsonl | text | builder | synthetic."""

  type: str
  target: str  # absolute file path, builder name, or "synthetic"
  split: str | None = None  # a builder split named in the spec


@dataclasses.dataclass
class _Read:
  """Records of one source: ``held_out`` is the source's own held-out split (or None)."""

  records: Records
  held_out: Records | None
  report: dict[str, Any]


# ---------------------------------------------------------------------------------- the API


def load(spec: str, kind: str, *, split: str = "train", eval_spec: str = "",
         eval_fraction: float = 0.05, seed: int = 0, cache_dir: str | os.PathLike | None = None,
         limit: int = 0, manual_dir: str | os.PathLike | None = None,
         options: Mapping[str, Any] | None = None) -> tuple[Records, Records, dict[str, Any]]:
  """``(train_records, eval_records, report)`` of ``kind`` from ``spec`` (see module docstring).

  split: the builder split to train on (a ``:<split>`` in the spec wins; "" means "train");
  other sources have only ``"train"``. eval_fraction: the hash-split share (0 = no held-out
  records). seed: the hash salt and the synthetic world's seed. limit > 0: at most that many
  records per side (source order). manual_dir: raw files of a builder. options: builder config
  overrides, text ``unit``, or synthetic sizes. Raises ``ValueError`` (naming the file and line
  for bad data).
  """
  kind = records.normalise_kind(kind)
  split = split or "train"
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise ValueError(f"sources.py: limit must be a non-negative integer, got {limit!r}")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"sources.py: eval_fraction must be in [0, 1), got {eval_fraction}")
  ctx = dict(kind=kind, seed=seed, cache_dir=cache_dir, manual_dir=manual_dir,
             options=dict(options or {}), limit=limit)
  main = _read(parse_spec(spec), split=split, role="train", **ctx)
  own_report = main.report.pop("held_out", None)
  salt = str(seed)
  split_info: dict[str, Any] = {"eval_fraction": None, "salt": None}
  if eval_spec:
    held = _read(parse_spec(eval_spec), split="", role="eval", **ctx)
    train, held_out, eval_report = main.records, held.records, held.report
    split_info["method"] = "eval_spec"
  elif main.held_out is not None:
    train, held_out, eval_report = main.records, main.held_out, own_report
    split_info["method"] = main.report["type"] if main.report["type"] == "synthetic" else "builder"
  else:
    (train, held_out), eval_report = hash_split(main.records, eval_fraction, salt), None
    split_info.update(method="hash", eval_fraction=eval_fraction, salt=salt)
  train, held_out, limited = _apply_limit(train, held_out, limit)
  if not train:
    raise ValueError(f"sources.py: {spec}: no {kind} records left for training "
                     f"({len(main.records)} kept, {len(held_out)} held out)")
  split_info.update(train=len(train), eval=len(held_out), shared_prompts=shared_prompts(
      train, held_out), limit=limit, limited=limited)
  report = {"spec": str(spec), "kind": kind, **main.report, "split": split_info,
            "eval_source": eval_report}
  _log(report)
  return train, held_out, report


def parse_spec(spec: str | os.PathLike) -> Spec:
  """What ``spec`` names: an existing file, a builder (``name[/config][:split]``) or synthetic."""
  text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
  if not text:
    raise ValueError(f"sources.py: empty data spec {spec!r}; give {SPEC_FORMS}")
  path = Path(text).expanduser()
  if path.is_file():
    return Spec(_file_type(path), str(path.resolve()))
  if path.is_dir():
    raise ValueError(f"sources.py: {path.resolve()} is a directory; give a file in it, or a "
                     f"builder name with manual_dir={text!r}")
  if text == "synthetic":
    return Spec("synthetic", "synthetic")
  from rlhf_jax.data import builders  # TFDS loads only when a builder is asked for
  name, _, split = text.partition(":")
  if name.partition("/")[0] in builders.BUILDERS:
    return Spec("builder", name, split or None)
  if _looks_like_path(text):
    raise ValueError(f"sources.py: data file not found: {path.resolve()} (nor is {text!r} a "
                     f"builder name); give {SPEC_FORMS}")
  raise ValueError(f"sources.py: unknown data spec {text!r}; give {SPEC_FORMS}")


def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """Where TFDS builds go: ``cache_dir``, else ``$TFDS_DATA_DIR``, else
  ``~/tensorflow_datasets`` (never the current directory)."""
  for candidate in (cache_dir, os.environ.get("TFDS_DATA_DIR")):
    if candidate is not None and os.fspath(candidate).strip():
      return Path(candidate).expanduser().resolve()
  return Path.home() / "tensorflow_datasets"


def hash_split(recs: Sequence[dict], eval_fraction: float, salt: str) -> tuple[Records, Records]:
  """``(train, held_out)`` by a hash of each record's prompt (:func:`records.record_key`)."""
  train, held = [], []
  for rec in recs:
    side = records.assign_split(records.record_key(rec), eval_fraction, salt)
    (held if side == "validation" else train).append(rec)
  return train, held


def shared_prompts(train: Sequence[dict], held_out: Sequence[dict]) -> int:
  """How many held-out records have a prompt (or text) that also occurs in ``train``."""
  keys = {records.record_key(r) for r in train}
  return sum(records.record_key(r) in keys for r in held_out)


# ---------------------------------------------------------------------------------- reading


def _read(spec: Spec, *, split: str, role: str, kind: str, **ctx) -> _Read:
  if spec.type == "builder":
    return _read_builder(spec, kind, split=split, role=role, **ctx)
  if split not in ("", "train"):
    raise ValueError(f"sources.py: split={split!r} applies to builder sources only; "
                     f"{spec.target} has no splits")
  if spec.type == "synthetic":
    return _read_synthetic(kind, role=role, **ctx)
  opts = ctx["options"]
  if spec.type == "text":
    return _read_text_file(Path(spec.target), kind, unit=opts.get("unit", "paragraph"))
  if opts:
    raise ValueError(f"sources.py: options {sorted(opts)} do not apply to a JSONL file "
                     f"({spec.target})")
  return _read_jsonl(Path(spec.target), kind)


def _file_type(path: Path) -> str:
  name = path.name.lower().removesuffix(".gz")
  if name.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(TEXT_SUFFIXES):
    return "text"
  raise ValueError(f"sources.py: {path}: unknown file type; expected JSON Lines "
                   f"({', '.join(JSONL_SUFFIXES)}) or plain text ({', '.join(TEXT_SUFFIXES)}), "
                   "optionally .gz")


def _looks_like_path(text: str) -> bool:
  name = text.lower().removesuffix(".gz")
  return (os.sep in text or text.startswith(("~", ".")) or
          name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES))


def _counts(tally: records.Tally, kept: int) -> dict[str, Any]:
  return {"seen": tally.seen, "kept": kept, "skipped": dict(sorted(tally.skipped.items())),
          "first_skip": dict(sorted(tally.first_skip.items()))}


def _read_jsonl(path: Path, kind: str) -> _Read:
  """Every line of ``path`` as ``kind`` records; the file must hold one shape."""
  tally, out, shape, first = records.Tally(), [], None, None
  for where, obj in records.read_jsonl(path):
    tally.seen += 1
    line_shape = records.detect_shape(obj, where)
    if shape is None:
      shape, first = line_shape, where
    elif line_shape != shape:
      raise ValueError(f"{where}: a '{line_shape}' line in a file of '{shape}' lines (the first "
                       f"at {first}); a file holds one shape")
    try:
      recs = records.parse_line(obj, where, kind, shape=shape)
    except records.Skip as s:
      tally.skip(s.reason, where)
      continue
    rid = f"{path.name}:{where.rsplit(':', 1)[1]}"
    out.extend({"id": rid if len(recs) == 1 else f"{rid}#{i}", **r} for i, r in enumerate(recs))
  if shape is None:
    raise ValueError(f"sources.py: {path}: no records (the file has no non-blank line)")
  report = {"source": str(path), "type": "jsonl", "shape": shape, **_counts(tally, len(out))}
  return _Read(out, None, report)


def _read_text_file(path: Path, kind: str, unit: str) -> _Read:
  """A plain-text file as ``text`` records, one per ``unit``."""
  if kind != "text":
    raise ValueError(f"sources.py: {path}: a plain-text file gives text records only, not {kind}; "
                     "give a JSONL file (see records.SHAPES) for that")
  units = records.text_units(records.read_text(path), unit)
  out = [{"id": f"{path.name}:{line}", "text": t} for line, t in units]
  tally = records.Tally(seen=len(units))
  report = {"source": str(path), "type": "text", "shape": f"plain_text ({unit})",
            **_counts(tally, len(out))}
  return _Read(out, None, report)


def _read_synthetic(kind: str, *, role: str, seed: int, options: Mapping[str, Any], limit: int,
                    **_) -> _Read:
  """The built-in world's demonstrations / prompts (own train and eval splits) or text."""
  from rlhf_jax.data import synthetic
  if kind == "comparisons":
    raise ValueError("sources.py: 'synthetic' has no comparisons to read: in the built-in world "
                     "they are made by the RM stage, which samples the SFT policy and ranks the "
                     "samples with the gold labeler (rlhf_jax.data.comparisons.label_comparisons). "
                     "To train on fixed comparisons give a JSONL file or a builder instead")
  unknown = sorted(set(options) - {"n", "eval_n", "filler_rate"})
  if unknown:
    raise ValueError(f"sources.py: unknown synthetic options {unknown}; known: n, eval_n, "
                     "filler_rate")
  n, eval_n = (int(options.get(k, d)) for k, d in zip(("n", "eval_n"), SYNTHETIC_SIZES[kind]))
  if limit:
    n, eval_n = min(n, limit), min(eval_n, limit)
  if kind == "text":
    docs = synthetic.pretraining_corpus(n, seed=seed)
    out = [{"id": f"synthetic/text:{i}", "text": d} for i, d in enumerate(docs)]
    return _Read(out, None, _synthetic_report(kind, len(out)))
  splits = {"train": n, "eval": eval_n} if role == "train" else {"eval": eval_n}
  got = {s: _synthetic_records(kind, size, seed, s, options) for s, size in splits.items()}
  if role == "eval":
    return _Read(got["eval"], None, _synthetic_report(kind, len(got["eval"])))
  report = _synthetic_report(kind, len(got["train"]))
  report["held_out"] = _synthetic_report(kind, len(got["eval"]))
  return _Read(got["train"], got["eval"], report)


def _synthetic_records(kind: str, n: int, seed: int, split: str, options: Mapping) -> Records:
  """Normalised synthetic records; ``task`` and ``family`` are kept for the gold labeler."""
  from rlhf_jax.data import synthetic
  if kind == "demonstrations":
    raw = synthetic.demonstrations(n, seed, split=split,
                                   filler_rate=float(options.get("filler_rate", 0.0)))
  else:
    raw = synthetic.prompts(n, seed, split=split)
  out = []
  for i, r in enumerate(raw):
    messages = list(r["messages"])
    if kind == "demonstrations":
      messages.append({"role": "assistant", "content": r["response"]})
    out.append({"id": f"synthetic/{split}:{i}", "messages": messages, "family": r["family"],
                "task": r["task"]})
  return out


def _synthetic_report(kind: str, n: int) -> dict[str, Any]:
  return {"source": "synthetic", "type": "synthetic", "shape": f"synthetic_{kind}",
          **_counts(records.Tally(seen=n), n)}


# --------------------------------------------------------------------------------- builders


def resolve_manual_dir(base: str, manual_dir: str | os.PathLike | None) -> Path | None:
  """The raw-file folder of builder ``base``: ``manual_dir``, else ``../shared/data/<folder>``
  beside the repo; None for builders that need none. Missing folders are a clear error."""
  from rlhf_jax.data import builders
  if manual_dir is not None and os.fspath(manual_dir).strip():
    path = Path(manual_dir).expanduser().resolve()
    if not path.is_dir():
      raise ValueError(f"sources.py: manual_dir {path} for {base} is not a directory")
    return path
  folder = SHARED_FOLDERS.get(base)
  if folder is None:
    return None
  path = SHARED_DATA / folder
  if not path.is_dir():
    raise ValueError(f"sources.py: {base} needs its raw files, looked for in {path} (the shared "
                     f"data beside the repo) and not found. "
                     f"{builders.BUILDERS[base].MANUAL_DOWNLOAD_INSTRUCTIONS} Put them in {path}, "
                     "or pass manual_dir=<the folder holding them>")
  return path


def _check_builder_name(base: str) -> None:
  if base in FILE_BUILDERS:
    raise ValueError(f"sources.py: {base} reads user files: give the file path itself as the spec")
  if base == "gpt1_tasks":
    raise ValueError("sources.py: gpt1_tasks holds GPT-1 task data, not RLHF records; it is read "
                     "by experiments/gpt1_finetune.py")


def _pick_split(name: str, available: Sequence[str], wanted: str, role: str) -> str:
  """The split to read: ``wanted`` for training; for a held-out source its eval split."""
  if role == "eval" and not wanted:
    wanted = next((s for s in EVAL_SPLITS if s in available), "train")
  if wanted not in available:
    hint = (f"; name one, e.g. '{name}:{available[0]}' (held-out records are then hash-split "
            "from it)") if available else ""
    raise ValueError(f"sources.py: {name}: no split {wanted!r}; available: {list(available)}{hint}")
  return wanted


def _builder_records(src, native: str, kind: str, tally: records.Tally) -> Records:
  """A builder split's records converted to ``kind``; conversion skips go to ``tally``."""
  out = []
  for rec in src:
    try:
      out.append(records.convert_record(rec, native, kind))
    except records.Skip as s:
      tally.skip(s.reason, rec.get("id", "?"))
  return out


def _split_report(name: str, split: str, stats: Mapping, extra: records.Tally, kept: int
                  ) -> dict[str, Any]:
  """Build stats of ``split`` merged with the conversion skips."""
  group = stats.get(split, {})
  skipped = dict(group.get("skipped", {}))
  first = dict(group.get("first_skip", {}))
  for reason, n in extra.skipped.items():
    skipped[reason] = skipped.get(reason, 0) + n
    first.setdefault(reason, extra.first_skip[reason])
  return {"source": f"{name}:{split}", "type": "builder", "seen": group.get("seen", kept),
          "kept": kept, "skipped": dict(sorted(skipped.items())),
          "first_skip": dict(sorted(first.items()))}


def _read_builder(spec: Spec, kind: str, *, split: str, role: str, cache_dir, manual_dir,
                  options: Mapping[str, Any], **_) -> _Read:
  """A builder's train split (and its own held-out split, if any) as ``kind`` records."""
  from rlhf_jax.data import builders
  name = spec.target
  base = name.partition("/")[0]
  _check_builder_name(base)
  manual = resolve_manual_dir(base, manual_dir)
  root = data_dir(cache_dir)
  builder = builders.prepare(builders.get_builder(name, root, manual, **options), manual)
  native = builder.kind
  available = sorted(builder.info.splits)
  first = _pick_split(name, available, spec.split or split, role)
  held_split = next((s for s in EVAL_SPLITS if s in available and s != first), None)
  wanted = [first] + ([held_split] if role == "train" and held_split else [])
  got, reports = [], []
  for s in wanted:
    tally = records.Tally()
    src = builders.open_split(builder, s)
    recs = _builder_records(src, native, kind, tally)
    got.append(recs)
    reports.append({**_split_report(name, s, src.stats, tally, len(recs)),
                    "shape": f"{base}_{records.normalise_kind(native)}"})
  info = {"name": name, "split": first, "held_out_split": wanted[1] if len(wanted) > 1 else None,
          "data_dir": str(root), "manual_dir": None if manual is None else str(manual)}
  report = {**reports[0], "builder": info}
  if len(wanted) > 1:
    report["held_out"] = reports[1]
  return _Read(got[0], got[1] if len(got) > 1 else None, report)


# ------------------------------------------------------------------------------------ misc


def _apply_limit(train: Records, held_out: Records, limit: int
                 ) -> tuple[Records, Records, dict[str, int]]:
  if not limit:
    return train, held_out, {"train": 0, "eval": 0}
  limited = {"train": max(0, len(train) - limit), "eval": max(0, len(held_out) - limit)}
  return train[:limit], held_out[:limit], limited


def _log(report: Mapping[str, Any]) -> None:
  split = report["split"]
  quiet = not report["skipped"] and (split["eval"] or not split["eval_fraction"])
  level = logging.INFO if quiet else logging.WARNING
  log.log(level, "%s as %s: shape %s, %d seen, %d kept, skipped %s (first at %s); split %s: "
          "%d train / %d eval", report["source"], report["kind"], report["shape"], report["seen"],
          report["kept"], report["skipped"] or "none", report["first_skip"] or "-",
          split["method"], split["train"], split["eval"])
