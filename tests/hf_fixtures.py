"""Tiny Hugging Face checkpoints made offline for the tests: a BPE tokenizer and a random-init model.

`make_checkpoint(directory, family, chat_template)` trains a byte-level BPE on a few hundred
sentences, builds a random-init transformers model of that family from a config, and writes both
with `save_pretrained` — what a user's downloaded checkpoint directory looks like.
"""
from __future__ import annotations

import os

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_WORDS = ("the a an user assistant answer question please sort count list number numbers one two three four five "
          "six seven eight nine ten what is how do i you we they it this that helpful harmless honest thanks sure "
          "here are some ideas about cooking travel books music history science math code write story poem "
          "sentence short long good bad yes no maybe because so and or but with without for to of in on at").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=int(rng.integers(4, 14)))) + "." for _ in range(n)]


def make_tokenizer(directory: str, chat_template: str | None, vocab_size: int = 400):
  """Writes an HF tokenizer dir; with a template: ChatML specials, eos <|im_end|>, pad <|endoftext|>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
  kw = dict(tokenizer_object=bpe, eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
            bos_token=None, unk_token=None)
  if chat_template:
    kw["pad_token"] = "<|endoftext|>"
  tok = PreTrainedTokenizerFast(**kw)
  if chat_template:
    tok.chat_template = chat_template
  tok.save_pretrained(directory)
  return tok


def make_checkpoint(directory: str, family: str = "qwen2", chat_template: str | None = CHATML, d_model: int = 32,
                    n_layer: int = 2, seed: int = 0, vocab_size: int = 400) -> str:
  """A random-init HF causal LM + tokenizer in `directory` (float32 safetensors). Returns the path."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  os.makedirs(directory, exist_ok=True)
  tok = make_tokenizer(directory, chat_template, vocab_size)
  vocab = len(tok)
  torch.manual_seed(seed)
  if family == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=d_model, n_layer=n_layer, n_head=4,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    cfg = cls[0](vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layer,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=family == "qwen2", eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    model = cls[1](cfg)
  model.save_pretrained(directory, safe_serialization=True)
  return directory


# Two rows, the second left-padded: the probe every export-parity test feeds both sides.
PROBE_TOKENS = [[5, 17, 33, 60, 2, 9], [0, 0, 11, 12, 13, 14]]
PROBE_MASK = [[1] * 6, [0, 0, 1, 1, 1, 1]]


def hf_causal_lm_logits(model_dir, tokens, mask):
  """transformers' AutoModelForCausalLM logits float32 [B,T,V] for left-padded int [B,T] tokens / mask,
  with positions counted from the mask (as `gpt.positions_from_mask`)."""
  import numpy as np
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
