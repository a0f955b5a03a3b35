"""A small Llama-family base model pretrained here, exported as a Hugging Face directory.

  python -m rlhf_jax.main --config experiments/hh_base_model.py --workdir runs/hh_base

On a machine that cannot reach a model hub this stands in for a downloaded checkpoint, so that
`instructgpt_hh.py` and the generic stages can be run end to end on real text: RoPE, RMSNorm,
SwiGLU, grouped-query attention, a byte-level BPE. The corpus is the chosen dialogues of HH-RLHF's
helpful-online and helpful-rejection-sampled files (as "Human: ... / Assistant: ..." text) plus
Tiny Shakespeare; helpful-base, which the RLHF recipe trains and evaluates on, is left out.
Writes `<workdir>/pretrain` (a stage) and `<workdir>/hf` (config.json, model.safetensors,
tokenizer files); then

  python -m rlhf_jax.main --config experiments/instructgpt_hh.py --workdir runs/hh --config.init_from=runs/hh_base/hf
"""
import os
from pathlib import Path

import ml_collections as mlc

from rlhf_jax import config as rcfg
from rlhf_jax import export
from rlhf_jax.config import load_experiment
from rlhf_jax.data import sources

HERE = Path(__file__).resolve().parent
SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PRESETS = {"default": {}, "smoke": {"pretrain.loop.num_steps": 20, "pretrain.batch_size": 16,
                                    "pretrain.data.vocab_size": 512, "max_dialogues": 200}}


def get_config():
  c = mlc.ConfigDict()
  c.preset = "default"
  c.seed = 0
  c.subsets = "helpful-online,helpful-rejection-sampled"
  c.max_dialogues = 0          # 0 = all
  c.shakespeare = str(SHAKESPEARE)
  p = load_experiment(str(HERE / "pretrain_tiny.py")).get_config()
  p.model = rcfg.model("tiny", family="llama", position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                       bias=False, tie_embeddings=True, n_layer=4, d_model=128, n_head=4, n_kv_head=2, head_dim=32,
                       d_ff=384, max_len=512, vocab_size=2048, dropout=0.0, ln_eps=1e-5)
  # Sized for a 2-core CPU (~1M parameters, ~0.4 s a step); on a GPU raise all of these.
  p.data.update(dict(source="text", vocab_size=2048, seq_len=128, val_fraction=0.02))
  p.batch_size = 32
  p.optim = rcfg.optim(lr=3e-3, total_steps=800, warmup_steps=50, weight_decay=0.1)
  p.loop = rcfg.loop(num_steps=800, log_every=100, ckpt_every=200)
  c.pretrain = p
  return c


def _dialogue_text(messages) -> str:
  names = {"user": "Human", "assistant": "Assistant", "system": "System"}
  return "\n".join(f"{names[m['role']]}: {' '.join(m['content'].split())}" for m in messages)


def write_corpus(config, path: str) -> dict:
  """The pretraining text: one document per dialogue or Shakespeare paragraph, blank-line separated."""
  docs, counts = [], {}
  for subset in [s.strip() for s in config.subsets.split(",") if s.strip()]:
    train, held, _ = sources.load(f"hh_rlhf/{subset}:test", "demonstrations", eval_fraction=0.0,
                                  cache_dir=os.path.join(os.path.dirname(path), "data"), limit=int(config.max_dialogues))
    counts[subset] = len(train) + len(held)
    docs += [_dialogue_text(r["messages"]) for r in list(train) + list(held)]
  with open(config.shakespeare, encoding="utf-8") as f:
    plays = [p.strip() for p in f.read().split("\n\n") if p.strip()]
  counts["shakespeare_paragraphs"] = len(plays)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join(docs + plays) + "\n")
  return counts


def train(config, workdir):
  config = rcfg.apply_preset(config, PRESETS)
  os.makedirs(workdir, exist_ok=True)
  corpus = os.path.join(workdir, "corpus.txt")
  counts = write_corpus(config, corpus) if not os.path.exists(corpus) else {}
  p = config.pretrain
  p.seed, p.data.path = config.seed, corpus
  p.optim.total_steps = p.loop.num_steps
  result = load_experiment(str(HERE / "pretrain_tiny.py")).train(p, os.path.join(workdir, "pretrain"))
  info = export.export(os.path.join(workdir, "pretrain"), os.path.join(workdir, "hf"))
  out = {"corpus": counts, "pretrain": result, "export": info}
  print(out)
  return out
