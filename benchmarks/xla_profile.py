"""Where a jitted step's time goes on XLA:CPU: each HLO op's time from a `jax.profiler` trace, joined with the
optimised HLO to say what the op is (a dot, a reduce, elementwise, a copy) and which jax op it came from.

  python -m benchmarks.xla_profile --what sft --threads 1 [--preset mini --rows 8 --seq 128]
  python -m benchmarks.xla_profile --what generate --threads 1 [--rows 8 --gen_prompt_len 32 --gen_new_tokens 64]
  python -m benchmarks.xla_profile --what ppo --threads 1 [--batch 16 --prompt_len 16 --new_tokens 24]

The step runs `repeats` times under the profiler with `--xla_cpu_enable_xprof_traceme=true`, which makes XLA:CPU
record one trace event per executed thunk (an HLO op of the entry computation, or of a while loop's body); events are
summed by op name and divided by `repeats`. Loop and call ops are left out of the sums (their bodies' ops are
counted). Categories: `dot` (a dot or convolution, alone or fused: YNNPACK fusions, Eigen dots), `reduce` (a fusion
holding a reduce and no dot), `copy` (copies, transposes, pads, slices, concatenates, dynamic updates),
`elementwise` (every other fusion), `other`. The tables print ms per step; JSON goes to results/xla_profile.json.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from benchmarks import common

_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if __name__ == "__main__":   # before jax/torch are imported (importing this module for parse_hlo changes nothing)
  if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
  common.configure_process()

_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
_COPY_OPS = {"copy", "transpose", "pad", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice",
             "broadcast", "reshape", "bitcast", "copy-start", "copy-done", "gather", "scatter"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")


def _opcode(rhs: str) -> str:
  """The opcode of an instruction's right-hand side `TYPE opcode(operands), attrs` (TYPE may be a tuple)."""
  i, depth = 0, 0
  if rhs.startswith("("):
    for i, ch in enumerate(rhs):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
  m = re.match(r"\s*[^\s(]*\s+([\w\-]+)\(", rhs[i + 1:] if rhs.startswith("(") else rhs)
  return m.group(1) if m else "?"


def parse_hlo(text: str) -> dict[str, dict]:
  """{instruction name: {opcode, computation, calls, op_name}} for every instruction of an HLO module's text,
  {computation name: [(opcode, instruction name)]} under the key `__computations__`, the entry computation's name
  under `__entry__`."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m and current is not None:
      name, rhs = m.groups()
      op = _opcode(rhs)
      calls = re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", rhs)
      meta = re.search(r'op_name="([^"]*)"', rhs)
      instrs[name] = {"opcode": op, "computation": current, "calls": calls, "op_name": meta.group(1) if meta else ""}
      comps[current].append((op, name))
      continue
    c = _COMP.match(line)
    if c and "=" not in line.split("{")[0]:
      current = c.group(1)
      if line.lstrip().startswith("ENTRY"):
        instrs["__entry__"] = current
  instrs["__computations__"] = dict(comps)
  return instrs


def category(name: str, hlo: dict) -> str:
  """dot / reduce / copy / elementwise / other for the op `name` of `parse_hlo`'s result (see the module docstring)."""
  ins = hlo.get(name)
  if ins is None:
    return "other"
  if ins["opcode"] in ("dot", "convolution"):
    return "dot"
  if ins["opcode"] in _COPY_OPS:
    return "copy"
  if ins["opcode"] in ("fusion", "custom-call"):
    ops = [op for comp in ins["calls"] for op, _ in hlo["__computations__"].get(comp, [])]
    if {"dot", "convolution"} & set(ops):
      return "dot"
    if "reduce" in ops or "reduce-window" in ops:
      return "reduce"
    if ops and set(ops) <= _COPY_OPS | {"parameter", "constant", "tuple", "get-tuple-element"}:
      return "copy"
    return "elementwise"
  return "other"


def source_of(name: str, hlo: dict) -> str:
  """The jax op an HLO op came from: its own op_name metadata, else that of its fused computation's root."""
  ins = hlo.get(name, {})
  op_name = ins.get("op_name", "")
  if not op_name:
    for comp in ins.get("calls", []):
      for _, n in reversed(hlo["__computations__"].get(comp, [])):
        if hlo[n]["op_name"]:
          op_name = hlo[n]["op_name"]
          break
  op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  return op_name[-90:]


def profile(run, hlo_text: str, repeats: int) -> dict:
  """Runs the blocking zero-arg `run` `repeats` times under the profiler; returns {"ops": [...], "categories": {...},
  "ops_ms": ..., "executor_ms": ...}, times in ms per call. `hlo_text`: the optimised HLO of the program `run`
  executes (a ValueError if no traced op carries one of its names: then it is another program's)."""
  import jax
  hlo = parse_hlo(hlo_text)
  run()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        run()
    path = sorted(glob.glob(os.path.join(d, "**", "*.json.gz"), recursive=True))[-1]
    trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count, steps = collections.Counter(), collections.Counter(), []
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e["name"]
    if name in hlo and hlo[name]["opcode"] not in _CONTAINERS:
      total[name] += e["dur"] / 1e3
      count[name] += 1
    elif name.startswith("ThunkExecutor::Execute"):
      steps.append(e["dur"] / 1e3)
  if not total:
    raise ValueError("xla_profile: no traced op has a name from the given HLO; it is not the program `run` executes "
                     f"(or XLA_FLAGS lacks {_FLAG} at process start)")
  ops = [{"op": n, "category": category(n, hlo), "opcode": hlo[n]["opcode"], "ms_per_step": t / repeats,
          "calls_per_step": count[n] / repeats, "source": source_of(n, hlo)} for n, t in total.most_common()]
  cats = collections.Counter()
  for o in ops:
    cats[o["category"]] += o["ms_per_step"]
  return {"ops": ops, "categories": dict(cats.most_common()), "ops_ms": sum(cats.values()),
          "executor_ms": sum(steps) / repeats}


def _sft(args):
  from rlhf_jax.model import gpt
  from benchmarks import sft_step
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype)
  run, _ = sft_step.make_ours(cfg, sft_step.sft_batch(cfg, args.rows, args.seq, args.seed), args.seed)
  return run, f"SFT step, {args.preset}, {args.rows} x {args.seq}, {args.dtype}"


def _generate(args):
  """benchmarks.generate's sampling call (temperature 1, no EOS), and its jitted program's lowering."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import generate
  from rlhf_jax import sampling
  from rlhf_jax.model import gpt
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype)
  params = gpt.init(cfg, jax.random.PRNGKey(args.seed))
  toks, mask = generate.prompts(cfg, args.rows, args.gen_prompt_len, args.seed)
  key, n = jax.random.PRNGKey(args.seed + 1), args.gen_new_tokens
  spec = sampling._make_spec(cfg, 0, 1.0, False, "xla_profile")   # what generate() passes for these settings
  call = dict(max_new_tokens=n, temperature=1.0, eos_id=None, pad_id=generate.PAD)

  def run():
    return np.asarray(sampling.generate(params, cfg, toks, mask, key, **call)["tokens"])   # blocks
  eos, pad = sampling._token_ids(cfg, None, generate.PAD, "xla_profile")
  run.lower = lambda: sampling._generate_jit.lower(params, cfg, toks, mask, key, jnp.asarray(1.0, jnp.float32),
                                                   eos, pad, max_new_tokens=n, spec=spec)
  return run, (f"sampling, {args.preset}, {args.rows} prompts <= {args.gen_prompt_len}, {n} new tokens, "
               f"{args.dtype} (one call: prefill + {n - 1} decode steps)")


def _ppo(args):
  from rlhf_jax.model import gpt
  from benchmarks import ppo_iteration
  cfg = gpt.preset(args.preset, dropout=0.0, dtype=args.dtype)
  run = ppo_iteration.make_ours(args, cfg, ppo_iteration.make_models(cfg, args.seed))
  return run, (f"PPO iteration, {args.preset}, {args.batch} prompts x {args.prompt_len} + {args.new_tokens}, "
               f"{args.ppo_epochs} x {args.num_minibatches} updates, {args.dtype}")


def main(argv=None):
  from benchmarks import ppo_iteration
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", choices=("sft", "generate", "ppo"), default="sft")
  p.add_argument("--top", type=int, default=25, help="ops listed, by time")
  p.add_argument("--seq", type=int, default=128, help="(sft) sequence length")
  p.add_argument("--rows", type=int, default=8, help="(sft, generate) rows per call (--batch is the PPO rollout's)")
  p.add_argument("--gen_prompt_len", type=int, default=32, help="(generate) prompt length")
  p.add_argument("--gen_new_tokens", type=int, default=64, help="(generate) new tokens")
  ppo_iteration.add_flags(p)   # --preset, --batch, --dtype, the PPO shapes and the common flags
  args = p.parse_args(argv)
  run, title = {"sft": _sft, "generate": _generate, "ppo": _ppo}[args.what](args)
  hlo_text = run.lower().compile().as_text()
  res = profile(run, hlo_text, args.repeats)
  cats = [{"category": k, "ms_per_step": v, "share": v / res["ops_ms"]} for k, v in res["categories"].items()]
  common.print_table(cats, ["category", "ms_per_step", "share"],
                     f"{title}: {res['ops_ms']:.1f} ms of ops per step ({res['executor_ms']:.1f} ms in the executor), "
                     f"threads={args.threads or 'all'}")
  common.print_table(res["ops"][:args.top], ["op", "category", "opcode", "ms_per_step", "calls_per_step", "source"],
                     f"top {args.top} ops")
  common.write_json("xla_profile", {"machine": common.machine_info(), "args": vars(args), "title": title, **res},
                    args.out)


if __name__ == "__main__":
  main()
