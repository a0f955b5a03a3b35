"""In-context evaluation (rlhf_jax/eval/in_context.py): prompts, held-out examples, and batched /
padded scoring against unbatched brute-force references on a tiny random GPT; the pretraining
corpus's multi-example documents (synthetic.pretraining_corpus(fewshot_fraction=...))."""
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax.data import chat_format, gold, lm_data, synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.eval import in_context as ic
from rlhf_jax.model import gpt
from rlhf_jax.train import checkpoint, stages
from model_fixtures import init_params  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
TOK = tok_lib.train_bpe(synthetic.pretraining_corpus(400, seed=1), 300)
# Large init_std: peaked next-token distributions, so argmax ties cannot flip between code paths.
CFG = gpt.preset("nano", vocab_size=TOK.vocab_size, max_len=160, dropout=0.0, init_std=0.3)


def _params():
  return init_params(CFG, 0)


EXAMPLES = ic.make_examples(5, 4, seed=3)


def test_examples_are_held_out_deterministic_and_well_formed():
  again = ic.make_examples(5, 4, seed=3)
  assert again == EXAMPLES and ic.make_examples(5, 4, seed=4) != EXAMPLES
  for ex in ic.make_examples(40, 3, seed=0, n_choices=4):
    assert synthetic.task_split(ex.query) == "eval" and ex.query.family in synthetic.BENIGN_FAMILIES
    assert all(synthetic.task_split(d) == "train" and d.family == ex.query.family for d in ex.demos)
    assert len(ex.demos) == 3 and len(ex.choices) == 4 and len(set(ex.choices)) == 4
    assert ex.choices.index(ex.query.answer) == ex.label
  mixed = ic.make_examples(40, 2, seed=0, same_family=False)
  assert any(d.family != ex.query.family for ex in mixed for d in ex.demos)
  with pytest.raises(ValueError, match="unknown families"):
    ic.make_examples(2, 1, families=("nope",))


def test_prompt_formats():
  demo = synthetic.make_task("add", ["2", "3"], {}, 0)
  query = synthetic.make_task("sort", ["c", "a"], {}, 0)
  assert ic.render_prompt([demo], query, "hh") == (
      "\n\nHuman: add 2 and 3\n\nAssistant: 5\n\nHuman: sort: c a\n\nAssistant:")
  assert ic.render_prompt([demo], query, "qa") == "Q: add 2 and 3\nA: 5\n\nQ: sort: c a\nA:"
  chat = ic.render_prompt([demo], query, "chat")
  assert chat_format.parse_chat(chat) == [{"role": "user", "content": "add 2 and 3"},
                                          {"role": "assistant", "content": "5"},
                                          {"role": "user", "content": "sort: c a"}]
  assert ic.continuation_ids(TOK, "a c", "chat") == TOK.encode("a c") + [TOK.eos_id]
  assert TOK.decode(ic.continuation_ids(TOK, "a c", "hh")) == " a c\n"
  # Prompt ids: EOS (document separator) + the text; separate encoding of prompt and continuation
  # equals encoding the joined text (the boundary is a pre-tokenizer split).
  for fmt in ("hh", "qa"):
    ids, used = ic.prompt_ids(TOK, [demo], query, fmt, 1000)
    assert used == 1 and ids[0] == TOK.eos_id
    assert ids[1:] + ic.continuation_ids(TOK, "a c", fmt) == TOK.encode(ic.render_prompt([demo], query, fmt) + " a c\n")
  with pytest.raises(ValueError, match="format must be one of"):
    ic.render_prompt([], query, "xml")


def test_prompt_drops_oldest_demonstrations_to_fit():
  ex = EXAMPLES[0]
  full, used = ic.prompt_ids(TOK, ex.demos, ex.query, "hh", 10_000)
  assert used == 4
  three, _ = ic.prompt_ids(TOK, ex.demos[1:], ex.query, "hh", 10_000)
  ids, used = ic.prompt_ids(TOK, ex.demos, ex.query, "hh", len(full) - 1)
  assert used == 3 and ids == three   # demos[0], the farthest from the query, went first
  zero, _ = ic.prompt_ids(TOK, [], ex.query, "hh", 10_000)
  with pytest.raises(ValueError, match="budget"):
    ic.prompt_ids(TOK, ex.demos, ex.query, "hh", len(zero) - 1)


_logits_1 = jax.jit(lambda tokens: gpt.logits(_params(), CFG, tokens))


@functools.lru_cache(maxsize=None)
def _full_logprobs(ids: tuple):
  """Log-softmax [len(ids), V] of one sequence, no attention mask: it is zero-padded on the right
  to the window (one compiled shape), which causal attention makes invisible to its tokens."""
  row = np.zeros((1, CFG.max_len), np.int32)
  row[0, :len(ids)] = ids
  lg = np.asarray(_logits_1(row), np.float64)[0, :len(ids)]
  m = lg.max(-1, keepdims=True)
  return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("fmt", ["hh", "chat"])
def test_choice_scores_match_unbatched_reference(fmt):
  k, max_len = 2, 120
  # 20 rows: the last batch is padded
  got = ic.choice_scores(_params(), CFG, TOK, EXAMPLES, k, fmt, max_len=max_len, batch_size=8)
  for i, ex in enumerate(EXAMPLES):
    for j, choice in enumerate(ex.choices):
      cont = ic.continuation_ids(TOK, choice, fmt)
      prompt, _ = ic.prompt_ids(TOK, ex.demos[:k], ex.query, fmt, max_len - max(
          len(ic.continuation_ids(TOK, c, fmt)) for c in ex.choices))
      lp = _full_logprobs(tuple(prompt + cont))
      ref = sum(lp[len(prompt) - 1 + t, cont[t]] for t in range(len(cont)))
      np.testing.assert_allclose(got["sum"][i, j], ref, rtol=1e-4, atol=1e-3)
      np.testing.assert_allclose(got["mean"][i, j], ref / len(cont), rtol=1e-4, atol=1e-3)
  assert (got["shots"] == k).all()


def test_greedy_answers_match_unbatched_reference():
  k, n_new, budget = 1, 6, 100
  answers, shots = ic.greedy_answers(_params(), CFG, TOK, EXAMPLES, k, "qa", max_prompt_len=budget,
                                     max_new_tokens=n_new, batch_size=4)
  assert (shots == k).all() and len(answers) == len(EXAMPLES)
  for ex, got in zip(EXAMPLES, answers):
    ids, _ = ic.prompt_ids(TOK, ex.demos[:k], ex.query, "qa", budget)
    out = []
    for _ in range(n_new):   # greedy by repeated full forwards on the unpadded sequence
      nxt = int(_full_logprobs(tuple(ids + out))[-1].argmax())
      out.append(nxt)
      if nxt == TOK.eos_id:
        break
    assert got == ic.extract_answer(TOK, out)


def test_extract_answer_cuts_at_newline_and_special_tokens():
  ids = TOK.encode(" 3 4\nQ: more") + [TOK.eos_id]
  assert ic.extract_answer(TOK, ids) == "3 4"
  assert ic.extract_answer(TOK, TOK.encode(" a b") + [TOK.user_id] + TOK.encode("x")) == "a b"


def test_evaluate_counts_correct_answers(monkeypatch):
  labels = np.array([e.label for e in EXAMPLES])
  n, c = len(EXAMPLES), len(EXAMPLES[0].choices)

  def fake_scores(params, cfg, tok, examples, k, fmt, **kw):
    s = np.zeros((n, c))
    s[np.arange(n), labels] = 1.0 if k else -1.0   # k>0: all right; k=0: the label scores lowest
    mean = np.zeros((n, c))
    mean[np.arange(n), (labels + (k == 0)) % c] = 1.0
    return {"sum": s, "mean": mean, "shots": np.full(n, k)}

  def fake_answers(params, cfg, tok, examples, k, fmt, **kw):
    return [e.query.answer if i < k else "?" for i, e in enumerate(examples)], np.full(n, k)

  monkeypatch.setattr(ic, "choice_scores", fake_scores)
  monkeypatch.setattr(ic, "greedy_answers", fake_answers)
  out = ic.evaluate(None, CFG, TOK, EXAMPLES, (0, 1, 4), "hh")
  assert [out[k]["exact_match"] for k in (0, 1, 4)] == [0.0, 1 / n, 4 / n]
  assert [out[k]["mc_sum"] for k in (0, 1, 4)] == [0.0, 1.0, 1.0]
  assert [out[k]["mc_mean"] for k in (0, 1, 4)] == [0.0, 1.0, 1.0]
  assert out[4]["mean_shots_mc"] == 4 and out[0]["chance_mc"] == 1 / c
  # Binomial SEs over the n examples, the per-example hits, and the paired / unpaired gain.
  np.testing.assert_allclose(out[4]["exact_match_se"], np.sqrt(0.8 * 0.2 / n))
  assert out[0]["exact_match_se"] == out[1]["mc_sum_se"] == 0.0
  assert out[4]["exact_match_correct"] == [1, 1, 1, 1, 0]
  lo, hi = out[4]["exact_match_ci95"]
  assert 0.0 <= lo <= 0.8 <= hi <= 1.0
  g = ic.exact_match_gain(out, 4, 0)
  np.testing.assert_allclose([g["diff"], g["se_unpaired"], g["se_paired"]],
                             [0.8, np.sqrt(0.8 * 0.2 / n), np.std([1, 1, 1, 1, 0], ddof=1) / np.sqrt(n)])
  np.testing.assert_allclose(g["z_unpaired"], 0.8 / np.sqrt(0.8 * 0.2 / n))
  with pytest.raises(ValueError, match="demonstrations per example"):
    ic.evaluate(None, CFG, TOK, EXAMPLES, (0, 5), "hh")


def test_experiment_runs_on_a_saved_model(tmp_path):
  """experiments/in_context.py end to end on a random-init 'pretrained' workdir (no training)."""
  work = tmp_path / "pre"
  stages.write_stage(str(work), "pretrain", CFG)
  tok_lib.save(TOK, work / "tokenizer")
  ckpt = checkpoint.Checkpointer(str(work / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": _params(), "step": np.int32(1)})
  ckpt.close()
  spec = importlib.util.spec_from_file_location("in_context_under_test", REPO / "experiments" / "in_context.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  config = exp.get_config()
  config.init_from = str(work)
  config.eval.update(dict(n_examples=6, ks=(0, 2), formats=("hh", "chat"), max_new_tokens=6, batch_size=8))
  out = exp.train(config, str(tmp_path / "ic"))
  saved = json.loads((tmp_path / "ic" / "in_context.json").read_text())
  assert saved["ks"] == [0, 2] and saved["results"][0]["num_params"] == gpt.num_params(_params())
  for fmt in ("hh", "chat"):
    for k in ("0", "2"):
      m = saved["results"][0]["formats"][fmt][k]
      assert m["exact_match"] in [i / 6 for i in range(7)] and m["mc_mean"] in [i / 6 for i in range(7)]
      assert out[f"pre/{fmt}/k={k}/mc_mean"] == m["mc_mean"]
  assert (tmp_path / "ic" / "in_context.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ multi-example corpus
def _exchanges(doc: str) -> tuple[str, list[tuple[str, str]]]:
  """(format, [(user text, answer), ...]) of a multi-example document."""
  if doc.startswith("<|"):
    fmt, msgs = "chat", chat_format.parse_chat(doc)
  elif doc.startswith("\n\nHuman: "):
    fmt, msgs = "hh", chat_format.parse_hh(doc)
  else:
    assert doc.startswith("Q: ") and doc.endswith("\n") and not doc.endswith("\n\n"), doc
    fmt, msgs = "qa", []
    for block in doc[:-1].split("\n\n"):
      q, a = block.split("\nA: ")
      msgs += [{"role": "user", "content": q[len("Q: "):]}, {"role": "assistant", "content": a}]
  assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
  return fmt, [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]


def test_fewshot_fraction_zero_leaves_the_corpus_unchanged():
  base = synthetic.pretraining_corpus(60, seed=0)
  # Pinned before fewshot_fraction existed: the InstructGPT job's corpus must not move.
  assert hashlib.sha256(json.dumps(base).encode()).hexdigest() == (
      "238becfc5581aef4103d92be7fde84bba8aa5431f31cfa35c276dbd721c1209d")
  assert synthetic.pretraining_corpus(60, seed=0, fewshot_fraction=0.0) == base
  mixed = synthetic.pretraining_corpus(60, seed=0, fewshot_fraction=0.25)
  changed = [i for i, (a, b) in enumerate(zip(mixed, base)) if a != b]
  assert len(mixed) == 60 and len(changed) == 15   # round(0.25 * 60); the other documents stay in place
  for i in changed:
    _exchanges(mixed[i])
  assert mixed == synthetic.pretraining_corpus(60, seed=0, fewshot_fraction=0.25)
  assert mixed != synthetic.pretraining_corpus(60, seed=1, fewshot_fraction=0.25)


def test_multi_example_documents_are_one_family_correct_and_train_split():
  docs = synthetic.pretraining_corpus(150, seed=5, fewshot_fraction=1.0)
  formats, families, lengths = set(), set(), set()
  for doc in docs:
    fmt, pairs = _exchanges(doc)
    tasks = [synthetic.parse_prompt(u) for u, _ in pairs]
    assert len({t.family for t in tasks}) == 1 and tasks[0].family in synthetic.BENIGN_FAMILIES
    for task, (user, answer) in zip(tasks, pairs):
      assert synthetic.task_split(task) == "train"
      assert answer == task.answer == synthetic.solve(task.family, task.items, dict(task.params))
      assert gold.score(user, answer) == 1.0
    # Rendered as the evaluator renders demonstrations + query + answer.
    cont = {"hh": f" {tasks[-1].answer}", "qa": f" {tasks[-1].answer}\n", "chat": tasks[-1].answer}[fmt]
    assert doc == ic.render_prompt(tasks[:-1], tasks[-1], fmt) + cont
    formats.add(fmt)
    families.add(tasks[0].family)
    lengths.add(len(tasks))
  assert formats == set(ic.FORMATS) and families == set(synthetic.BENIGN_FAMILIES)
  assert lengths == set(range(synthetic.FEWSHOT_EXAMPLES[0], synthetic.FEWSHOT_EXAMPLES[1] + 1))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", None])
def test_bad_fewshot_fraction_raises(bad):
  with pytest.raises(ValueError, match="fewshot_fraction must be a number in"):
    synthetic.pretraining_corpus(10, fewshot_fraction=bad)


def test_lm_data_reads_fewshot_fraction_and_defaults_old_configs_to_zero():
  old = mlc.ConfigDict(dict(source="synthetic", n_docs=40, seed=2))   # a stage.json from before the key
  assert lm_data.load_documents(old) == synthetic.pretraining_corpus(40, seed=2)
  new = mlc.ConfigDict(dict(source="synthetic", n_docs=40, seed=2, fewshot_fraction=0.5))
  assert lm_data.load_documents(new) == synthetic.pretraining_corpus(40, seed=2, fewshot_fraction=0.5)
  spec = importlib.util.spec_from_file_location("pretrain_tiny_under_test", REPO / "experiments" / "pretrain_tiny.py")
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  assert exp.get_config().data.fewshot_fraction == 0.0
  member = exp.member_config((1, 32, 2), 10, seed=0, seq_len=64, vocab_size=300, batch_size=4, lr=1e-3,
                             warmup_steps=0, data=dict(fewshot_fraction=0.3), n_logs=1)
  assert member.data.fewshot_fraction == 0.3 and member.data.seq_len == 64
