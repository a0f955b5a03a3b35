"""Renders the JSON files in benchmarks/results/ as Markdown tables (for RESULTS.md).

  python -m benchmarks.report [--results benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR, fmt


def table(rows, columns) -> str:
  out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(out)


def header(d: dict) -> str:
  m, a = d["machine"], d["args"]
  return (f"{m['date']} on {m['cpu']} ({m['cpu_count']} cores, {m['platform']}), jax {m['jax']}, "
          f"threads={a.get('threads') or 'all'}, load average {m['loadavg_1m_at_start']:.1f} -> "
          f"{d.get('loadavg_1m_at_end', float('nan')):.1f}")


def verdict(v) -> str:
  if not v:
    return "no comparison"
  return (f"speed-up {v['speedup']:.2f}x wall / {v['speedup_cpu_time']:.2f}x CPU time; target {v['target']}x: "
          f"**{'met' if v['met'] else 'not met'}**")


def render(path: Path) -> str:
  d = json.loads(path.read_text())
  name = path.stem
  parts = [f"#### `{name}.json`", header(d), ""]
  if "rows" in d:
    cols = [c for c in d["rows"][0] if c not in ("first_result",)]
    parts += [table(d["rows"], cols), "", verdict(d.get("verdict"))]
    if "greedy_token_agreement" in d:
      parts.append(f"greedy decoding token agreement with transformers: {d['greedy_token_agreement']:.4f}")
  for key in ("seq_sweep", "model_sweep", "device_sweep", "dot", "stream"):
    if key in d:
      parts += ["", f"{key}:", "", table(d[key], list(d[key][0]))]
  return "\n".join(parts) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--results", default=str(RESULTS_DIR))
  args = p.parse_args(argv)
  for path in sorted(Path(args.results).glob("*.json")):
    print(render(path))


if __name__ == "__main__":
  main()
