"""Chat CLI (rlhf_jax/chat.py): history truncation, streaming decode of split UTF-8, the dialogue
loop, stage loading (LM, RL policy, refusal of reward models) and the piped-stdin command line."""
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import chat, sampling
from rlhf_jax.data import chat_format, synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.model import gpt, heads
from rlhf_jax.train import checkpoint, stages

from main_fixtures import xla_flags  # tests/ is on sys.path
from model_fixtures import init_params  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
TOK = tok_lib.train_bpe(synthetic.pretraining_corpus(300, seed=2), 300)
CFG = gpt.preset("nano", vocab_size=TOK.vocab_size, max_len=64, dropout=0.0, init_std=0.3)


def _params():
  return init_params(CFG, 0)


def _workdir(path: Path, stage: str, state: dict) -> Path:
  stages.write_stage(str(path), stage, CFG)
  tok_lib.save(TOK, path / "tokenizer")
  ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
  ckpt.save(3, state)
  ckpt.close()
  return path


def _user(t):
  return {"role": "user", "content": t}


def _asst(t):
  return {"role": "assistant", "content": t}


def test_fit_history_drops_oldest_exchanges_and_keeps_system():
  turns = [_user("sort: c b a"), _asst("a b c"), _user("copy: a"), _asst("a"), _user("add 2 and 3"),
           _asst("5"), _user("max of: 1 9 4")]
  system = "Be helpful, honest and harmless."
  head = [{"role": "system", "content": system}]
  full = chat_format.encode_prompt(TOK, head + turns)
  kept, ids = chat.fit_history(TOK, system, turns, len(full))
  assert kept == turns and ids == full
  for budget in range(len(full) - 1, 0, -1):
    try:
      kept, ids = chat.fit_history(TOK, system, turns, budget)
    except ValueError as e:
      assert "context window" in str(e)
      assert len(chat_format.encode_prompt(TOK, head + turns[-1:])) > budget
      break
    # Brute force: the longest suffix that starts with a user turn and fits the budget.
    fits = [i for i in range(0, len(turns), 2) if len(chat_format.encode_prompt(TOK, head + turns[i:])) <= budget]
    assert kept == turns[fits[0]:] and kept[0]["role"] == "user"
    assert ids == chat_format.encode_prompt(TOK, head + kept) and len(ids) <= budget
    assert ids[0] == TOK.system_id  # the system message is never dropped
  # Without a system message, a single turn still fits in a tiny window.
  kept, ids = chat.fit_history(TOK, None, turns, len(chat_format.encode_prompt(TOK, turns[-1:])))
  assert kept == turns[-1:]


def test_stream_delta_holds_back_partial_utf8():
  ascii_tok = tok_lib.train_bpe(["hello world, the cat sat on the mat."] * 20, 300)
  text = "héllo wörld ✓ ok"
  ids = ascii_tok.encode(text)
  assert ascii_tok.decode(ids[:2]).endswith("\ufffd")  # 'é' is split over two byte tokens
  pieces, shown = [], ""
  for n in range(1, len(ids) + 1):
    delta, shown = chat.stream_delta(ascii_tok, ids[:n], shown)
    pieces.append(delta)
  assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
  assert "" in pieces  # some step printed nothing while a character was incomplete


def test_stream_reply_equals_generate_and_streams_every_piece():
  prompt = chat_format.encode_prompt(TOK, [_user("sort: b a")])
  written = []
  reply = chat.stream_reply(_params(), CFG, TOK, prompt, jax.random.PRNGKey(0), prompt_len=41, max_new_tokens=24,
                            temperature=1.0, spec=sampling.SamplingSpec(greedy=True), write=written.append)
  assert "".join(written) == reply
  ref = sampling.generate(_params(), CFG, np.asarray([prompt], np.int32), np.ones((1, len(prompt)), np.int32),
                          jax.random.PRNGKey(0), max_new_tokens=24, eos_id=TOK.eos_id, pad_id=TOK.pad_id, greedy=True)
  toks = [int(t) for t in ref["tokens"][0]]
  cut = next((i for i, t in enumerate(toks) if t in TOK.special_ids), len(toks))
  assert reply == TOK.decode(toks[:cut])


def test_chat_loop_history_reset_and_truncation():
  out = io.StringIO()
  lines = ["sort: b a\n", "copy: a b\n", "\n", "add 1 and 2\n"]
  history = chat.chat_loop(_params(), CFG, TOK, lines, out.write, system="Be brief.", temperature=0,
                           max_new_tokens=24)
  # Window 64, 24 new tokens -> prompts of at most 41 tokens: old exchanges had to go.
  assert out.getvalue().count("Assistant: ") == 3
  assert history[-2] == _user("add 1 and 2") and history[-1]["role"] == "assistant"
  assert len(history) < 6 and history[0]["role"] == "user"
  assert len(chat_format.encode_prompt(TOK, [{"role": "system", "content": "Be brief."}] + history[:-1])) <= 41
  out = io.StringIO()
  history = chat.chat_loop(_params(), CFG, TOK, ["sort: b a\n", "/reset\n", "copy: a\n", "/exit\n", "max of: 1\n"],
                           out.write, temperature=0, max_new_tokens=24)
  assert "[history cleared]" in out.getvalue() and out.getvalue().count("Assistant: ") == 2
  assert [m["role"] for m in history] == ["user", "assistant"] and history[0] == _user("copy: a")
  out = io.StringIO()
  chat.chat_loop(_params(), CFG, TOK, ["bad <|user|> text\n", "x " * 80 + "\n"], out.write, temperature=0,
                 max_new_tokens=24)
  assert out.getvalue().count("[error:") == 2 and "Assistant: " not in out.getvalue()


def test_load_chat_model_refuses_reward_models_and_reads_rl_policies(tmp_path):
  rm = _workdir(tmp_path / "run" / "rm", "rm", {"params": heads.init(CFG, jax.random.PRNGKey(1)), "step": np.int32(3)})
  with pytest.raises(ValueError, match="reward/value"):
    chat.load_chat_model(str(tmp_path / "run"), "rm")
  with pytest.raises(ValueError, match="does not exist"):
    chat.load_chat_model(str(tmp_path / "run"), "ppo_ptx")
  policy = jax.tree.map(lambda x: x + 1.0, _params())
  _workdir(tmp_path / "run" / "ppo_ptx", "ppo", {"policy": {"params": policy}, "value": {"params": heads.init(
      CFG, jax.random.PRNGKey(2))}, "step": np.int32(3)})
  info, cfg, tok, params = chat.load_chat_model(str(tmp_path / "run"), "ppo_ptx")
  assert info["stage"] == "ppo" and cfg == CFG and tok.vocab_size == TOK.vocab_size
  jax.tree.map(np.testing.assert_array_equal, params, policy)
  assert rm.exists()


def test_cli_with_piped_stdin(tmp_path):
  _workdir(tmp_path / "run" / "sft", "sft", {"params": _params(), "step": np.int32(3)})
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}
  stdin = "sort: b a\ncopy: a b\n/reset\nsort: b a\n/exit\nmax of: 3 4\n"
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.chat", "--workdir", str(tmp_path / "run"), "--stage", "sft",
                         "--system", "Be brief.", "--temperature", "0", "--max_new_tokens", "10"],
                        input=stdin, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  before, after = proc.stdout.split("[history cleared]\n")
  replies = before.split("Assistant: ")[1:] + after.split("Assistant: ")[1:]
  assert len(replies) == 3  # one per user turn; nothing after /exit
  assert replies[0] == replies[2]  # greedy: after /reset the same question has the same context
  bad = subprocess.run([sys.executable, "-m", "rlhf_jax.chat", "--workdir", str(tmp_path / "nowhere")],
                       input="", capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_unknown_slash_command_prints_commands_and_is_not_sent(monkeypatch):
  """A user typed /quit and the model answered "15": a line starting with "/" that is not a known
  command prints the command list; the model is never called and the history does not change."""
  sent = []
  monkeypatch.setattr(chat, "stream_reply", lambda *a, **k: sent.append(a[3]) or "ok")
  out = io.StringIO()
  history = chat.chat_loop(_params(), CFG, TOK, ["/quit\n", "  /help me\n", "/Exit\n", "sort: b a\n", "/reset now\n",
                                              "/exit\n", "copy: a\n"], out.write, temperature=0, max_new_tokens=8)
  text = out.getvalue()
  for bad in ("/quit", "/help", "/Exit", "/reset"):   # "/reset now" is not the /reset command either
    assert f"[unknown command {bad!r}; nothing was sent to the model]" in text
  assert text.count("[commands: /reset ") == 4 and "/exit quit" in text
  assert len(sent) == 1 and text.count("Assistant: ") == 1   # only "sort: b a"; nothing after /exit
  assert history == [_user("sort: b a"), _asst("ok")]
  assert chat.commands_help() == "[commands: " + "; ".join(f"{c} {w}" for c, w in chat.COMMANDS.items()) + "]\n"
