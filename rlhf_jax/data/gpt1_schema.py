"""GPT-1 fine-tuning tasks as data: task names, each record's text fields, the task special tokens.

Plain constants with no dependency on the model or on `rlhf_jax.gpt1`, so data code (the
`gpt1_tasks` TFDS builder) can validate records without importing the fine-tuning package;
`rlhf_jax.gpt1.transforms` builds the token layouts on top of them (and re-exports them).
"""
from __future__ import annotations

START = "<|start|>"      # the paper's <s>
DELIM = "<|delim|>"      # $
EXTRACT = "<|extract|>"  # <e>: the task head reads the final hidden state here
TASK_TOKENS: tuple[str, ...] = (START, DELIM, EXTRACT)

TASKS: tuple[str, ...] = ("classification", "entailment", "similarity", "multiple_choice")
# Text fields of each task's record, in layout order (multiple choice: context + each option).
FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text",), "entailment": ("premise", "hypothesis"),
    "similarity": ("a", "b"), "multiple_choice": ("context", "options"),
}
