"""rlhf_jax/decode_kernels.py: which CPUs get which kernels, and that both kernel choices sample the same model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import decode_kernels as dk
from rlhf_jax import sampling
from rlhf_jax.model import gpt
from model_fixtures import init_params  # tests/ is on sys.path

CFG = gpt.preset("nano", dropout=0.0, vocab_size=64, max_len=32, init_std=0.3)   # peaked: no argmax near-ties
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw"}


@pytest.mark.parametrize("mode,backend,machine,flags,rows,off", [
    ("auto", "cpu", "x86_64", AVX2, 8, True),          # Zen 3: measured faster without YNNPACK at few rows
    ("auto", "cpu", "x86_64", AVX2, dk.MAX_ROWS, True),
    ("auto", "cpu", "x86_64", AVX2, 64, False),        # ... and slower at the evaluation's 64
    ("auto", "cpu", "x86_64", AVX512, 8, False),       # the AVX-512 Xeons keep XLA's default
    ("auto", "cpu", "aarch64", frozenset({"asimd", "sve"}), 8, False),
    ("auto", "cpu", "x86_64", frozenset(), 8, False),  # unknown features: the default
    ("auto", "gpu", "x86_64", AVX2, 8, False),
    ("xla", "cpu", "aarch64", frozenset(), 64, True),
    ("xla", "tpu", "x86_64", AVX2, 8, False),          # never on another backend
    ("ynnpack", "cpu", "x86_64", AVX2, 8, False),
])
def test_choose(mode, backend, machine, flags, rows, off):
  assert dk.choose(mode, backend, machine, flags, rows) == (dk._NO_YNNPACK if off else ())


def test_bad_mode_names_the_variable():
  with pytest.raises(ValueError, match=dk.ENV):
    dk.choose("eigen", "cpu", "x86_64", AVX2, 8)


def test_cpu_flags(tmp_path):
  f = tmp_path / "cpuinfo"
  f.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
  assert dk.cpu_flags(str(f)) == {"fpu", "avx", "avx2", "fma"}
  assert dk.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_an_option_xla_rejects_falls_back_to_the_defaults(monkeypatch):
  monkeypatch.setattr(dk, "_NO_YNNPACK", (("xla_cpu_no_such_option_in_any_xla", "1"),))
  monkeypatch.setenv(dk.ENV, "xla")
  with pytest.warns(UserWarning, match="rejected"):
    assert dk.options() == ()


def _prompts():
  rng = np.random.default_rng(3)
  toks = rng.integers(1, CFG.vocab_size, (4, 6)).astype(np.int32)
  mask = np.ones((4, 6), np.int32)
  mask[1, :3] = mask[2, :5] = 0
  return jnp.asarray(np.where(mask > 0, toks, 0)), jnp.asarray(mask)


def _generate(mode, monkeypatch, **kw):
  monkeypatch.setenv(dk.ENV, mode)
  toks, mask = _prompts()
  out = sampling.generate(init_params(CFG, 0), CFG, toks, mask, jax.random.PRNGKey(5), max_new_tokens=8,
                          eos_id=None, pad_id=0, **kw)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU kernel choice")
def test_both_kernel_choices_sample_the_same_model(monkeypatch):
  monkeypatch.setenv(dk.ENV, "xla")
  assert dk.options() == dk._NO_YNNPACK   # this jax's XLA accepts the option (else it falls back to ())
  toks, mask = _prompts()
  args = (init_params(CFG, 0), CFG, toks, mask, jax.random.PRNGKey(5), jnp.float32(1.0), jnp.int32(-1), jnp.int32(0))
  hlo = sampling._generate_jit.lower(*args, max_new_tokens=8, spec=sampling.SamplingSpec()).compile().as_text()
  assert "ynn" not in hlo.lower()     # the option reached the program
  for kw in ({"greedy": True}, {}):   # greedy, and multinomial sampling on the same key
    ours, default = _generate("xla", monkeypatch, **kw), _generate("ynnpack", monkeypatch, **kw)
    np.testing.assert_array_equal(ours["tokens"], default["tokens"])
    np.testing.assert_allclose(ours["logprobs"], default["logprobs"], atol=1e-5)
  # Beam search (the other decoding program) too.
  bs = {}
  for mode in ("xla", "ynnpack"):
    monkeypatch.setenv(dk.ENV, mode)
    bs[mode] = sampling.beam_search(init_params(CFG, 0), CFG, toks, mask, beam_width=3, max_new_tokens=6, eos_id=None,
                                    pad_id=0)
  np.testing.assert_array_equal(bs["xla"]["tokens"], bs["ynnpack"]["tokens"])
  np.testing.assert_allclose(bs["xla"]["scores"], bs["ynnpack"]["scores"], atol=1e-5)


def test_inside_another_jit_the_outer_program_decides(monkeypatch):
  """A decoding function called in a traced context is inlined (only top-level jits take compiler options)."""
  monkeypatch.setenv(dk.ENV, "xla")
  f = dk.jit(lambda x: jnp.tanh(x) @ x, rows=lambda x: x.shape[0])
  x = jnp.arange(16.0).reshape(4, 4) / 16
  np.testing.assert_allclose(jax.jit(lambda x: f(x) + 1)(x), f(x) + 1, atol=1e-6)
