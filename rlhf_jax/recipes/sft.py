"""InstructGPT step 1 — supervised fine-tuning on demonstrations, loss on the assistant tokens only.

`run(config, workdir)` starts from `config.init_from` (a pretraining/SFT stage workdir or a
Hugging Face model directory, whose tokenizer and chat template come along), reads
demonstrations from `config.data` (`recipes.data.stage_records`), and trains through
`supervised.fit` with the masked LM loss. Writes stage "sft" (model config, tokenizer, data report).
"""
from __future__ import annotations

from rlhf_jax.data import pipeline
from rlhf_jax.model import gpt, lora
from rlhf_jax.recipes import data as data_lib
from rlhf_jax.train import stages, steps, supervised


def run(config, workdir: str) -> dict:
  """Config keys: init_from, dropout, data (see recipes.data), max_len, epochs, batch_size,
  history_loss, optim, loop (num_steps -1 = epochs), mesh, seed, lora (optional; rank 0 = full
  fine-tuning). Returns the final metrics."""
  init = stages.load_model(config.init_from, expect=("pretrain", "sft", "hf"), dropout=config.dropout)
  cfg, tok = init.config, init.tok
  train_recs, eval_recs, report = data_lib.stage_records(config.data, "demonstrations", workdir)
  history = bool(config.get("history_loss", False))
  batches = pipeline.sft_batches(train_recs, tok, config.batch_size, config.max_len, seed=config.seed,
                                 history_loss=history)
  evals = pipeline.sft_eval_batches(eval_recs, tok, config.batch_size, config.max_len, history_loss=history)
  num_steps = supervised.resolve_steps(config, batches.stats.kept)
  stages.write_stage(workdir, "sft", cfg, tok, init_from=config.init_from, epochs=config.epochs,
                     data=report, train_stats=batches.stats.as_dict(), **lora.stage_info(config.get("lora")))
  _, last, _ = supervised.fit(
      config, workdir, loss_fn=steps.lm_loss_fn(cfg), param_axes=gpt.param_axes(cfg), params=init.params,
      host_batches=batches, eval_weight_key="num_tokens", name="sft", eval_batches=evals)
  result = {"final_train_loss": last.get("loss"), "final_eval_loss": last.get("eval/loss"),
            "eval_token_accuracy": last.get("eval/accuracy"), "steps": num_steps,
            "train_records": batches.stats.kept, "skipped": batches.stats.as_dict()["skipped"],
            "truncated": batches.stats.as_dict()["truncated"]}
  print(result)
  return result
