"""Small helpers the data tests share: the real data beside the repo, and JSONL files in tmp dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(rel: str) -> Path:
  """`../shared/data/<rel>`, or skip the test with a clear message when it is absent."""
  path = DATA / rel
  if not path.exists():
    pytest.skip(f"shared data {path} is absent (expected ../shared/data beside the repo)")
  return path


def write_jsonl(path: Path, rows: list) -> Path:
  """Writes objects as JSON lines (strings are written verbatim, for malformed-line tests)."""
  path = Path(path)
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
  return path
