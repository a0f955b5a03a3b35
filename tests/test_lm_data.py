"""rlhf_jax/data/lm_data.py: the one get-or-train tokenizer (`tokenizer_for`) and the memoised corpus."""
import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax.data import lm_data, synthetic
from rlhf_jax.data import tokenizer as tok_lib

DOCS = synthetic.pretraining_corpus(60, seed=0)


def _ids(tok):
  return tok.encode(DOCS[0])


def test_trains_saves_then_reloads_without_reading_texts(tmp_path):
  tok = lm_data.tokenizer_for(str(tmp_path), DOCS, 280)
  assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
  assert _ids(tok) == _ids(tok_lib.train_bpe(DOCS, 280))

  def never():
    raise AssertionError("texts read although the workdir has a tokenizer")
    yield
  again = lm_data.tokenizer_for(str(tmp_path), never(), None)
  assert _ids(again) == _ids(tok) and again.vocab_size == tok.vocab_size


def test_tokenizer_dir_and_special_tokens(tmp_path):
  task = ("<|a|>", "<|b|>")
  tok = lm_data.tokenizer_for(str(tmp_path / "one"), DOCS, 280, special_tokens=tok_lib.SPECIAL_TOKENS + task)
  assert [tok.backend.token_to_id(t) for t in task] == [len(tok_lib.SPECIAL_TOKENS), len(tok_lib.SPECIAL_TOKENS) + 1]
  copy = lm_data.tokenizer_for(str(tmp_path / "two"), [], None, tokenizer_dir=str(tmp_path / "one" / "tokenizer"))
  assert (tmp_path / "two" / "tokenizer" / "tokenizer.json").exists()
  assert _ids(copy) == _ids(tok)
  # the data-section wrapper reads tokenizer_dir / vocab_size from the config
  again = lm_data.get_tokenizer(mlc.ConfigDict({"tokenizer_dir": str(tmp_path / "one" / "tokenizer")}), [],
                                str(tmp_path / "three"))
  assert _ids(again) == _ids(tok)


def test_no_vocab_size_to_train_with_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    lm_data.tokenizer_for(str(tmp_path), DOCS, None)


def test_prepared_data_is_memoised_until_the_corpus_or_tokenizer_changes(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"document {i} says {'ab ' * (i % 7)}hello" for i in range(60)))
  data = mlc.ConfigDict(dict(source="text", path=str(corpus), val_fraction=0.2, vocab_size=300, seq_len=16))
  first = lm_data.prepare_lm_data(data, 16, str(tmp_path / "run"))
  again = lm_data.prepare_lm_data(data, 16, str(tmp_path / "run"))
  assert again is first                                   # served from the memo
  with pytest.raises(ValueError):                         # shared arrays are read-only
    first[1][0, 0] = 1
  assert lm_data.prepare_lm_data(data, 8, str(tmp_path / "run")) is not first   # another row length
  corpus.write_text(corpus.read_text() + "\n\nand one more document at the end")
  changed = lm_data.prepare_lm_data(data, 16, str(tmp_path / "run"))
  assert changed is not first and changed[1].shape[0] >= first[1].shape[0]
  np.testing.assert_array_equal(changed[1][:1], first[1][:1])   # same tokenizer (reloaded), same rows
