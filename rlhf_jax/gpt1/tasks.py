"""Synthetic GPT-1 fine-tuning tasks in the built-in world (`rlhf_jax.data.synthetic`).

  classification   {"text", "label"}: which task family does the prompt ask for?
                   label = index in `synthetic.FAMILIES` (10 classes).
  entailment       {"premise", "hypothesis", "label"}: does the answer (hypothesis) correctly solve
                   the prompt (premise)? label 1 = yes; wrong answers are the world's "wrong" and
                   "partial" response styles.
  similarity       {"a", "b", "label"}: do the two prompts ask for the same answer? label 1 = yes.
                   Pairs: a paraphrase (same instance, another template), the same family with one
                   input item changed (same answer or not: e.g. `max` keeps its answer when a
                   non-maximal item changes), or a prompt of another family. The label is always
                   computed as answer equality.
  multiple_choice  {"context", "options", "label"}: the prompt and `n_options` candidate answers,
                   the correct one at index `label` and distractors from the world's "wrong",
                   "partial" and "unhelpful" response styles (all distinct).

Benign families only, except for classification. Each call is a pure function of (n, seed, split);
every task instance an example mentions is in `split` by `synthetic.task_split`, so train and eval
never share an instance.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from rlhf_jax.data import synthetic
from rlhf_jax.gpt1.transforms import TASKS, check_task

N_CLASSES = {"classification": len(synthetic.FAMILIES), "entailment": 2, "similarity": 2, "multiple_choice": 0}
_SALT = {t: 100 + i for i, t in enumerate(TASKS)}
_DISTRACTOR_STYLES = (("wrong", 0.5), ("partial", 0.3), ("unhelpful", 0.2))


def n_classes(task: str) -> int:
  """Number of classes of a task's head (0 for multiple choice: one scalar per option)."""
  return N_CLASSES[check_task(task)]


def _rng(task: str, seed: int, split: str) -> np.random.Generator:
  if split not in ("train", "eval"):
    raise ValueError(f"gpt1.tasks: split must be 'train' or 'eval', got {split!r}")
  return np.random.default_rng([int(seed), _SALT[task], 0 if split == "train" else 1])


def _pick(rng, seq):
  return seq[int(rng.integers(len(seq)))]


def _task_in(rng, split: str, family: str) -> synthetic.Task:
  while True:  # rejection: acceptance about EVAL_FRACTION (eval) or 1 - EVAL_FRACTION (train)
    task = synthetic.sample_task(rng, family)
    if synthetic.task_split(task) == split:
      return task


def classification(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  rng = _rng("classification", seed, split)
  out = []
  for _ in range(n):
    family = _pick(rng, synthetic.FAMILIES)
    out.append({"text": _task_in(rng, split, family).prompt_text, "label": synthetic.FAMILIES.index(family)})
  return out


def entailment(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  rng = _rng("entailment", seed, split)
  out = []
  for _ in range(n):
    task = _task_in(rng, split, _pick(rng, synthetic.BENIGN_FAMILIES))
    hyp = task.answer if rng.random() < 0.5 else synthetic.sample_response(rng, task, _pick(rng, ("wrong", "partial")))[0]
    out.append({"premise": task.prompt_text, "hypothesis": hyp, "label": int(hyp == task.answer)})
  return out


def _other_template(rng, task: synthetic.Task) -> int:
  others = [i for i in range(len(synthetic.TEMPLATES[task.family])) if i != task.template]
  return _pick(rng, others)


def _perturbed(rng, task: synthetic.Task) -> synthetic.Task:
  """The same family with one input item replaced by a different value of its kind."""
  items = list(task.items)
  i = int(rng.integers(len(items)))
  pool = [str(v) for v in range(synthetic.MAX_NUMBER + 1)] if items[i].isdigit() else list(synthetic.LETTERS)
  items[i] = _pick(rng, [v for v in pool if v != items[i]])
  return synthetic.make_task(task.family, items, dict(task.params), int(rng.integers(len(synthetic.TEMPLATES[task.family]))))


def similarity(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  rng = _rng("similarity", seed, split)
  out = []
  for _ in range(n):
    u = rng.random()  # the pair kind is drawn first, so both splits have the same mix of kinds
    while True:
      a = _task_in(rng, split, _pick(rng, synthetic.BENIGN_FAMILIES))
      if u < 0.5:
        b = synthetic.make_task(a.family, a.items, dict(a.params), _other_template(rng, a))
      elif u < 0.85:
        b = _perturbed(rng, a)
      else:
        b = _task_in(rng, split, _pick(rng, [f for f in synthetic.BENIGN_FAMILIES if f != a.family]))
      if synthetic.task_split(b) == split:  # both instances of a pair inside the split
        break
    pair = (a, b) if rng.random() < 0.5 else (b, a)
    out.append({"a": pair[0].prompt_text, "b": pair[1].prompt_text, "label": int(a.answer == b.answer)})
  return out


def multiple_choice(n: int, seed: int = 0, split: str = "train", n_options: int = 4) -> list[dict]:
  if n_options < 2:
    raise ValueError(f"gpt1.tasks: n_options must be >= 2, got {n_options}")
  rng = _rng("multiple_choice", seed, split)
  styles, probs = zip(*_DISTRACTOR_STYLES)
  out = []
  while len(out) < n:
    task = _task_in(rng, split, _pick(rng, synthetic.BENIGN_FAMILIES))
    options = [task.answer]
    for _ in range(50):  # distinct distractors; every benign task has plenty
      text = synthetic.sample_response(rng, task, styles[int(rng.choice(len(styles), p=probs))])[0]
      if text not in options:
        options.append(text)
      if len(options) == n_options:
        break
    if len(options) < n_options:
      continue
    order = rng.permutation(n_options)
    out.append({"context": task.prompt_text, "options": [options[i] for i in order],
                "label": int(np.flatnonzero(order == 0)[0])})
  return out


_MAKERS = {"classification": classification, "entailment": entailment, "similarity": similarity,
           "multiple_choice": multiple_choice}


def make(task: str, n: int, seed: int = 0, split: str = "train", **kwargs) -> list[dict]:
  """n records of `task` (schemas in the module docstring)."""
  return _MAKERS[check_task(task)](n, seed, split, **kwargs)


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> str:
  """Writes records one JSON object per line (the `gpt1_tasks` builder's input format)."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return os.fspath(path)
