"""Chat with a trained stage in the terminal (ChatGPT-style multi-turn dialogue, streamed).

  python -m rlhf_jax.chat --workdir runs/instructgpt --stage ppo_ptx [--system "Be brief."] \
      [--temperature 0.7 --top_k 0 --top_p 1.0 --max_new_tokens 64 --seed 0]

Reads one user message per stdin line and streams the reply token by token. "/reset" clears the
dialogue (the system message stays), "/exit" or end of input quits; any other line starting with
"/" (e.g. "/quit", "/help") prints the list of commands and is not sent to the model. The dialogue
is rendered in the tokenizer's chat format (`tok.chat`: role format or the model's chat template)
exactly as SFT/PPO prompts are, and a reply ends at any of `tok.stop_ids`; when it no longer fits
the context window the oldest exchanges are dropped first (never the system message).
--temperature 0 decodes greedily.
Decoding uses `sampling.prefill` + `sampling.decode_step` on a prompt left-padded to a fixed
length, so every turn reuses the same two compiled programs.

  python -m rlhf_jax.chat --workdir runs/vision --image picture.png [--temperature 0]

With --image the workdir is a vision run (experiments/vision_tiny.py; its sft stage, or
--stage align / sft) loaded by `recipes.vision.load_vision_stage`, the PNG is read by
`image_world.load_png` (the encoder's image size), and each user line is a question about that
image, answered on its own (no history: the SFT stage was trained on single turns) in the training
prompt format: one user turn "<image>\n" + the line (`image_world.prompt_text`), answered by
`vlm.generate` (greedy with --temperature 0) and printed when done. --system is not accepted with
--image; --max_new_tokens defaults to the run's eval.max_new_tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.data import chat_format
from rlhf_jax.data import image_world as iw
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.train import stages

_WHERE = "rlhf_jax/chat.py"
COMMANDS = {"/reset": "clear the dialogue (the system message stays)", "/exit": "quit (as does end of input)"}


def commands_help(unknown: str | None = None) -> str:
  """The commands on one line, after a line naming the unknown command when given."""
  head = f"[unknown command {unknown!r}; nothing was sent to the model]\n" if unknown else ""
  return head + "[commands: " + "; ".join(f"{c} {what}" for c, what in COMMANDS.items()) + "]\n"


# ------------------------------------------------------------------------------ loading
def load_chat_model(workdir: str, stage: str | None = None):
  """(info, GPTConfig, tokenizer, params) of a language-model stage in workdir[/stage], or of a
  Hugging Face model directory (its own chat template renders the dialogue).

  Raises ValueError for a reward/value model stage (params {"gpt", "head"}: it scores, it cannot talk).
  """
  path = os.path.join(workdir, stage) if stage else workdir
  if not os.path.isdir(path):
    raise ValueError(f"{_WHERE}: {path} does not exist" + (f" (--stage {stage} under {workdir})" if stage else ""))
  if stages.is_hf_dir(path):
    m = stages.load_model(path, expect="hf", key="workdir")
    return m.info, m.config, m.tok, m.params
  info = stages.read_stage(path) if stages.is_stage_dir(path) else None
  if info is None and stages.is_stage_dir(os.path.join(path, "sft")):
    info = stages.read_stage(os.path.join(path, "sft"))   # a vision run's workdir: name it below
  if info is not None and "vit" in info:
    raise ValueError(f"{_WHERE}: {path} holds a vision stage ({info.get('stage')!r}); chat with it about an "
                     "image: --image PATH.png")
  info, cfg, tok, params = stages.load_stage(path)  # RL stages: checkpoint.load_params reads the policy
  if isinstance(params, dict) and ("head" in params or "gpt" in params):
    raise ValueError(f"{_WHERE}: {path} holds a {info.get('stage')!r} stage with a scalar head (reward/value "
                     "model); chat needs a language model stage (pretrain, sft, ppo, ...)")
  return info, cfg, tok, params


# ------------------------------------------------------------------------------ history
def fit_history(tok: Tokenizer, system: str | None, turns: Sequence[dict], budget: int
                ) -> tuple[list[dict], list[int]]:
  """Drops the oldest exchanges until the prompt fits `budget` tokens.

  turns: user/assistant messages ending with the new user turn (no system message).
  Returns (kept turns, prompt ids = chat_format.encode_prompt of [system] + kept turns, ending
  with the generation prompt). An exchange is a user turn and the replies after it, dropped together;
  the system message and the newest user turn are never dropped. Raises ValueError if those two
  alone exceed the budget.
  """
  if not turns or turns[-1]["role"] != "user":
    raise ValueError(f"{_WHERE}: fit_history needs turns ending with a user message")
  head = [{"role": "system", "content": system}] if system else []
  kept = list(turns)
  while True:
    ids = chat_format.encode_prompt(tok, head + kept)
    if len(ids) <= budget:
      return kept, ids
    if len(kept) == 1:
      raise ValueError(f"{_WHERE}: the message needs {len(ids)} prompt tokens (with the system message) but "
                       f"the context window leaves room for {budget}; send a shorter message")
    kept.pop(0)
    while kept[0]["role"] != "user":  # never start the kept dialogue with a dangling reply
      kept.pop(0)


# ------------------------------------------------------------------------------ streaming
def stream_delta(tok: Tokenizer, ids: Sequence[int], shown: str) -> tuple[str, str]:
  """Text to print after `ids` grew: (new suffix, text shown so far).

  Decodes the whole id list and holds back trailing U+FFFD: a byte-level BPE piece can be the
  first byte(s) of a multi-byte character whose remaining bytes come with the next token.
  """
  text = tok.decode(list(ids))
  stable = text.rstrip("\ufffd")
  if not stable.startswith(shown):  # cannot happen for byte-level decoding; print nothing rather than garble
    return "", shown
  return stable[len(shown):], stable


def stream_reply(params, cfg, tok: Tokenizer, prompt_ids: Sequence[int], rng, *, prompt_len: int,
                 max_new_tokens: int, temperature: float, spec: sampling.SamplingSpec,
                 write: Callable[[str], None]) -> str:
  """Samples one reply (until a stop token, `tok.stop_ids`, or max_new_tokens), calling write()
  with each printable piece as it is decoded. Returns the reply text."""
  toks = np.full((1, prompt_len), tok.pad_id, np.int32)
  mask = np.zeros((1, prompt_len), np.int32)
  toks[0, prompt_len - len(prompt_ids):], mask[0, prompt_len - len(prompt_ids):] = prompt_ids, 1
  params = sampling.decode_layout(params, cfg)   # once per reply, not once per token
  state = sampling.prefill(params, cfg, toks, mask, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=tok.eos_id, pad_id=tok.pad_id, spec=spec)
  ids, shown = [], ""
  for i in range(max_new_tokens):
    if i:
      state = sampling.decode_step(params, cfg, state, spec=spec)
    t = int(state["tokens"][0, i])
    if t in tok.stop_ids:  # end of turn ends the reply; a turn-start token would begin someone else's turn
      break
    ids.append(t)
    delta, shown = stream_delta(tok, ids, shown)
    if delta:
      write(delta)
  text = tok.decode(ids)
  if len(text) > len(shown):
    write(text[len(shown):])
  for s in tok.special_strings:  # a literal special string assembled from bytes must not enter the history
    text = text.replace(s, "")
  return text


def _user_lines(lines, write: Callable[[str], None], prompt: Callable[[], None], on_reset: Callable[[], None]):
  """The input lines meant for the model (raw text, line end stripped), after the commands: /exit stops,
  /reset calls on_reset(), any other line starting with "/" (e.g. /quit) prints the command list and is
  never sent to the model, blank lines are skipped. prompt() runs before each line is read."""
  prompt()
  for line in lines:
    text = line.rstrip("\r\n")
    command = text.strip()
    if command == "/exit":
      return
    if command == "/reset":
      on_reset()
    elif command.startswith("/"):
      write(commands_help(command.split()[0]))
    elif command:
      yield text
    prompt()


def chat_loop(params, cfg, tok: Tokenizer, lines, write: Callable[[str], None], *, system: str | None = None,
              temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64,
              seed: int = 0, prompt: Callable[[], None] = lambda: None) -> list[dict]:
  """Runs the dialogue over an iterable of input lines; returns the final kept history."""
  if not 1 <= max_new_tokens < cfg.max_len:
    raise ValueError(f"{_WHERE}: max_new_tokens={max_new_tokens} must be in [1, context window {cfg.max_len})")
  if temperature < 0:
    raise ValueError(f"{_WHERE}: temperature must be >= 0 (0 = greedy), got {temperature}")
  spec = sampling.SamplingSpec(top_k=top_k, top_p=top_p, greedy=temperature == 0)
  prompt_len = cfg.max_len - max_new_tokens + 1   # prompt + reply always fit the window
  if system:
    tok.chat.validate([{"role": "system", "content": system}])
  history: list[dict] = []
  rng = jax.random.PRNGKey(seed)
  turn = 0

  def reset():
    nonlocal history
    history = []
    write("[history cleared]\n")

  for text in _user_lines(lines, write, prompt, reset):
    try:
      tok.chat.validate([{"role": "user", "content": text}])
      kept, ids = fit_history(tok, system, history + [{"role": "user", "content": text}], prompt_len)
    except ValueError as e:
      write(f"[error: {e}]\n")
    else:
      write("Assistant: ")
      reply = stream_reply(params, cfg, tok, ids, jax.random.fold_in(rng, turn), prompt_len=prompt_len,
                           max_new_tokens=max_new_tokens, temperature=temperature or 1.0, spec=spec, write=write)
      write("\n")
      history = kept + [{"role": "assistant", "content": reply}]
      turn += 1
  return history


# ------------------------------------------------------------------------------ image chat
def image_prompt(text: str) -> list[dict]:
  """The SFT stage's prompt for a question about the image: one user turn, IMAGE_TOKEN + newline +
  the question (`image_world.prompt_text`); a line that already has the marker is kept as it is."""
  content = text if iw.IMAGE_TOKEN in text else iw.prompt_text({"question": text})
  iw.check_prompt_images(content, 1)
  return [{"role": "user", "content": content}]


def image_reply(params, cfg, tok: Tokenizer, image, text: str, rng, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> str:
  """One answer (text up to the first stop token) to `text` about `image` (uint8 or float
  [H,W,3]) from a vision model (`vlm.VLMConfig`); temperature 0 = greedy. Raises ValueError
  when the prompt does not fit the text window left by max_new_tokens."""
  from rlhf_jax.model import vlm
  budget = cfg.gpt.max_len - cfg.num_image_tokens - max_new_tokens + 1
  messages = image_prompt(text)
  n = len(chat_format.encode_prompt(tok, messages))
  if n > budget:
    raise ValueError(f"{_WHERE}: the question needs {n} prompt tokens but the context window leaves room "
                     f"for {budget} after the image and {max_new_tokens} new tokens; ask a shorter question")
  toks, mask = pipeline.encode_prompt_left_padded(tok, messages, budget)
  gen = vlm.generate(params, cfg, iw.to_float(image)[None], toks[None], mask[None], rng,
                     max_new_tokens=max_new_tokens, temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                     eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=temperature == 0)
  ids = [int(t) for t in np.asarray(gen["tokens"])[0]]
  cut = next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))
  text = tok.decode(ids[:cut])
  for s in tok.special_strings:
    text = text.replace(s, "")
  return text


def image_chat_loop(params, cfg, tok: Tokenizer, image, lines, write: Callable[[str], None], *,
                    temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 8,
                    seed: int = 0, prompt: Callable[[], None] = lambda: None) -> list[str]:
  """Answers each input line about `image` (each on its own); returns the answers. The commands are
  the text chat's (/reset has no history to clear here)."""
  room = cfg.gpt.max_len - cfg.num_image_tokens
  if not 1 <= max_new_tokens < room:
    raise ValueError(f"{_WHERE}: max_new_tokens={max_new_tokens} must be in [1, text window {room})")
  if temperature < 0:
    raise ValueError(f"{_WHERE}: temperature must be >= 0 (0 = greedy), got {temperature}")
  image = iw.check_image(image, cfg.vit.image_size, cfg.vit.channels, where=f"{_WHERE}: --image")
  rng = jax.random.PRNGKey(seed)
  out: list[str] = []
  reset = lambda: write("[no history to clear: with --image each question is answered on its own]\n")
  for text in _user_lines(lines, write, prompt, reset):
    try:
      reply = image_reply(params, cfg, tok, image, text, jax.random.fold_in(rng, len(out)),
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    except ValueError as e:
      write(f"[error: {e}]\n")
    else:
      write(f"Assistant: {reply}\n")
      out.append(reply)
  return out


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> None:
  p = argparse.ArgumentParser(prog="python -m rlhf_jax.chat", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a stage workdir (or the parent of --stage), or a Hugging Face model directory")
  p.add_argument("--stage", default=None, help="sub-directory of --workdir holding the stage (e.g. ppo_ptx)")
  p.add_argument("--system", default=None, help="system message (kept for the whole dialogue)")
  p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help="default 64 (with --image: the vision run's eval.max_new_tokens)")
  p.add_argument("--image", default=None, help="a PNG to ask a vision stage (experiments/vision_tiny.py) about")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

  def write(s):
    stdout.write(s)
    stdout.flush()

  interactive = stdin.isatty()
  if args.image is not None:
    from rlhf_jax.recipes import vision
    try:
      if args.system:
        raise ValueError(f"{_WHERE}: --system is not accepted with --image (the vision SFT stage was trained "
                         "without a system message)")
      path = os.path.join(args.workdir, args.stage) if args.stage else args.workdir
      if not os.path.isdir(path):
        raise ValueError(f"{_WHERE}: {path} does not exist")
      info, cfg, tok, params = vision.load_vision_stage(path)
      image = iw.load_png(args.image, size=cfg.vit.image_size)
      if interactive:
        write(f"[{info['stage']} model, image {args.image}; each line is a question about it, /exit quits]\n")
      n_new = int(info.get("max_new_tokens", 8)) if args.max_new_tokens is None else args.max_new_tokens
      image_chat_loop(params, cfg, tok, image, iter(stdin.readline, ""), write, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=n_new,
                      prompt=(lambda: write("User: ")) if interactive else (lambda: None))
    except ValueError as e:
      sys.exit(f"error: {e}")
    except KeyboardInterrupt:
      write("\n")
    return
  try:
    info, cfg, tok, params = load_chat_model(args.workdir, args.stage)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if interactive:
    write(f"[{info['stage']} model, {cfg.n_layer}x{cfg.d_model}, context {cfg.max_len} tokens; "
          "/reset clears the dialogue, /exit quits]\n")
  n_new = 64 if args.max_new_tokens is None else args.max_new_tokens
  try:
    chat_loop(params, cfg, tok, iter(stdin.readline, ""), write, system=args.system, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, max_new_tokens=n_new, seed=args.seed,
              prompt=(lambda: write("User: ")) if interactive else (lambda: None))
  except ValueError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    write("\n")


if __name__ == "__main__":
  main()
