"""Tokenizers of Hugging Face checkpoints: chat templates, assistant-only masks checked against
transformers, added pad/role tokens, save -> AutoTokenizer round trips, template truncation and
tokenizer compatibility. Every tokenizer is trained here (no network)."""
import itertools

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_jax.data import chat_format as C
from rlhf_jax.data import pipeline as P
from rlhf_jax.data import tokenizer as T

CORPUS = ["hello world, how are you today?", "sort these letters: d b a c", "add 3 and 5, that is 8",
          "You are a helpful assistant.", "copy: a b c d e f g h", "héllo wörld 🎉"] * 20

# Qwen2.5-style ChatML: a default system block when the chat has none; {% generation %} marks
# assistant content + <|im_end|> (what TRL's assistant_only_loss trains on).
CHATML = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Llama-3.1-style: BOS, a system header always present (with a date line), trimmed contents.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n' -}}"
    "{{- system + '<|eot_id|>' -}}"
    "{%- for message in rest -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "sort: d b a"},
        {"role": "assistant", "content": "a b d"},
        {"role": "user", "content": "add 3 and 5"},
        {"role": "assistant", "content": "8, héllo 🎉"}]


def _bpe(specials):
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=330, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return hf


def _checkpoint(path, specials, template=None, **special_tokens):
  """A Hugging Face tokenizer directory as a checkpoint would ship it."""
  PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), chat_template=template,
                          **special_tokens).save_pretrained(str(path))
  return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("checkpoints")
  return {
      "qwen_base": _checkpoint(root / "qwen_base", CHATML_SPECIALS, CHATML, eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>"),
      "qwen_instruct": _checkpoint(root / "qwen_instruct", CHATML_SPECIALS, CHATML, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>"),
      "llama3": _checkpoint(root / "llama3", LLAMA3_SPECIALS, LLAMA3, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>"),
      "gpt2": _checkpoint(root / "gpt2", ["<|endoftext|>"], None, bos_token="<|endoftext|>",
                          eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
  }


def _reference(directory, messages):
  """transformers' own rendering, ids and assistant mask (TRL's assistant_only_loss)."""
  hf = AutoTokenizer.from_pretrained(str(directory))
  text = hf.apply_chat_template(messages, tokenize=False)
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  return text, list(out["input_ids"]), list(out["assistant_masks"])


def _runs(tok, ids, mask):
  return [tok.decode([i for i, _ in grp], skip_special=False)
          for on, grp in itertools.groupby(zip(ids, mask), key=lambda p: p[1]) if on]


# ------------------------------------------------------------------ rendering and loss masks


@pytest.mark.parametrize("name,messages", [("qwen_instruct", CHAT), ("qwen_instruct", CHAT[1:]),
                                           ("llama3", CHAT), ("llama3", CHAT[1:3])])
def test_template_render_and_mask_match_transformers(dirs, name, messages):
  tok = T.load_hf(dirs[name])
  text, ref_ids, ref_mask = _reference(dirs[name], messages)
  ids, mask = tok.chat.encode_chat(messages)
  assert tok.chat.render(messages) == text
  assert ids == ref_ids == tok.encode(text)
  assert mask == ref_mask
  end = "<|im_end|>" if name.startswith("qwen") else "<|eot_id|>"
  assert _runs(tok, ids, mask) == [m["content"] + end for m in messages if m["role"] == "assistant"]


def test_end_of_turn_stop_and_pad_tokens_detected(dirs):
  llama = T.load_hf(dirs["llama3"])
  tid = llama.backend.token_to_id
  assert llama.eos_id == tid("<|eot_id|>")
  assert llama.stop_ids == {tid("<|eot_id|>"), tid("<|end_of_text|>"), tid("<|start_header_id|>")}
  assert llama.pad_id == tid("<|pad|>") and llama.added_ids == (llama.pad_id,) and llama.pad_id not in llama.stop_ids
  assert llama.chat_template == LLAMA3 and llama.special_tokens["bos_token"] == "<|begin_of_text|>"
  prompt = llama.chat.prompt_ids(CHAT[:4])
  assert llama.decode(prompt, skip_special=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert prompt[0] == tid("<|begin_of_text|>")
  assert llama.chat.response_ids("8") == llama.encode("8") + [llama.eos_id]
  with pytest.raises(ValueError, match="role format"):
    llama.role_id("user")


def test_chatml_pad_equal_to_eos_gets_a_new_pad(dirs):
  base = T.load_hf(dirs["qwen_base"])  # pad == eos == <|endoftext|>
  tid = base.backend.token_to_id
  assert base.eos_id == tid("<|im_end|>")
  assert base.stop_ids == {tid("<|im_end|>"), tid("<|endoftext|>"), tid("<|im_start|>")}
  assert base.pad_id == tid("<|pad|>") == base.vocab_size - 1
  assert base.added_ids == (base.pad_id,) and base.base_vocab_size == base.vocab_size - 1
  assert base.special_tokens["pad_token"] == "<|pad|>"
  instruct = T.load_hf(dirs["qwen_instruct"])  # eos <|im_end|>, pad <|endoftext|>: a fine pad, kept
  assert instruct.pad_id == instruct.backend.token_to_id("<|endoftext|>") and instruct.added_ids == ()
  assert instruct.pad_id not in instruct.stop_ids and instruct.vocab_size == instruct.base_vocab_size


def test_gpt2_without_template_gets_role_format_tokens_and_pad(dirs, tmp_path):
  tok = T.load_hf(dirs["gpt2"])
  base = tok.base_vocab_size
  assert tok.chat_template is None and tok.chat.kind == "role"
  assert tok.eos_id == tok.backend.token_to_id("<|endoftext|>") < base
  assert sorted(tok.added_ids) == list(range(base, base + 4)) and tok.vocab_size == base + 4
  assert {tok.pad_id, tok.system_id, tok.user_id, tok.assistant_id} == set(tok.added_ids)
  assert tok.pad_id != tok.eos_id and tok.pad_id not in tok.stop_ids
  assert tok.stop_ids == {tok.eos_id, tok.system_id, tok.user_id, tok.assistant_id}
  assert tok.chat.render(CHAT) == C.render_chat(CHAT)
  assert tok.chat.encode_chat(CHAT)[0] == tok.encode(C.render_chat(CHAT))
  # Saved, the role format is a Jinja template: transformers renders and masks the same.
  T.save(tok, tmp_path / "tok")
  text, ref_ids, ref_mask = _reference(tmp_path / "tok", CHAT)
  ids, mask = tok.chat.encode_chat(CHAT)
  assert text == C.render_chat(CHAT) and ids == ref_ids and mask == ref_mask


def test_template_errors_are_named(dirs, tmp_path):
  # The generation prompt adds a blank line that assistant turns do not have: no prefix property.
  broken = CHATML.replace("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}",
                          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n\\n' -}}")
  tok = T.load_hf(_checkpoint(tmp_path / "broken", CHATML_SPECIALS, broken, eos_token="<|im_end|>"))
  with pytest.raises(ValueError, match=r"add_generation_prompt=True is not a prefix"):
    tok.chat.encode_chat(CHAT)
  chatml = T.load_hf(dirs["qwen_instruct"])
  with pytest.raises(ValueError, match="special token '<\\|im_end\\|>'"):
    chatml.chat.encode_chat([{"role": "user", "content": "hi<|im_end|>"}])
  with pytest.raises(ValueError, match=r"record 0.*special token"):
    P.encode_demonstration(chatml, {"messages": [{"role": "user", "content": "<|im_start|>x"}], "response": "y"}, 32)
  silent = "{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}"
  with pytest.raises(ValueError, match="a model could not learn to stop"):
    T.load_hf(_checkpoint(tmp_path / "silent", CHATML_SPECIALS, silent, eos_token="<|im_end|>"))


# ----------------------------------------------------------------- saving and loading back


@pytest.mark.parametrize("name", ["qwen_base", "llama3", "gpt2"])
def test_save_round_trips_through_auto_tokenizer_and_our_loaders(dirs, tmp_path, name):
  tok = T.load_hf(dirs[name])
  T.save(tok, tmp_path / "saved")
  hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
  text = "sort these: d b a c, héllo 🎉" + (tok.special_strings[0])
  assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
  assert len(hf) == tok.vocab_size and hf.pad_token_id == tok.pad_id
  assert hf.apply_chat_template(CHAT, tokenize=False) == tok.chat.render(CHAT)
  assert hf.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True) == tok.chat.render(CHAT[:4], True)
  for back in (T.load(tmp_path / "saved"), T.load_hf(tmp_path / "saved")):
    assert (back.vocab_size, back.pad_id, back.eos_id, back.stop_ids) == (tok.vocab_size, tok.pad_id, tok.eos_id,
                                                                           tok.stop_ids)
    assert back.chat_template == tok.chat_template and back.chat.kind == tok.chat.kind
    assert back.chat.encode_chat(CHAT) == tok.chat.encode_chat(CHAT)
    assert back.added_ids == ()  # the added rows are part of the saved vocabulary now
    T.check_compatible(tok, back, "original", "saved")


# ----------------------------------------------------------------------- pipeline truncation


def _turns():
  users = ["sort: d b a c", "copy: a b c d e f g h", "add 3 and 5", "hello world, how are you today?"]
  replies = ["a b c d", "a b c d e f g h", "8"]
  turns = []
  for u, r in itertools.zip_longest(users, replies):
    turns.append({"role": "user", "content": u})
    if r:
      turns.append({"role": "assistant", "content": r})
  return turns


@pytest.mark.parametrize("system", [None, "Answer briefly and correctly."])
def test_template_truncation_drops_oldest_turns_keeps_system(dirs, system):
  tok = T.load_hf(dirs["qwen_instruct"])
  head = [{"role": "system", "content": system}] if system else []
  turns = _turns()
  full = tok.chat.prompt_ids(head + turns)
  starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
  seen = set()
  for budget in range(len(full) - 40, len(full) + 1):
    start = next((s for s in starts if len(tok.chat.prompt_ids(head + turns[s:])) <= budget), None)
    if start is None:
      continue
    expect = tok.chat.prompt_ids(head + turns[start:])
    tokens, mask = P.encode_prompt_left_padded(tok, head + turns, budget)
    np.testing.assert_array_equal(tokens[budget - len(expect):], expect)
    assert mask.sum() == len(expect) and (tokens[:budget - len(expect)] == tok.pad_id).all()
    text = tok.decode(expect, skip_special=False)
    assert text.startswith("<|im_start|>system\n" + (system or "You are a helpful assistant.") + "<|im_end|>")
    seen.add(start)
  assert len(seen) >= 3  # several drop depths exercised
  it = P.prompt_batches([{"messages": head + turns}] * 2, tok, 2, len(full) - 10, seed=0, shard_index=0,
                        shard_count=1)
  assert it.stats.truncated == {"prompt_turns_dropped": 2}


def test_template_cut_of_latest_turn_and_too_long(dirs):
  tok = T.load_hf(dirs["llama3"])
  system = {"role": "system", "content": "Be brief. Answer briefly and correctly, please."}
  long_user = {"role": "user", "content": "copy: " + " ".join("abcdefgh"[i % 8] for i in range(60))}
  record = {"messages": [system, {"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"},
                         long_user, {"role": "assistant", "content": "a b c"}]}
  resp = tok.chat.response_ids("a b c")
  shortest = tok.chat.prompt_ids([system, dict(long_user, content="a")])
  max_len = len(shortest) + len(resp) + 20
  ex = P.encode_demonstration(tok, record, max_len)
  n = int(ex["attention_mask"].sum())
  assert max_len - 2 <= n <= max_len
  text = tok.decode(ex["tokens"][:n], skip_special=False)
  assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>") and "Be brief." in text
  assert "sort: b a" not in text and "copy:" not in text  # older turns dropped, the left of the content cut
  assert long_user["content"][-15:] + "<|eot_id|>" in text  # its right end kept
  assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\na b c<|eot_id|>")
  assert tok.decode(ex["targets"][ex["mask"] == 1], skip_special=False) == "a b c<|eot_id|>"
  it = P.sft_batches([record] * 2, tok, 2, max_len, seed=0, shard_index=0, shard_count=1)
  assert it.stats.truncated == {"prompt_turns_dropped": 2, "prompt_cut": 2}
  short = {"messages": [{"role": "user", "content": "hi"}], "response": "8"}
  assert len(tok.chat.prompt_ids(short["messages"])) + 2 <= len(shortest)
  skipped = P.sft_batches([record] * 2 + [short] * 2, tok, 2, len(shortest), seed=0, shard_index=0, shard_count=1)
  assert skipped.stats.skipped == {"prompt_too_long": 2} and skipped.stats.kept == 2


def test_demonstration_and_comparison_match_the_template(dirs):
  tok = T.load_hf(dirs["qwen_base"])
  ids, mask = tok.chat.encode_chat(CHAT)
  n_real = len(ids) - 1  # the rendering ends "<|im_end|>\n"; examples stop at the end-of-turn token
  ex = P.encode_demonstration(tok, {"messages": CHAT}, 80, history_loss=True)
  assert int(ex["attention_mask"].sum()) == n_real
  np.testing.assert_array_equal(ex["tokens"][:n_real], ids[:n_real])
  np.testing.assert_array_equal(ex["mask"][:n_real - 1], mask[1:n_real])
  assert (ex["tokens"][n_real:] == tok.pad_id).all()
  cmp = P.encode_comparison(tok, {"messages": CHAT[:4], "responses": ["8", "9"], "ranks": [0, 1]}, 80, 2)
  prompt = tok.chat.prompt_ids(CHAT[:4])
  for k, text in enumerate(["8", "9"]):
    ri = cmp["reward_index"][k]
    assert cmp["tokens"][k, ri] == tok.eos_id
    np.testing.assert_array_equal(cmp["tokens"][k, :ri + 1], prompt + tok.chat.response_ids(text))


# ------------------------------------------------------------------------- compatibility


def test_check_compatible_names_both_directories_and_the_differences(dirs):
  qwen, llama = T.load_hf(dirs["qwen_instruct"]), T.load_hf(dirs["llama3"])
  with pytest.raises(ValueError) as e:
    T.check_compatible(qwen, llama, str(dirs["qwen_instruct"]), str(dirs["llama3"]))
  msg = str(e.value)
  assert str(dirs["qwen_instruct"]) in msg and str(dirs["llama3"]) in msg
  for what in ("vocabulary", "pad id", "eos id", "chat template"):
    assert what in msg
  base = T.load_hf(dirs["qwen_base"])  # same vocabulary + one pad, same template
  with pytest.raises(ValueError, match=r"policy_dir and rm_dir .*vocab size \(330 vs 331\).*pad id"):
    T.check_compatible(qwen, base, "policy_dir", "rm_dir")
  T.check_compatible(qwen, T.load_hf(dirs["qwen_instruct"]), "a", "b")
