"""GPT-1 fine-tuning: input transforms, task head, L3 loss, synthetic tasks, gpt1_tasks builder."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from rlhf_jax import config as rcfg
from rlhf_jax import main as rmain
from rlhf_jax.data import builders as B
from rlhf_jax.data import synthetic
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.gpt1 import batches, heads, losses, pretrain, tasks, transforms
from rlhf_jax.gpt1.transforms import DELIM, EXTRACT, START
from rlhf_jax.model import gpt
from rlhf_jax.train import stages, supervised
from rlhf_jax.train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def tok():
  texts = synthetic.pretraining_corpus(300, seed=0) + [r["text"] for r in tasks.classification(200)]
  return transforms.train_task_bpe(texts, 400)


@pytest.fixture(scope="module")
def model(tok):
  """A 1-layer post-LN GPT (small graphs compile fast) and a jitted one-sequence reference forward."""
  cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, max_len=32, n_layer=1, n_head=2, d_model=32, dropout=0.0,
                      pre_ln=False)
  trunk = gpt.init(cfg, jax.random.PRNGKey(0))
  hidden_fn = jax.jit(lambda ids: gpt.hidden_states(trunk, cfg, ids))

  def ref_hidden(seq):
    """[len(seq), D] hidden states of ONE sequence. Right padding to 32 is invisible to its real
    tokens under causal attention, so this is the unbatched, unpadded forward (one compile)."""
    ids = np.full((1, 32), tok.pad_id, np.int32)
    ids[0, :len(seq)] = seq
    return hidden_fn(jnp.asarray(ids))[0, :len(seq)]

  return cfg, trunk, ref_hidden


def seqs_text(tok, seqs):
  return [tok.decode(s, skip_special=False) for s in seqs]


# ------------------------------------------------------------------------------ special tokens


def test_task_bpe_keeps_base_special_ids(tok):
  assert [tok.pad_id, tok.eos_id, tok.system_id, tok.user_id, tok.assistant_id] == [0, 1, 2, 3, 4]
  tt = transforms.task_tokens(tok)
  assert (tt.start, tt.delim, tt.extract, tt.pad) == (5, 6, 7, 0)
  assert tok.encode(f"{START}sort: a b{EXTRACT}") == [5] + tok.encode("sort: a b") + [7]


def test_add_task_tokens_appends_after_existing_vocab():
  base = tok_lib.train_bpe(synthetic.pretraining_corpus(200, seed=1), 300)
  with pytest.raises(ValueError, match="lacks the task tokens"):
    transforms.task_tokens(base)
  grown = transforms.add_task_tokens(base)
  tt = transforms.task_tokens(grown)
  v = base.vocab_size
  assert (tt.start, tt.delim, tt.extract) == (v, v + 1, v + 2) and grown.vocab_size == v + 3
  text = "<|user|>reverse: a b c<|assistant|>c b a"
  assert grown.encode(text) == base.encode(text) and grown.pad_id == base.pad_id
  assert transforms.add_task_tokens(grown).vocab_size == v + 3  # idempotent


def test_grow_vocab_keeps_old_rows():
  params = {"wte": jax.random.normal(jax.random.PRNGKey(1), (300, 16)), "blocks": {"w": jnp.ones((2, 16))}}
  grown = heads.grow_vocab(params, 303, jax.random.PRNGKey(2))
  assert grown["wte"].shape == (303, 16)
  np.testing.assert_array_equal(grown["wte"][:300], params["wte"])
  assert float(jnp.std(grown["wte"][300:])) > 0
  assert grown["blocks"] is params["blocks"]
  with pytest.raises(ValueError, match="shrink"):
    heads.grow_vocab(params, 299, jax.random.PRNGKey(2))


def test_from_workdir_appends_tokens_and_grows_wte(tmp_path):
  """A pretraining workdir without task tokens: tokenizer + 3 ids, wte + 3 fresh rows, rest unchanged."""
  base = tok_lib.train_bpe(synthetic.pretraining_corpus(200, seed=1), 300)
  cfg = gpt.GPTConfig(vocab_size=base.vocab_size, max_len=16, n_layer=1, n_head=2, d_model=16)
  params = {"wte": jax.random.normal(jax.random.PRNGKey(0), (base.vocab_size, 16)),
            "blocks": {"w": jnp.arange(6.0).reshape(2, 3)}}  # from_workdir only touches wte
  stages.write_stage(str(tmp_path), "pretrain", cfg)
  tok_lib.save(base, tmp_path / "tokenizer")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params, "step": jnp.int32(1)}, force=True)
  ckpt.close()
  cfg2, tok2, params2 = pretrain.from_workdir(str(tmp_path), jax.random.PRNGKey(1))
  v = base.vocab_size
  assert cfg2.vocab_size == tok2.vocab_size == v + 3 and transforms.task_tokens(tok2).extract == v + 2
  assert params2["wte"].shape == (v + 3, 16)
  np.testing.assert_array_equal(params2["wte"][:v], params["wte"])
  jax.tree.map(np.testing.assert_array_equal, params2["blocks"], params["blocks"])


def test_experiment_config_sweep_and_smoke_overrides_are_valid():
  exp = rmain.load_experiment(str(Path(__file__).resolve().parents[1] / "experiments" / "gpt1_finetune.py"))
  config = exp.get_config()
  assert config.aux_lm_weight == 0.5 and config.model.pre_ln is False
  points = exp.get_sweep()
  assert {(p["task"], p["aux_lm_weight"]) for p in points} == {(t, w) for t in tasks.TASKS for w in (0.0, 0.5)}
  for p in points:
    rcfg.apply_overrides(config, p)  # unknown keys would raise
  smoke = rcfg.apply_preset(rcfg.apply_overrides(config, {"preset": "smoke"}), exp.PRESETS)
  assert smoke.model.preset == "nano" and smoke.pretrain.steps < config.pretrain.steps
  # The inline pretraining cache is keyed by its settings (shared by all sweep points, which change
  # only task and λ), and the cache root is not part of the key.
  cache = lambda c: pretrain.pretrain_dir(c.pretrain, c.model)
  a = cache(config)
  assert os.path.dirname(a) == config.pretrain.cache_root
  assert cache(rcfg.apply_overrides(config, {"pretrain.cache_root": "/elsewhere"})) == os.path.join("/elsewhere", os.path.basename(a))
  assert a != cache(rcfg.apply_overrides(config, {"pretrain.steps": 7}))
  assert a != cache(rcfg.apply_overrides(config, {"model.pre_ln": True}))


# ------------------------------------------------------------------------------- transforms


def test_layouts_decode_to_the_paper_formats(tok):
  lay = lambda task, rec: seqs_text(tok, transforms.layout(task, rec, tok, 64)[0])
  assert lay("classification", {"text": "sort: 3 1 2"}) == [f"{START}sort: 3 1 2{EXTRACT}"]
  assert lay("entailment", {"premise": "add 2 and 3", "hypothesis": "5"}) == [f"{START}add 2 and 3{DELIM}5{EXTRACT}"]
  assert lay("similarity", {"a": "copy: a b", "b": "say again: a b"}) == [
      f"{START}copy: a b{DELIM}say again: a b{EXTRACT}", f"{START}say again: a b{DELIM}copy: a b{EXTRACT}"]
  assert lay("multiple_choice", {"context": "max of: 4 9", "options": ["9", "4", "maybe later."]}) == [
      f"{START}max of: 4 9{DELIM}{o}{EXTRACT}" for o in ("9", "4", "maybe later.")]
  # Exact ids, not only text: the frame tokens are single ids around the plain encodings.
  tt = transforms.task_tokens(tok)
  (seq,), _ = transforms.layout("entailment", {"premise": "add 2 and 3", "hypothesis": "5"}, tok, 64)
  assert seq == [tt.start] + tok.encode("add 2 and 3") + [tt.delim] + tok.encode("5") + [tt.extract]


def test_cut_to_max_len_is_symmetric_and_counted(tok):
  assert transforms.fit_segments([[1] * 10, [2] * 3], 8) == ([[1] * 5, [2] * 3], True)
  assert transforms.fit_segments([[1] * 6, [2] * 6], 6) == ([[1] * 3, [2] * 3], True)
  assert transforms.fit_segments([[1] * 2, [2] * 3], 6) == ([[1] * 2, [2] * 3], False)
  a, b = "sort these: a b c d e f g h a b c", "copy: a b c"
  tt = transforms.task_tokens(tok)
  seqs, cut = transforms.layout("similarity", {"a": a, "b": b}, tok, 10)
  assert cut and all(len(s) == 10 and s[-1] == tt.extract for s in seqs)
  d = seqs[0].index(tt.delim)
  a_cut, b_cut = seqs[0][1:d], seqs[0][d + 1:-1]
  assert a_cut == tok.encode(a)[:len(a_cut)] and b_cut == tok.encode(b)[:len(b_cut)]
  assert seqs[1] == [tt.start] + b_cut + [tt.delim] + a_cut + [tt.extract]  # both orders keep the same tokens
  arrays, stats = batches.encode_records("similarity", [{"a": a, "b": b, "label": 0}] * 3, tok, 10)
  assert stats.truncated["cut_to_max_len"] == 3 and arrays["tokens"].shape == (3, 2, 10)
  assert arrays["extract_index"].tolist() == [[9, 9]] * 3


def test_bad_records_raise_naming_record_and_key(tok):
  with pytest.raises(ValueError, match=r"record 1: key 'hypothesis'"):
    batches.encode_records("entailment", [{"premise": "x", "hypothesis": "y", "label": 0},
                                          {"premise": "x", "hypothesis": " ", "label": 1}], tok, 32)
  with pytest.raises(ValueError, match=r"record 0: key 'text': text contains a special-token"):
    batches.encode_records("classification", [{"text": f"a {DELIM} b", "label": 0}], tok, 32)
  with pytest.raises(ValueError, match=r"record 0: key 'label'.*\[0, 3\)"):
    batches.encode_records("classification", [{"text": "a", "label": 3}], tok, 32, n_classes=3)
  with pytest.raises(ValueError, match=r"record 0: missing key 'b'"):
    batches.encode_records("similarity", [{"a": "a", "label": 1}], tok, 32)
  mc = [{"context": "c", "options": ["1", "2", "3"], "label": 2}, {"context": "c", "options": list("12345"), "label": 0}]
  arrays, stats = batches.encode_records("multiple_choice", mc, tok, 16, max_options=4)
  assert stats.kept == 1 and stats.skipped["too_many_options"] == 1
  assert arrays["option_mask"].tolist() == [[True, True, True, False]] and arrays["label"].tolist() == [2]


# ------------------------------------------------------------------------------ head and loss


def _batch(tok, task, recs, max_len=32, **kw):
  arrays, _ = batches.encode_records(task, recs, tok, max_len, **kw)
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_similarity_is_symmetric(tok, model):
  cfg, trunk, ref_hidden = model
  params = heads.init(trunk, cfg, "similarity", 2, jax.random.PRNGKey(3))
  recs = tasks.similarity(8, seed=4)
  swapped = [{"a": r["b"], "b": r["a"], "label": r["label"]} for r in recs]
  fwd = jax.jit(lambda b: heads.forward(params, cfg, "similarity", b)[0])
  logits, logits_sw = fwd(_batch(tok, "similarity", recs)), fwd(_batch(tok, "similarity", swapped))
  np.testing.assert_allclose(logits, logits_sw, rtol=0, atol=1e-6)
  # ... and it is the head applied to the sum of the two orders' extract features.
  rec = recs[0]
  feats = []
  for seq in transforms.layout("similarity", rec, tok, 32)[0]:
    feats.append(ref_hidden(seq)[-1])
  ref = (feats[0] + feats[1]) @ params["task_head"]["kernel"] + params["task_head"]["bias"]
  np.testing.assert_allclose(logits[0], ref, rtol=1e-5, atol=1e-5)


def test_multiple_choice_softmax_over_real_options_only(tok, model):
  cfg, trunk, ref_hidden = model
  params = heads.init(trunk, cfg, "multiple_choice", 0, jax.random.PRNGKey(5))
  params["task_head"]["bias"] = jnp.ones((1,))
  recs = tasks.multiple_choice(4, seed=1, n_options=3)
  b3, b5 = _batch(tok, "multiple_choice", recs, max_options=3), _batch(tok, "multiple_choice", recs, max_options=5)
  fwd = jax.jit(lambda b: heads.forward(params, cfg, "multiple_choice", b)[0])
  l3, l5 = fwd(b3), fwd(b5)
  assert l5.shape == (4, 5) and bool(jnp.all(l5[:, 3:] == heads.NEG))
  np.testing.assert_allclose(l5[:, :3], l3, rtol=1e-5, atol=1e-5)
  p5 = jax.nn.softmax(l5, axis=-1)
  assert float(jnp.max(p5[:, 3:])) == 0.0
  # Brute force: each option scored alone, cross-entropy over the 3 real options.
  scores = np.array([[float(ref_hidden(s)[-1] @ params["task_head"]["kernel"][:, 0]) + 1.0
                      for s in transforms.layout("multiple_choice", r, tok, 32)[0]] for r in recs])
  np.testing.assert_allclose(l3, scores, rtol=1e-4, atol=1e-4)
  labels = np.array([r["label"] for r in recs])
  ref_nll = -np.mean(jax.nn.log_softmax(jnp.asarray(scores))[np.arange(4), labels])
  for b, logits in ((b3, l3), (b5, l5)):
    loss, m = losses.task_loss(logits, b["label"], b["weight"])
    np.testing.assert_allclose(float(loss), ref_nll, rtol=1e-4)
    assert float(m["accuracy"]) == float(np.mean(scores.argmax(1) == labels))


def _brute_lm_loss(tok, trunk, ref_hidden, task, recs):
  """Mean next-token NLL over every real token after the first, one unpadded sequence at a time."""
  nll, n = 0.0, 0
  for r in recs:
    for s in transforms.layout(task, r, tok, 32)[0]:
      logp = jax.nn.log_softmax(ref_hidden(s) @ trunk["wte"].T)
      nll -= float(jnp.sum(logp[jnp.arange(len(s) - 1), jnp.asarray(s[1:])]))
      n += len(s) - 1
  return nll / n


def _brute_task_loss(tok, params, ref_hidden, task, recs):
  """Mean cross-entropy from each real sequence's extract feature, one unpadded sequence at a time."""
  w, b = np.asarray(params["task_head"]["kernel"]), np.asarray(params["task_head"]["bias"])
  nll = []
  for r in recs:
    feats = np.stack([np.asarray(ref_hidden(s)[-1]) for s in transforms.layout(task, r, tok, 32)[0]])
    logits = feats @ w[:, 0] + b[0] if task == "multiple_choice" else feats[0] @ w + b
    nll.append(-float(jax.nn.log_softmax(jnp.asarray(logits))[r["label"]]))
  return float(np.mean(nll))


@pytest.mark.parametrize("task", ["entailment", "multiple_choice"])
def test_l3_equals_l2_plus_lambda_l1(tok, model, task):
  cfg, trunk, ref_hidden = model
  n_cls = tasks.n_classes(task)
  params = heads.init(trunk, cfg, task, n_cls, jax.random.PRNGKey(6))
  recs = tasks.make(task, 4, seed=2, split="eval", **({"n_options": 3} if task == "multiple_choice" else {}))
  batch = _batch(tok, task, recs, n_classes=n_cls, max_options=4)  # MC: one padding option each
  loss, m = jax.jit(lambda p, b: losses.make_loss_fn(cfg, task, 0.5)(p, b, None))(params, batch)
  l1 = _brute_lm_loss(tok, trunk, ref_hidden, task, recs)
  l2 = _brute_task_loss(tok, params, ref_hidden, task, recs)
  np.testing.assert_allclose(float(m["lm_loss"]), l1, rtol=1e-4)
  np.testing.assert_allclose(float(m["task_loss"]), l2, rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(m["task_loss"]) + 0.5 * float(m["lm_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), l2 + 0.5 * l1, rtol=1e-4)


def test_lambda_zero_gradient_is_the_task_gradient(tok, model):
  cfg, trunk, ref_hidden = model
  params = heads.init(trunk, cfg, "entailment", 2, jax.random.PRNGKey(7))
  batch = _batch(tok, "entailment", tasks.entailment(8, seed=3))

  def l2_only(p):
    logits, _ = heads.forward(p, cfg, "entailment", batch)
    return losses.task_loss(logits, batch["label"], batch["weight"])[0]

  l3 = lambda lam: (lambda p: losses.make_loss_fn(cfg, "entailment", lam)(p, batch, None)[0])
  g2, g0, g5 = jax.jit(lambda p: [jax.grad(f)(p) for f in (l2_only, l3(0.0), l3(0.5))])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), g0, g2)
  # The LM term does reach the trunk when λ > 0 (the task head's gradient is unaffected).
  assert float(jnp.max(jnp.abs(g5["gpt"]["wte"] - g2["gpt"]["wte"]))) > 1e-4
  np.testing.assert_allclose(g5["task_head"]["kernel"], g2["task_head"]["kernel"], rtol=1e-5, atol=1e-8)


def test_eval_padding_carries_no_weight(tok, model):
  cfg, trunk, ref_hidden = model
  arrays, _ = batches.encode_records("classification", tasks.classification(5, seed=1), tok, 24, n_classes=10)
  out = batches.eval_batches(arrays, 4)
  assert [len(b["label"]) for b in out] == [4, 4] and out[1]["weight"].tolist() == [1, 0, 0, 0]
  assert out[1]["label"][0] == arrays["label"][4]
  params = heads.init(trunk, cfg, "classification", 10, jax.random.PRNGKey(8))
  fn = jax.jit(lambda b: losses.make_loss_fn(cfg, "classification", 0.5)(params, b, None)[1])
  padded = fn({k: jnp.asarray(v) for k, v in out[1].items()})
  alone = fn({k: jnp.asarray(np.repeat(v[4:5], 4, axis=0)) for k, v in arrays.items()})  # example 4, 4 times
  assert float(padded["num_examples"]) == 1.0 and float(alone["num_examples"]) == 4.0
  assert float(padded["num_tokens"]) * 4 == float(alone["num_tokens"])
  for key in ("task_loss", "lm_loss", "accuracy"):
    np.testing.assert_allclose(float(padded[key]), float(alone[key]), rtol=1e-5)


# --------------------------------------------------------------------------------- synthetic


def _key(text):
  return synthetic.parse_prompt(text).key


def test_tasks_deterministic_disjoint_and_correctly_labelled():
  for task in tasks.TASKS:
    assert tasks.make(task, 30, seed=5) == tasks.make(task, 30, seed=5) != tasks.make(task, 30, seed=6)
  fields = {"classification": ("text",), "entailment": ("premise",), "similarity": ("a", "b"),
            "multiple_choice": ("context",)}
  for task, keys in fields.items():
    split_keys = {s: {_key(r[k]) for r in tasks.make(task, 150, seed=0, split=s) for k in keys} for s in ("train", "eval")}
    assert split_keys["train"] and not split_keys["train"] & split_keys["eval"], task
  for r in tasks.classification(50):
    assert synthetic.FAMILIES[r["label"]] == synthetic.parse_prompt(r["text"]).family
  ent = tasks.entailment(100)
  assert all(r["label"] == int(r["hypothesis"] == synthetic.parse_prompt(r["premise"]).answer) for r in ent)
  assert 30 < sum(r["label"] for r in ent) < 70
  sim = tasks.similarity(100)
  assert all(r["label"] == int(synthetic.parse_prompt(r["a"]).answer == synthetic.parse_prompt(r["b"]).answer)
             for r in sim)
  assert 30 < sum(r["label"] for r in sim) < 80
  for r in tasks.multiple_choice(50):
    answer = synthetic.parse_prompt(r["context"]).answer
    assert len(r["options"]) == 4 == len(set(r["options"])) and r["options"][r["label"]] == answer
    assert sum(o == answer for o in r["options"]) == 1


# ----------------------------------------------------------------------------------- builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_builder_reads_generated_jsonl(tmp_path, data_dir, task):
  train, val = tasks.make(task, 40, seed=1), tasks.make(task, 12, seed=1, split="eval")
  files = {"train": tasks.write_jsonl(tmp_path / "train.jsonl", train), "eval": tasks.write_jsonl(tmp_path / "eval.jsonl", val)}
  for split, recs in (("train", train), ("eval", val)):
    src = B.load(f"gpt1_tasks/{task}", split, data_dir, data_files=files)
    assert len(src) == len(recs) == src.stats[split]["seen"]
    assert [{k: v for k, v in ex.items() if k != "id"} for ex in src] == recs
    assert src[3]["id"] == f"0:{split}.jsonl:4"
    assert sum(src.stats[split]["labels"].values()) == len(recs)


def test_builder_tsv_with_variable_options_and_validation_split(tmp_path, data_dir):
  rows = ["context\tlabel\toption_a\toption_b\toption_c", "max of: 1 5\t1\t1\t5\t", "add 1 and 1\t2\t3\t1\t2"]
  rows += [f"copy: {c}\t0\t{c}\tno\t" for c in "abcdefgh"]
  path = tmp_path / "mc.tsv"
  path.write_text("\n".join(rows) + "\n")
  src = B.load("gpt1_tasks/multiple_choice", "train", data_dir, data_files=str(path))
  assert len(src) == 10 and src[0] == {"id": "0:mc.tsv:2", "context": "max of: 1 5", "options": ["1", "5"], "label": 1}
  assert src[1]["options"] == ["3", "1", "2"]
  parts = {s: B.load("gpt1_tasks/multiple_choice", s, data_dir, data_files=str(path), validation_fraction=0.4)
           for s in ("train", "validation")}
  assert len(parts["train"]) + len(parts["validation"]) == 10 and len(parts["validation"]) > 0
  ctx = {s: {r["context"] for r in p} for s, p in parts.items()}
  assert not ctx["train"] & ctx["validation"]


@pytest.mark.parametrize("task,line,match", [
    ("classification", {"label": 1}, r"bad.jsonl:2: key 'text': missing"),
    ("classification", {"text": "a", "label": "1"}, r"bad.jsonl:2: key 'label': expected a non-negative integer"),
    ("classification", {"text": "a", "label": 4}, r"bad.jsonl:2: key 'label': 4 is out of range \[0, 3\)"),
    ("entailment", {"premise": "a", "hypothesis": "  ", "label": 0}, r"bad.jsonl:2: key 'hypothesis': is empty"),
    ("similarity", {"a": "x <|extract|>", "b": "y", "label": 0}, r"bad.jsonl:2: key 'a': contains the special-token"),
    ("multiple_choice", {"context": "c", "options": ["x"], "label": 0}, r"bad.jsonl:2: key 'options': expected a list"),
    ("multiple_choice", {"context": "c", "options": ["x", 3], "label": 0}, r"bad.jsonl:2: key 'options\[1\]'"),
    ("multiple_choice", {"context": "c", "options": ["x", "y"], "label": 2}, r"bad.jsonl:2: key 'label': 2 is out of range"),
    ("classification", "{not json", r"bad.jsonl:2: malformed JSON"),
])
def test_builder_bad_jsonl_names_file_line_key(tmp_path, data_dir, task, line, match):
  good = {"classification": {"text": "a", "label": 0}, "entailment": {"premise": "a", "hypothesis": "b", "label": 1},
          "similarity": {"a": "a", "b": "b", "label": 1}, "multiple_choice": {"context": "c", "options": ["x", "y"], "label": 0}}
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(good[task]) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
  with pytest.raises(ValueError, match=match):
    B.load(f"gpt1_tasks/{task}", "train", data_dir, data_files=str(path), num_classes=3)


def test_builder_bad_tsv_and_config(tmp_path, data_dir):
  path = tmp_path / "s.tsv"
  path.write_text("a\tlabel\nx\t1\n")
  with pytest.raises(ValueError, match=r"s.tsv:1: TSV header lacks column\(s\) \['b'\]"):
    B.load("gpt1_tasks/similarity", "train", data_dir, data_files=str(path))
  path.write_text("a\tb\tlabel\nx\ty\t1\nx\ty\n")
  with pytest.raises(ValueError, match=r"s.tsv:3: has 2 tab-separated cells, the header has 3"):
    B.load("gpt1_tasks/similarity", "train", data_dir, data_files=str(path))
  path.write_text("a\tb\tlabel\nx\ty\tyes\n")
  with pytest.raises(ValueError, match=r"s.tsv:2: key 'label': expected an integer, got 'yes'"):
    B.load("gpt1_tasks/similarity", "train", data_dir, data_files=str(path))
  with pytest.raises(ValueError, match="config name must be a task"):
    B.load("gpt1_tasks/ranking", "train", data_dir, data_files=str(path))
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"x.csv: unknown file type"):
    B.load("gpt1_tasks/similarity", "train", data_dir, data_files=str(tmp_path / "x.csv"))


# -------------------------------------------------------------------------------- fine-tuning


def test_short_finetune_beats_chance(tmp_path, tok):
  """A randomly initialised 1-layer GPT learns the 10-way family classification (chance 0.1)."""
  cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, max_len=32, n_layer=1, n_head=2, d_model=32, dropout=0.0,
                      pre_ln=False)
  train, _ = batches.encode_records("classification", tasks.classification(480, seed=0), tok, 24, n_classes=10)
  evals, _ = batches.encode_records("classification", tasks.classification(64, seed=0, split="eval"), tok, 24,
                                    n_classes=10)
  config = mlc.ConfigDict({"seed": 0, "batch_size": 16, "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
                           "optim": dict(lr=3e-2, total_steps=60, warmup_steps=5, schedule="linear", weight_decay=0.0,
                                         grad_clip=1.0),
                           "loop": dict(num_steps=60, log_every=30, eval_every=0, ckpt_every=0, progress=False)})
  params = heads.init(gpt.init(cfg, jax.random.PRNGKey(0)), cfg, "classification", 10, jax.random.PRNGKey(1))
  _, last, _ = supervised.fit(config, str(tmp_path), loss_fn=losses.make_loss_fn(cfg, "classification", 0.5),
                              param_axes=heads.param_axes(cfg), params=params, name="gpt1",
                              host_batches=batches.train_batches(train, 16, seed=0),
                              eval_batches=batches.eval_batches(evals, 16), eval_weight_key="num_examples")
  assert last["eval/num_examples"] == 16.0  # per-batch weight mean; every batch full here
  assert last["eval/accuracy"] > 0.5, last
