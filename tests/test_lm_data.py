"""rlhf_jax/data/lm_data.py: the one get-or-train tokenizer (`tokenizer_for`)."""
import ml_collections as mlc
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
