"""benchmarks.xla_profile reads the optimised HLO right: opcodes (tuple types included), fused computations,
categories and the jax op each HLO op came from. (The profile itself needs XLA's traceme flag at process start,
so only the benchmark runs it.)"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, for `benchmarks`
from benchmarks import xla_profile  # noqa: E402


def _hlo(fn, *args):
  return xla_profile.parse_hlo(jax.jit(fn).lower(*args).compile().as_text())


def test_parse_hlo_classifies_dots_reduces_and_elementwise_fusions():
  a = jnp.ones((64, 32), jnp.float32)
  w = jnp.ones((32, 48), jnp.float32)

  def fn(a, w):
    y = jnp.tanh(a @ w)                          # a dot (alone or fused with the tanh)
    return y.sum(axis=0), jnp.exp(a) * 2.0 + 1.0  # a reduce, and an elementwise fusion

  hlo = _hlo(fn, a, w)
  entry = [op for _, op in hlo["__computations__"][hlo["__entry__"]]]
  assert entry and all(hlo[n]["opcode"] != "?" for n in entry)
  cats = {n: xla_profile.category(n, hlo) for n in entry}
  assert "dot" in cats.values()
  assert {"reduce", "elementwise"} & set(cats.values())
  assert any("dot_general" in xla_profile.source_of(n, hlo) for n, c in cats.items() if c == "dot")


def test_opcode_reads_tuple_typed_instructions():
  assert xla_profile._opcode("(f32[2]{0}, s32[]) while(%t), condition=%c, body=%b") == "while"
  assert xla_profile._opcode("f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}") == "dot"
  assert xla_profile.category("missing", {"__computations__": {}}) == "other"
